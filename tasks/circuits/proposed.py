"""Supernodes proposed from the feature pages' data, in the same structure as the user's YAML (`Supernodes`), so a
proposal can be written out, edited and given back as circuits.supernodes, and is drawn as groups like the user's.

For the features active in one graph that have a page:
  * by language profile: `multilingual` (active in every language) and `language-specific:<lang>` (firing at least
    pages.SPECIFIC_RATIO times as often on that language as on any other). The classification is not restated here:
    the pages' firing rates go through pages.choose_features itself, unbounded, so a feature lands in the group the
    feature-page index would list it under.
  * by operand: `operand:<name>` for each given word set (the same adjective in every language): the features whose
    promoted output tokens or whose top contexts' peak (activating) tokens are one of those words, in any language,
    so one group names the operand across the five languages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import yaml

from lensflow.tasks.circuits.supernodes import Supernodes
from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.dictionaries.pages import FeaturePage, FeatureStats, LayerPages, choose_features, from_dict

MIN_PIECE = 3  # a token shorter than the word counts only when it is a leading piece of at least this many characters


def _stats(pages: list[FeaturePage]) -> FeatureStats:
    """The pages' firing rates as FeatureStats (one token per source, so rate() is the page's firing rate as is)."""
    langs = sorted({s for p in pages for s in p.profile})
    rate = np.array([[p.profile[s].firing_rate if s in p.profile else 0.0 for p in pages] for s in langs])
    empty = torch.zeros(0, len(pages))
    return FeatureStats(langs, np.ones(len(langs)), rate, rate.copy(), empty, empty, empty, empty)


def by_language(pages: list[FeaturePage]) -> dict[str, list[FeaturePage]]:
    """`multilingual` and `language-specific:<lang>` groups of these pages, by pages.choose_features' own rule."""
    if not pages:
        return {}
    stats = _stats(pages)
    if len(stats.sources) < 2:
        return {}  # one language: nothing is language-specific or multilingual
    kinds = choose_features(stats, multilingual=len(pages), specific=len(pages))
    out: dict[str, list[FeaturePage]] = {}
    for i, kind in sorted(kinds.items()):
        name = "multilingual" if kind == "multilingual" else "language-specific:" + kind.split(":", 1)[1]
        out.setdefault(name, []).append(pages[i])
    return out


def _norm(token: str) -> str:
    return token.replace("\u2581", " ").strip().strip("\"'«»“”„").lower()


def matches(token: str, words: Iterable[str]) -> bool:
    """A token stands for one of the words: the same word (case, spaces and quotes aside), or a leading piece of it
    of at least MIN_PIECE characters (a word the tokenizer splits)."""
    t = _norm(token)
    if not t:
        return False
    for w in (_norm(w) for w in words):
        if t == w or (len(t) >= MIN_PIECE and w.startswith(t)):
            return True
    return False


def page_tokens(page: FeaturePage) -> list[str]:
    """The tokens a page ties the feature to: its promoted output tokens and its top contexts' peak tokens."""
    return [t for t, _ in page.top_tokens] + [c.tokens[c.peak] for c in page.contexts if 0 <= c.peak < len(c.tokens)]


def by_operand(pages: list[FeaturePage], operands: Mapping[str, list[str]]) -> dict[str, list[FeaturePage]]:
    """`operand:<name>`: the pages whose promoted or activating tokens are one of the operand's words."""
    out: dict[str, list[FeaturePage]] = {}
    for name, words in operands.items():
        found = [p for p in pages if any(matches(t, words) for t in page_tokens(p))]
        if found:
            out[f"operand:{name}"] = found
    return out


def active_pages(layers: list[LayerPages], active: Iterable[tuple[int, int]]) -> list[FeaturePage]:
    """The pages of the given (layer, feature id) pairs (a graph's active features), each once, in layer order."""
    wanted = set(active)
    return sorted((p for lp in layers for p in lp.pages if (p.layer, p.feature) in wanted),
                  key=lambda p: (p.layer, p.feature))


def graph_features(features: torch.Tensor) -> list[tuple[int, int]]:
    """A graph's active features [n, 3] (layer, position, id) as distinct (layer, id) pairs."""
    return sorted({(int(l), int(f)) for l, _, f in features.tolist()})


def propose(layers: list[LayerPages], active: Iterable[tuple[int, int]],
            operands: Mapping[str, list[str]] | None = None) -> Supernodes:
    """The proposed supernodes of one graph (its active features that have pages): language groups, then operand
    groups. A feature can be in a language group and in an operand group."""
    pages = active_pages(layers, active)
    groups = {**by_language(pages), **by_operand(pages, operands or {})}
    return {name: [(p.layer, p.feature) for p in ps] for name, ps in groups.items()}


def operand_words(pairs, languages: list[str]) -> dict[str, list[str]]:
    """Operand word sets from the antonym set: the pair's id (its English word) -> its word in every language."""
    return {pair.id: [pair.entries[lang].word for lang in languages if lang in pair.entries] for pair in pairs}


def to_yaml(supernodes: Supernodes) -> str:
    """The user-given supernode format (`name: ["layer:id", ...]`), which supernodes.load_supernodes reads back."""
    return yaml.safe_dump({name: [f"{l}:{f}" for l, f in feats] for name, feats in supernodes.items()},
                          allow_unicode=True, sort_keys=False)


def load_pages(path: str | Path) -> list[LayerPages]:
    """Page data as runs log it (`transcoders/pages.json` of a circuits run, `features/pages.json` of a multilingual
    one), refused unless it is a transcoder's: an SAE's feature ids are not the graph's nodes, and grouping them
    would name the wrong features without a sound."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"feature pages: file not found: {p}")
    try:
        layers = [from_dict(d) for d in json.loads(p.read_text(encoding="utf-8"))]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{p}: not feature page data (a list of LayerPages as JSON): {exc}") from None
    other = sorted({lp.dictionary for lp in layers} - {"transcoder"})
    if other:
        raise ConfigError(f"{p}: pages of a {'/'.join(other)} dictionary; graph nodes are transcoder features")
    return layers
