"""Cross-language feature overlap (Anthropic 2025, "On the Biology of a Large Language Model", multilingual circuits).

For a paragraph and its translation, take the set of features active anywhere in each (any real token; padding is
never a token, and the first token is dropped by default because the BOS / attention-sink position is the same
in every text and would put the same features into every set). Overlap is the Jaccard index |A & B| / |A | B|,
averaged over paragraphs. The baseline is the same number for unrelated paragraphs of the same two languages
(paragraph i against paragraph perm[i] with perm a fixed derangement), which absorbs what any two texts share
(frequent function-word features, features of the language pair's scripts). A translated-minus-unrelated gap that
rises in the middle layers is the paper's "shared multilingual features" picture.

Two feature bases: SAE latents (`tasks.sae`, measured here per layer in one Ray remote call after the layer's SAE)
and raw MLP neurons (`tasks.neurons`), the latter so the result does not rest on one trained dictionary.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.core.store import Activations
from lensflow.tasks.multilingual.sae import (
    SAEJob,
    SAEMetrics,
    SparseAutoencoder,
    evaluate,
    token_blocks,
    token_mask,
    train_sae,
)

VERSION = 1  # of the overlap measurement: part of the overlap stage key


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise |a & b| / |a | b| of two bool [n, F] matrices; rows where both sets are empty give nan."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation with no fixed point (perm[i] != i for all i), fixed by the seed."""
    if n < 2:
        raise ValueError(f"an unrelated-paragraph baseline needs at least 2 paragraphs, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def parse_pairs(languages: list[str], pairs: list[str] | None) -> list[tuple[str, str]]:
    """The pairs choice: 'en-fr' strings -> (a, b) tuples; None = every unordered pair of `languages` in order."""
    if pairs is None:
        return list(itertools.combinations(languages, 2))
    out = []
    for p in pairs:
        a, sep, b = p.partition("-")
        if not sep or a not in languages or b not in languages or a == b:
            raise ConfigError(f"config key 'multilingual.pairs': '{p}' is not LANG-LANG over languages {languages}")
        out.append((a, b))
    return out


@dataclass(frozen=True)
class PairOverlap:
    """Mean Jaccard overlap of one language pair: translations (A_i, B_i), unrelated (A_i, B_perm[i])."""

    translated: float
    unrelated: float
    gap_se: float  # standard error of the paired difference translated - unrelated

    @property
    def gap(self) -> float:
        return self.translated - self.unrelated


@dataclass(frozen=True)
class LayerOverlap:
    """Active-set overlaps at one depth (a resid layer for SAE features, a block for MLP neurons)."""

    layer: int
    pairs: dict[str, PairOverlap]  # 'en-fr' -> overlap
    size: dict[str, float]  # language -> mean active-set size per paragraph

    @property
    def gap(self) -> float:
        """Translated minus unrelated, mean over pairs: the number the peak layer is chosen by."""
        return float(np.mean([p.gap for p in self.pairs.values()]))


def pair_overlaps(sets: Mapping[str, np.ndarray], pairs: list[tuple[str, str]],
                  perm: np.ndarray) -> dict[str, PairOverlap]:
    """{'en-fr': overlap} from per-language bool [n, F]. The gap is paired by paragraph i (same A_i on both sides),
    so its standard error says whether a small gap is more than paragraph-to-paragraph noise."""
    out = {}
    for a, b in pairs:
        t, u = jaccard(sets[a], sets[b]), jaccard(sets[a], sets[b][perm])
        d = (t - u)[np.isfinite(t - u)]
        out[f"{a}-{b}"] = PairOverlap(float(np.nanmean(t)), float(np.nanmean(u)),
                                      float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"))
    return out


def layer_overlap(layer: int, sets: Mapping[str, np.ndarray], pairs: list[tuple[str, str]],
                  perm: np.ndarray) -> LayerOverlap:
    return LayerOverlap(layer, pair_overlaps(sets, pairs, perm), {l: float(x.sum(1).mean()) for l, x in sets.items()})


def active_sets(codes: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, threshold: float | np.ndarray = 0.0) -> np.ndarray:
    """bool [n, F]: feature f is active in text i if codes[i, t, f] > threshold at any masked-in token t."""
    c = torch.as_tensor(codes)
    m = (mask if torch.is_tensor(mask) else torch.from_numpy(np.asarray(mask))).to(device=c.device, dtype=torch.bool)
    thr = torch.tensor(threshold, dtype=c.dtype, device=c.device)  # a copy: arrays from Ray are read-only
    return ((c > thr) & m[..., None]).any(1).cpu().numpy()


@torch.no_grad()
def sae_active_sets(sae: SparseAutoencoder, acts: Activations, layer: int, skip_first: bool, batch_rows: int = 32) -> np.ndarray:
    """Per-text SAE feature sets of one stored layer (positions=all), streamed: bool [n, width]."""
    out, start = [], 0
    for block in acts.iter_layer(layer, batch_rows):
        mask = token_mask(acts.token_ids[start:start + block.shape[0]], skip_first)
        device = sae.W_dec.device
        z = torch.zeros(*mask.shape, sae.width, device=device)
        z[torch.from_numpy(mask).to(device)] = sae.encode(torch.from_numpy(block[mask]).to(device))
        out.append(active_sets(z, mask))
        start += block.shape[0]
    return np.concatenate(out)


def overlap_stage(root: str, sae: Stage, paragraph_keys: Mapping[str, str], pairs: list[tuple[str, str]],
                  seed: int) -> Stage:
    """Where per-layer SAE overlaps live: keyed by the SAE stage, the paragraph stores ({lang: store key}), the
    pairs and the seed of the unrelated-paragraph permutation; one item `layer_XX` per resid layer."""
    params = {"pairs": [f"{a}-{b}" for a, b in pairs], "seed": seed, "languages": list(paragraph_keys)}
    inputs = [sae.key, *paragraph_keys.values()]
    return Stage.of(root, "multilingual/overlap", None, params, inputs, version=VERSION)


@dataclass(frozen=True)
class OverlapJob:
    """Ray remote unit for one layer: its SAE (found or trained), then the overlaps on the stored paragraphs."""

    sae: SAEJob
    stage: Stage  # overlap_stage
    paragraphs: dict[str, str]  # language -> store URL of its paragraphs (positions=all, the same layers)
    pairs: list[tuple[str, str]]
    perm: list[int]


@dataclass(frozen=True)
class SAELayerResult:
    """One resid layer of the SAE analysis, and what this run computed for it."""

    layer: int
    sae: SAEMetrics  # held-out general text
    fve_lang: dict[str, float]  # FVE on each language's measured paragraphs, which the SAE never trained on
    overlap: LayerOverlap
    sae_stage: Stage  # where the SAE is published (item `layer_LL`): the report logs it from there
    trained: bool  # the SAE was trained by this run
    measured: bool  # the overlaps were measured by this run


def sae_layer(job: OverlapJob) -> SAELayerResult:
    """Ray remote body: the layer's SAE (train_sae), then its overlaps, each found in the store or computed and
    published there."""
    found = train_sae(job.sae)
    item, measured = job.stage.get_or_compute(job.sae.item, lambda: _measure(found.sae, job))
    pairs = {p: PairOverlap(**v) for p, v in item.meta["pairs"].items()}
    overlap = LayerOverlap(job.sae.layer, pairs, item.meta["size"])
    return SAELayerResult(job.sae.layer, found.metrics, item.meta["fve_lang"], overlap, job.sae.stage, found.trained,
                          measured)


def _measure(sae: SparseAutoencoder, job: OverlapJob) -> Item:
    layer, skip = job.sae.layer, job.sae.skip_first
    sets, fve = {}, {}
    for lang, url in job.paragraphs.items():
        acts = Activations(url)
        sets[lang] = sae_active_sets(sae, acts, layer, skip, acts.chunk_rows)
        fve[lang] = evaluate(sae, token_blocks(acts, layer, slice(0, acts.n), acts.chunk_rows, skip))["fve"]
    overlap = layer_overlap(layer, sets, job.pairs, np.asarray(job.perm))
    return Item(meta={"pairs": {p: asdict(v) for p, v in overlap.pairs.items()}, "size": overlap.size, "fve_lang": fve})
