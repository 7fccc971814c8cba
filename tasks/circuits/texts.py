"""What the circuits experiment reads: the transcoders' training texts and the prompts it draws graphs of."""

from __future__ import annotations

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.data import DATA_DIR
from lensflow.tasks.data.antonym_set import load_antonyms, prompt, synonym_prompt


def parallel_paragraphs(language: str, n: int) -> list[str]:
    """The first n paragraphs of the shipped parallel corpus in one language (tasks/data/parallel/{lang}.txt)."""
    path = DATA_DIR / "parallel" / f"{language}.txt"
    if not path.is_file():
        raise ConfigError(f"circuits.languages: no parallel corpus file {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def training_texts(languages: list[str], per_language: int) -> list[str]:
    """Parallel paragraphs in every language, interleaved (so the held-out tail covers every language), then the
    antonym and synonym prompts of the shipped set: the transcoders must read the prompts that graphs explain."""
    paras = [parallel_paragraphs(lang, per_language) for lang in languages]
    texts = [p[i] for i in range(per_language) for p in paras if i < len(p)]
    pairs = load_antonyms(languages)
    prompts = [f(lang, pair.entries[lang].word) for pair in pairs for lang in languages for f in (prompt, synonym_prompt)]
    return prompts + texts  # the held-out share is the corpus tail


def graph_prompts(languages: list[str], n_pairs: int, prompts: list[str] | None = None) -> list[str]:
    if prompts is not None:
        return prompts
    pairs = load_antonyms(languages)[:n_pairs]
    return [prompt(lang, pair.entries[lang].word) for pair in pairs for lang in languages]
