"""The antonym prompt set (tasks/data/antonyms/antonyms.jsonl): adjectives with their antonyms and a synonym in
every language of the multilingual experiment, and which of them a model answers right.

The seed's zero-shot prompt per language (`TEMPLATES`, e.g. `The opposite of "small" is "`) is completed greedily
with plain forwards of the Hugging Face model (no hooks, no cache); the answer is the text before the closing
quote, and it is right when it equals one of the accepted antonyms (case-folded). Pairs a model gets wrong are
dropped for that model and language, so a later circuit analysis only explains behaviour the model has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.data import DATA_DIR

ANTONYMS_FILE = DATA_DIR / "antonyms" / "antonyms.jsonl"
TEMPLATES = {
    "en": 'The opposite of "{}" is "',
    "fr": 'Le contraire de "{}" est "',
    "es": 'El contrario de "{}" es "',
    "de": 'Das Gegenteil von "{}" ist "',
    "zh": '"{}"的反义词是"',
}
QUOTES = ('"', "“", "”", "」", "»")


@dataclass(frozen=True)
class Entry:
    """One adjective in one language."""

    word: str
    antonyms: tuple[str, ...]  # accepted answers, the canonical one first
    synonym: str


@dataclass(frozen=True)
class AntonymPair:
    id: str  # the English word
    entries: dict[str, Entry]  # language -> entry


def load_antonyms(languages: list[str], path: str | Path | None = None) -> list[AntonymPair]:
    """Every pair of the file, each with an entry for every requested language; a line missing one is an error
    naming the file and line, never a silently shorter set."""
    p = Path(path) if path is not None else ANTONYMS_FILE
    unknown = [lang for lang in languages if lang not in TEMPLATES]
    if unknown:
        raise ConfigError(f"antonym languages: no prompt template for {unknown} (known: {', '.join(TEMPLATES)})")
    if not p.is_file():
        raise ConfigError(f"antonyms file not found: {p}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            entries = {lang: Entry(rec[lang]["word"], tuple(rec[lang]["antonyms"]), rec[lang]["synonym"])
                       for lang in languages}
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{p} line {n}: not an antonym record with {languages} ({exc!r})") from None
        if any(not e.antonyms for e in entries.values()):
            raise ConfigError(f"{p} line {n}: an entry without antonyms")
        out.append(AntonymPair(rec.get("id", entries[languages[0]].word), entries))
    return out


def prompt(lang: str, word: str) -> str:
    return TEMPLATES[lang].format(word)


PUNCT = ".,;:!?。，；：！？、"


def answer_of(text: str) -> str:
    """The completion up to its closing quote (or newline), stripped of spaces and of trailing punctuation that
    English style puts inside the quote (Gemma answers `is "large."`)."""
    cut = min([i for q in (*QUOTES, "\n") if (i := text.find(q)) >= 0], default=len(text))
    return text[:cut].strip().rstrip(PUNCT).strip()


def is_right(answer: str, entry: Entry) -> bool:
    return answer.casefold() in {a.casefold() for a in entry.antonyms}


@torch.no_grad()
def greedy(model, tokenizer, text: str, max_new_tokens: int = 6) -> str:
    """Greedy continuation of `text` by plain full forwards (the prompts are short), decoded."""
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        out = tokenizer.decode(ids[0, start:], skip_special_tokens=True)
        if any(q in out for q in (*QUOTES, "\n")):
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


@dataclass(frozen=True)
class Survival:
    """Which pairs one model answers right in one language."""

    language: str
    kept: list[str]  # pair ids
    answers: dict[str, str]  # pair id -> the model's answer

    @property
    def n(self) -> int:
        return len(self.kept)


def survival(model, tokenizer, pairs: list[AntonymPair], languages: list[str],
             max_new_tokens: int = 6) -> dict[str, Survival]:
    """{language: the pairs the model answers right}."""
    out = {}
    for lang in languages:
        answers = {p.id: answer_of(greedy(model, tokenizer, prompt(lang, p.entries[lang].word), max_new_tokens))
                   for p in pairs}
        kept = [p.id for p in pairs if is_right(answers[p.id], p.entries[lang])]
        out[lang] = Survival(lang, kept, answers)
    return out


def main() -> None:  # python -m lensflow.tasks.multilingual.antonyms smollm2-135m gemma3-270m
    import sys

    from lensflow.tasks.core.config import ModelConf
    from lensflow.tasks.core.models import load_model

    langs = list(TEMPLATES)
    pairs = load_antonyms(langs)
    for name in sys.argv[1:]:
        lm = load_model(ModelConf(name=name))
        res = survival(lm.model, lm.tokenizer, pairs, langs)
        print(json.dumps({"model": name, "pairs": len(pairs), "kept": {l: r.n for l, r in res.items()},
                          "answers": {l: r.answers for l, r in res.items()}}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
