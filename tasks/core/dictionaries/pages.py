"""Feature pages: what a dictionary feature responds to and what it writes, as self-contained HTML people can read.

Shared by every experiment that reads a model through a dictionary (multilingual overlap, circuits), so the artifact
layout is fixed here and nowhere else: `features/index.html` and one page per feature at
`features/layer_{LL:02d}/feature_{id:05d}.html` (`page_path`); an attribution graph links its nodes there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROOT = "features"  # the artifact folder every page lives under
INDEX = f"{ROOT}/index.html"


def page_path(layer: int, feature: int) -> str:
    """A feature's page relative to the run's artifact root: `features/layer_05/feature_00042.html`."""
    return f"{ROOT}/layer_{layer:02d}/feature_{feature:05d}.html"


def page_href(layer: int, feature: int, from_page: str = INDEX) -> str:
    """The relative link to a feature's page from another page of the layout (the index, or a feature page)."""
    depth = from_page.count("/") - ROOT.count("/") - 1  # folders below `features/` the linking page sits in
    return "../" * depth + page_path(layer, feature).removeprefix(f"{ROOT}/")


@dataclass(frozen=True)
class Context:
    """One text around a feature's strongest token in it: the tokens shown, each one's activation, and which one
    peaked (`peak`, an index into `tokens`)."""

    source: str  # the text's language (or store label)
    row: int  # the text's row in its store
    position: int  # the peak token's position in the text
    value: float  # the feature's activation there
    tokens: list[str]
    acts: list[float]
    peak: int


@dataclass(frozen=True)
class LanguageProfile:
    """How a feature fires on one language's texts: over every real token of them."""

    tokens: int  # real tokens seen
    firing_rate: float  # fraction of those tokens where the feature is active
    mean_activation: float  # mean activation over all of those tokens (zeros included)
    mass_share: float  # this language's share of the feature's total activation mass (a per-token rate, see below)


@dataclass(frozen=True)
class FeaturePage:
    layer: int
    feature: int
    kind: str  # "multilingual", "specific:<lang>" or "dense": which list of the index it is in
    density: float  # fraction of all real tokens (every language) where it is active
    profile: dict[str, LanguageProfile]
    contexts: list[Context]
    top_tokens: list[tuple[str, float]]  # promoted through decoder x unembedding (logit effect), highest first
    bottom_tokens: list[tuple[str, float]] = field(default_factory=list)  # suppressed, lowest first


@dataclass(frozen=True)
class LayerPages:
    """The pages of one layer's dictionary: which features were chosen and their data."""

    layer: int
    dictionary: str  # "sae", "transcoder", ...: what the index says the features belong to
    width: int
    dead: float  # fraction of features never active on the texts
    pages: list[FeaturePage]
