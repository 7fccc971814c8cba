"""Text inputs: the built-in natural-text set, user prompt files (.txt / .jsonl) and Hugging Face datasets."""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache

from lensflow.tasks.core.config import Config, ConfigError, DataConf
from lensflow.tasks.core.redact import redact


@lru_cache(maxsize=1)
def _builtin_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of CPython's bundled documentation (pydoc_data.topics): real English that ships with
    Python itself, so the embedded default needs no download. Code samples and tables are filtered out."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            letters = sum(c.isalpha() or c == " " for c in text)
            if len(text) > 200 and not text.startswith((">>>", "*", "|", "+")) and letters / len(text) > 0.85:
                out.append(text)
    return tuple(out)


def builtin_texts(n: int | None = None, seed: int = 0) -> list[str]:
    """n paragraphs in a seeded order (all of them when n is None; ~480 are available)."""
    paras = list(_builtin_paragraphs())
    random.Random(seed).shuffle(paras)
    return paras if n is None else paras[:n]


def _read_file(path: str, field: str) -> list[str]:
    """A local path or an fsspec URL (http(s)://, s3://, ...); every way it can fail is one line naming the file
    (redacted: a URL may carry a token in its query)."""
    import fsspec

    name = f"data.prompts_file {redact(path)}"
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          "save it as UTF-8") from None
    except ImportError as exc:  # e.g. http(s):// needs aiohttp, s3:// needs s3fs
        raise ConfigError(f"{name}: cannot open this kind of URL ({exc})") from None
    except Exception as exc:  # permissions, HTTP errors, unreachable hosts: each filesystem raises its own types
        root = _root_cause(exc)
        if isinstance(root, FileNotFoundError):
            raise ConfigError(f"{name}: not found") from None
        raise ConfigError(f"{name}: cannot be read ({type(root).__name__}: {redact(_first_line(root))})") from None
    if path.split("?", 1)[0].endswith(".jsonl"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{name}: line {i} is not a JSON object with a '{field}' field") from None
    else:
        texts = raw.splitlines()
    return [t for t in texts if isinstance(t, str) and t.strip()]


def _root_cause(exc: BaseException) -> BaseException:
    """fsspec's http reports a refused connection as FileNotFoundError; the reason is at the chain's end."""
    while (nxt := exc.__cause__ or exc.__context__) is not None and nxt is not exc:
        exc = nxt
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _read_hf(conf: DataConf) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.hf_dataset needs the `datasets` package (pip install 'lensflow[hf]')") from None
    name, _, subset = conf.hf_dataset.partition(":")
    ds = datasets.load_dataset(name, subset or None, split=conf.hf_split, streaming=True)
    out = []
    for row in ds:
        text = row.get(conf.text_field)
        if isinstance(text, str) and text.strip():
            out.append(text)
        if conf.max_prompts and len(out) >= conf.max_prompts:
            break
    return out


def load_prompts(conf: DataConf) -> list[str]:
    """The prompts a flow works on, capped at data.max_prompts; an empty source is an error, not an empty run."""
    if conf.prompts_file:
        texts, source = _read_file(conf.prompts_file, conf.text_field), f"data.prompts_file {redact(conf.prompts_file)}"
    elif conf.hf_dataset:
        texts, source = _read_hf(conf), f"data.hf_dataset {conf.hf_dataset}"
    else:
        texts, source = builtin_texts(seed=conf.seed), "the built-in text set"
    if not texts:
        raise ConfigError(f"{source}: no prompts (the file is empty or has only blank lines)")
    return texts[: conf.max_prompts] if conf.max_prompts else texts


def check_prompts(conf: Config) -> None:
    """The input check of every flow that reads data.*: the prompts load (one line naming the file if not)."""
    load_prompts(conf.data)
