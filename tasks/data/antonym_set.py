"""The shipped antonym prompt set (tasks/data/antonyms/antonyms.jsonl): adjectives with their antonyms and a synonym
in five languages, the seed's zero-shot prompt per language, and how an answer is cut and judged. Data reading only:
the multilingual experiment (which pairs a model answers) and circuits (interventions on them) both read it here,
so neither imports the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


# The same zero-shot shape asking for a synonym: the target of the circuits experiment's operation swap (suppress
# antonym features, inject synonym features) and the prompts its synonym features are read from.
SYNONYM_TEMPLATES = {
    "en": 'A synonym of "{}" is "',
    "fr": 'Un synonyme de "{}" est "',
    "es": 'Un sinónimo de "{}" es "',
    "de": 'Ein Synonym von "{}" ist "',
    "zh": '"{}"的同义词是"',
}


def synonym_prompt(lang: str, word: str) -> str:
    return SYNONYM_TEMPLATES[lang].format(word)
