"""Cross-language feature overlap (Anthropic 2025, "On the Biology of a Large Language Model", multilingual circuits).

For a paragraph and its translation, take the set of features active anywhere in each (any real token; padding is
never a token, and the first token is dropped by default because the BOS / attention-sink position is the same
in every text and would put the same features into every set). Overlap is the Jaccard index |A & B| / |A | B|,
averaged over paragraphs. The baseline is the same number for unrelated paragraphs of the same two languages
(paragraph i against paragraph perm[i] with perm a fixed derangement), which absorbs what any two texts share
(frequent function-word features, features of the language pair's scripts). A translated-minus-unrelated gap that
rises in the middle layers is the paper's "shared multilingual features" picture.

Two feature bases: SAE latents (`tasks.sae`) and raw MLP neurons (site mlp_neurons), the latter so the result does
not rest on one trained dictionary. Neuron activations are large; they are reduced to per-paragraph active sets on
the model actor and only booleans come back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lensflow.tasks.hooks import Read, trace
from lensflow.tasks.models import LM
from lensflow.tasks.sae import LayerJob, SparseAutoencoder, evaluate, token_blocks, token_mask, train_layer
from lensflow.tasks.store import Activations


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
    """'en-fr' strings -> (a, b) tuples; None = every unordered pair of `languages` in their order."""
    if pairs is None:
        return list(itertools.combinations(languages, 2))
    out = []
    for p in pairs:
        a, sep, b = p.partition("-")
        if not sep or a not in languages or b not in languages or a == b:
            raise ValueError(f"multilingual.pairs: '{p}' is not LANG-LANG over languages {languages}")
        out.append((a, b))
    return out


def pair_overlaps(sets: dict[str, np.ndarray], pairs: list[tuple[str, str]], perm: np.ndarray) -> dict[str, dict[str, float]]:
    """{'en-fr': {'translated': mean J(A_i, B_i), 'unrelated': mean J(A_i, B_perm[i]), 'gap_se': standard error of
    the paired difference}} from per-language bool [n, F]. The gap is paired by paragraph i (same A_i on both sides),
    so its standard error says whether a small gap is more than paragraph-to-paragraph noise."""
    out = {}
    for a, b in pairs:
        t, u = jaccard(sets[a], sets[b]), jaccard(sets[a], sets[b][perm])
        d = (t - u)[np.isfinite(t - u)]
        out[f"{a}-{b}"] = {"translated": float(np.nanmean(t)), "unrelated": float(np.nanmean(u)),
                           "gap_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")}
    return out


def active_sets(codes: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, threshold: float | np.ndarray = 0.0) -> np.ndarray:
    """bool [n, F]: feature f is active in text i if codes[i, t, f] > threshold at any masked-in token t."""
    c = torch.as_tensor(codes)
    m = (mask if torch.is_tensor(mask) else torch.from_numpy(np.asarray(mask))).to(device=c.device, dtype=torch.bool)
    thr = torch.as_tensor(threshold, dtype=c.dtype, device=c.device)
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


@dataclass(frozen=True)
class NeuronJob:
    texts: list[str]
    blocks: list[int]
    max_tokens: int
    skip_first: bool
    thresholds: dict[int, np.ndarray] | None = None  # per block: scalar or per-neuron [F]; None with `quantile`
    quantile: float | None = None


def _neuron_acts(lm: LM, job: NeuronJob) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    enc = lm.encode(job.texts, max_tokens=job.max_tokens)
    with trace(lm, reads=[Read("mlp_neurons", b) for b in job.blocks], stop_at=max(job.blocks) + 1) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    mask = enc["attention_mask"].bool()
    if job.skip_first:
        mask[:, 0] = False
    return {b: t["mlp_neurons", b].float() for b in job.blocks}, mask


@torch.inference_mode()
def neuron_quantiles(lm: LM, job: NeuronJob) -> dict[int, np.ndarray]:
    """Actor side: per-neuron activation quantile over the job's real tokens, per block (calibrates 'active')."""
    acts, mask = _neuron_acts(lm, job)
    k = max(1, int(np.ceil(job.quantile * int(mask.sum()))))  # kthvalue: torch.quantile caps its input at 2^24
    return {b: a[mask].kthvalue(k, dim=0).values.cpu().numpy() for b, a in acts.items()}


@torch.inference_mode()
def neuron_active_sets(lm: LM, job: NeuronJob) -> dict[int, np.ndarray]:
    """Actor side: per-text sets of MLP neurons above threshold at any real token, bool [n, F] per block."""
    acts, mask = _neuron_acts(lm, job)
    return {b: active_sets(a, mask, job.thresholds[b]) for b, a in acts.items()}


@dataclass(frozen=True)
class SAELayerJob:
    """Ray-task unit: train (or reuse) one layer's SAE, then measure overlap on the stored parallel paragraphs."""

    train: LayerJob
    paragraphs: dict[str, str]  # language -> store group URL of its paragraphs (positions=all, same layers)
    pairs: list[tuple[str, str]]
    perm: list[int]


def sae_layer(job: SAELayerJob) -> dict:
    """{layer, sae: {fve, l0, dead, ...}, fve_lang: {lang: fve}, size: {lang: mean set size}, overlap: {pair: ...}}."""
    sae, metrics = train_layer(job.train)
    layer, skip = job.train.layer, job.train.skip_first
    sets, fve = {}, {}
    for lang, url in job.paragraphs.items():
        acts = Activations(url)
        sets[lang] = sae_active_sets(sae, acts, layer, skip, acts.chunk_rows)
        fve[lang] = evaluate(sae, token_blocks(acts, layer, slice(0, acts.n), acts.chunk_rows, skip))["fve"]
    return {"layer": layer, "sae": metrics, "fve_lang": fve, "size": {l: float(s.sum(1).mean()) for l, s in sets.items()},
            "overlap": pair_overlaps(sets, job.pairs, np.asarray(job.perm))}
