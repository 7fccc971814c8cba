"""ICL tasks (in-context-learning tasks: input -> output word pairs): loading, seeded splits and prompt rendering.

Built-in ICL tasks ship as package data (tasks/data/icl/<name>.json, a JSON list of {"input", "output"});
users add their own with extra files or folders of such files (`function_vectors.icl_task_paths`). A prompt is
`n_shots` demonstrations followed by a query; the model's answer is scored on the first token of the answer
continuation that is not whitespace alone (`scored_prompt`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.stages import digest
from lensflow.tasks.core.tokens import answer_token
from lensflow.tasks.data import DATA_DIR

Pair = tuple[str, str]


def builtin_icl_task_dir():
    return DATA_DIR / "icl"


def available_icl_tasks(extra_paths: list[str] = ()) -> dict[str, object]:
    """ICL task name -> file (a Traversable or Path). A user file overrides a built-in one of the same name."""
    found: dict[str, object] = {p.name[:-5]: p for p in builtin_icl_task_dir().iterdir() if p.name.endswith(".json")}
    for raw in extra_paths:
        path = Path(raw)
        if path.is_dir():
            found.update({p.stem: p for p in sorted(path.glob("*.json"))})
        elif path.is_file() and path.suffix == ".json":
            found[path.stem] = path
        else:
            raise ConfigError(f"function_vectors.icl_task_paths: '{raw}' is neither a folder nor a .json file")
    return dict(sorted(found.items()))


def load_pairs(name: str, extra_paths: list[str] = ()) -> list[Pair]:
    known = available_icl_tasks(extra_paths)
    if name not in known:
        raise ConfigError(f"function_vectors.icl_tasks: unknown ICL task '{name}' (known: {', '.join(known)})")
    try:
        rows = json.loads(known[name].read_text(encoding="utf-8"))
        pairs = [(str(r["input"]), str(r["output"])) for r in rows]
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"ICL task '{name}': expected a JSON list of {{\"input\", \"output\"}} objects ({exc})"
        raise ConfigError(msg) from None
    if len(pairs) < 4:
        raise ConfigError(f"ICL task '{name}': needs at least 4 pairs, has {len(pairs)}")
    return pairs


def pairs_digest(pairs: list[Pair]) -> str:
    """Content hash of pairs, a stage parameter in place of the pairs a stage reads."""
    return digest([json.dumps(p) for p in pairs])


@dataclass(frozen=True)
class Split:
    """Disjoint parts of one ICL task: train gives demonstrations and the patching's queries, valid the layer choice
    (`function_vectors.layer=auto`), test the reported accuracies."""

    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]


def split(pairs: list[Pair], seed: int, valid: float = 0.15, test: float = 0.15) -> Split:
    """Seeded shuffle, then test / valid / train; every part keeps at least one pair."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(1, round(n * test))
    n_valid = max(1, round(n * valid))
    return Split(train=order[n_test + n_valid:], valid=order[n_test:n_test + n_valid], test=order[:n_test])


@dataclass(frozen=True)
class Template:
    """A demonstration is query + answer + separator; the prompt ends with a bare query."""

    query: str  # function_vectors.query_template, answer_template, separator
    answer: str
    separator: str

    def demo(self, pair: Pair) -> str:
        return self.query.format(input=pair[0]) + self.answer.format(output=pair[1]) + self.separator

    def prompt(self, demos: list[Pair], query: str) -> str:
        return "".join(self.demo(d) for d in demos) + self.query.format(input=query)

    def continuation(self, output: str) -> str:
        return self.answer.format(output=output)


def demonstrations(train: list[Pair], n_shots: int, rng: random.Random, exclude: str | None = None,
                   shuffle_labels: bool = False) -> list[Pair]:
    """`n_shots` distinct training pairs (never the query itself); with shuffle_labels the outputs are
    permuted among the demonstrations, which breaks the input -> output mapping but keeps the label set."""
    pool = [p for p in train if p[0] != exclude]
    demos = rng.sample(pool, min(n_shots, len(pool)))
    if shuffle_labels and len(demos) > 1:
        outs = [d[1] for d in demos]
        for _ in range(10):  # a derangement is not required, only a broken mapping; retry a few identity draws
            rng.shuffle(outs)
            if any(o != d[1] for o, d in zip(outs, demos)):
                break
        demos = [(d[0], o) for d, o in zip(demos, outs)]
    return demos


def scored_prompt(tokenizer, prompt: str, continuation: str) -> tuple[str, int]:
    """The prompt to score and the answer token the model must produce after it: (prompt, answer_token) unless
    the continuation's first tokens are whitespace alone. SmolLM2 and Llama split digits (" 72" is " ", "7", "2"),
    and scoring that bare space would count every numeric answer right; the whitespace then ends the prompt, and
    the first other token is scored."""
    p = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + continuation)["input_ids"]
    if len(full) <= len(p) or full[: len(p)] != p:
        return prompt, answer_token(tokenizer, prompt, continuation)
    i = len(p)
    while i < len(full) - 1 and not tokenizer.decode([full[i]]).strip():
        i += 1
    space = tokenizer.decode(full[len(p):i])
    if i == len(p) or tokenizer(prompt + space)["input_ids"] != full[:i]:
        return prompt, full[len(p)]
    return prompt + space, full[i]
