"""Text inputs: the built-in natural-text set, user prompt files (.txt / .jsonl) and Hugging Face datasets."""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache

from lensflow.tasks.config import ConfigError, DataConf


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
    import fsspec

    with fsspec.open(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    if path.endswith(".jsonl"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"data.prompts_file {path}: line {i} is not a JSON object with a '{field}' field") from None
    else:
        texts = raw.splitlines()
    return [t for t in texts if isinstance(t, str) and t.strip()]


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
        texts, source = _read_file(conf.prompts_file, conf.text_field), f"data.prompts_file {conf.prompts_file}"
    elif conf.hf_dataset:
        texts, source = _read_hf(conf), f"data.hf_dataset {conf.hf_dataset}"
    else:
        texts, source = builtin_texts(seed=conf.seed), "the built-in text set"
    if not texts:
        raise ConfigError(f"{source}: no prompts (the file is empty or has only blank lines)")
    return texts[: conf.max_prompts] if conf.max_prompts else texts
