"""Facts for causal tracing: the shipped set or a user's JSONL, tokenised, and the filter for facts the model knows.

A fact is a prompt that ends where its answer starts ("The Eiffel Tower is located in the city of" -> " Paris"),
the subject inside it (the tokens that get corrupted) and a relation name (for counts and balanced selection).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import digest
from lensflow.tasks.core.tokens import answer_token
from lensflow.tasks.data import DATA_DIR

FACTS_FILE = DATA_DIR / "facts" / "facts.jsonl"


@dataclass(frozen=True)
class Fact:
    prompt: str
    subject: str  # a substring of the prompt: its tokens are the ones corrupted
    target: str  # the answer's continuation (" Paris"); its first token is scored
    relation: str = ""

    @property
    def key(self) -> str:
        """Names the fact's trace item and seeds its noise: a fact keeps its trace in any fact set, in any order."""
        return digest([self.prompt, self.subject, self.target])[:16]


def load_facts(path: str | None = None) -> list[Fact]:
    """The shipped facts (path None) or a JSONL file / fsspec URL of {"prompt", "subject", "target"[, "relation"]};
    duplicates are dropped. Every problem is one line naming the file and line, raised before any work starts."""
    import fsspec

    source = str(FACTS_FILE if path is None else path)
    name = f"causal_trace.facts_file {source}"
    try:
        with fsspec.open(source, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{name}: not found") from None
    except (OSError, UnicodeDecodeError, ImportError) as exc:
        raise ConfigError(f"{name}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    facts: dict[Fact, None] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            fact = Fact(row["prompt"], row["subject"], row["target"], str(row.get("relation", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f'{name}: line {i} is not a JSON object with "prompt", "subject" and "target"') from None
        if not all(isinstance(x, str) and x.strip() for x in (fact.prompt, fact.subject, fact.target)):
            raise ConfigError(f"{name}: line {i}: prompt, subject and target must be non-empty strings")
        if fact.subject not in fact.prompt:
            raise ConfigError(f"{name}: line {i}: subject {fact.subject!r} does not occur in the prompt")
        facts[fact] = None
    if not facts:
        raise ConfigError(f"{name}: no facts")
    return list(facts)


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    start: int  # subject tokens are ids[start:end]
    end: int
    target: int  # the scored answer token


def encode_fact(tokenizer, fact: Fact) -> Encoded:
    """Token ids, the subject's span (the tokens whose characters overlap the subject's first occurrence) and the
    answer token."""
    enc = tokenizer(fact.prompt, return_offsets_mapping=True)
    a = fact.prompt.index(fact.subject)
    b = a + len(fact.subject)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < b and e > a]
    return Encoded(list(enc["input_ids"]), inside[0], inside[-1] + 1, answer_token(tokenizer, fact.prompt, fact.target))


@torch.no_grad()
def answers(lm: LM, facts: list[Fact]) -> list[bool]:
    """Actor side: whether the model's greedy next token is each fact's answer token (one batch)."""
    enc = lm.encode([f.prompt for f in facts])
    h = lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    greedy = lm.unembed(h[torch.arange(len(facts), device=h.device), enc["last"]]).argmax(-1).tolist()
    return [g == answer_token(lm.tokenizer, f.prompt, f.target) for g, f in zip(greedy, facts)]


@dataclass(frozen=True)
class Known:
    """The facts to trace, and how many the model answered right, overall and per relation."""

    facts: list[Fact]
    n_facts: int
    n_correct: int
    per_relation: dict[str, tuple[int, int]]  # relation -> (answered right, total)


def select_known(facts: list[Fact], correct: list[bool], filter_correct: bool, max_facts: int | None) -> Known:
    """Keep the facts the model answers right (all of them when filter_correct is off), then at most max_facts
    taken round-robin over relations in file order, so a cap keeps every relation in the average."""
    by_rel: dict[str, list[Fact]] = defaultdict(list)
    for f, ok in zip(facts, correct):
        if ok or not filter_correct:
            by_rel[f.relation].append(f)
    chosen: list[Fact] = []
    queues = [list(q) for q in by_rel.values()]
    while any(queues) and (max_facts is None or len(chosen) < max_facts):
        for q in queues:
            if q and (max_facts is None or len(chosen) < max_facts):
                chosen.append(q.pop(0))
    if not chosen:
        raise ConfigError(f"causal_trace: the model answers none of the {len(facts)} facts right; give other facts "
                          "(causal_trace.facts_file) or trace them all (causal_trace.filter_correct=false)")
    totals, rights = Counter(f.relation for f in facts), Counter(f.relation for f, ok in zip(facts, correct) if ok)
    return Known(chosen, len(facts), sum(correct), {r: (rights[r], totals[r]) for r in totals})
