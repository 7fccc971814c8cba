"""Aligned parallel paragraphs: line i of every language file is the same paragraph, translated.

The shipped corpus lives in tasks/data/parallel/{lang}.txt; users point `multilingual.files` at their own aligned
files ({en: path, fr: path}). Alignment is only checkable by line count and non-empty lines, so both are enforced:
a single blank or missing line would silently pair every later paragraph with the wrong translation.
"""

from __future__ import annotations

from pathlib import Path

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.data import DATA_DIR

CORPUS_DIR = DATA_DIR / "parallel"


def _read(lang: str, path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"multilingual.files.{lang}: file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"multilingual.files.{lang}: {path} is not UTF-8 text") from None
    while lines and not lines[-1].strip():  # a trailing newline or blank tail is not a paragraph
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ConfigError(f"multilingual.files.{lang}: {path} line {blank[0]} is empty (one paragraph per line, aligned by line)")
    return [line.strip() for line in lines]


def load_parallel(languages: list[str], files: dict[str, str] | None = None,
                  max_paragraphs: int | None = None) -> dict[str, list[str]]:
    """{lang: paragraphs}, all the same length and aligned by index; files=None reads the shipped corpus."""
    if len(languages) < 2:
        raise ConfigError(f"multilingual.languages: need at least two languages, got {languages}")
    paths: dict[str, Path] = {}
    for lang in languages:
        if files is not None:
            if lang not in files:
                raise ConfigError(f"multilingual.files: no file for language '{lang}' (given: {', '.join(files) or 'none'})")
            paths[lang] = Path(files[lang])
        else:
            paths[lang] = CORPUS_DIR / f"{lang}.txt"
    corpus = {lang: _read(lang, p) for lang, p in paths.items()}
    ref = languages[0]
    n = len(corpus[ref])
    for lang in languages[1:]:
        if len(corpus[lang]) != n:
            raise ConfigError(f"multilingual.files.{lang}: {paths[lang]} has {len(corpus[lang])} paragraphs but "
                              f"{paths[ref]} has {n}; parallel files must be aligned line by line")
    if n < 2:
        raise ConfigError(f"multilingual.files.{ref}: {paths[ref]} has {n} paragraphs; the unrelated baseline needs at least 2")
    if max_paragraphs is not None:
        corpus = {lang: paras[:max_paragraphs] for lang, paras in corpus.items()}
    return corpus
