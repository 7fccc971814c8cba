"""Transcoders in the multilingual analysis: the same question as with SAEs (do translations light up the same
features?) in the basis of per-block transcoders, the replacement MLPs attribution graphs are built from.

The transcoders are the core's per-block stage (tasks/core/dictionaries/transcoder_stage.py), trained on the model
actors from each language's training paragraphs and the general text (last, so the stage's held-out texts are
general text); its items carry held-out FVE, L0, dead fraction and the spliced-in loss. Here, per block and in a
model-free Ray task: FVE of the MLP output on each language's measured paragraphs (never trained on), read from the
paragraph stores' `mlp_in` / `mlp_out` sites, and the Jaccard overlap of transcoder features active in a paragraph
and in its translation against unrelated paragraphs (tasks/multilingual/overlap.py). One item per block, keyed by
the transcoder stage, the paragraph stores, the pairs and the baseline's seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.core.store import Activations
from lensflow.tasks.multilingual.overlap import LayerOverlap, PairOverlap, active_sets, layer_overlap
from lensflow.tasks.multilingual.sae import token_blocks, token_mask

VERSION = 1  # of the per-language measurement: part of the stage key


def training_texts(sae_text: Mapping[str, list[str]], general: list[str]) -> list[str]:
    """Every language's training paragraphs, then the general text: the transcoder stage holds out its last texts,
    so its held-out metrics are on general text, as the SAEs' are."""
    return [p for paras in sae_text.values() for p in paras] + list(general)


def overlap_stage(root: str, transcoders: Stage, paragraph_keys: Mapping[str, str], pairs: list[tuple[str, str]],
                  seed: int) -> Stage:
    params = {"pairs": [f"{a}-{b}" for a, b in pairs], "seed": seed, "languages": list(paragraph_keys)}
    return Stage.of(root, "multilingual/transcoder_overlap", None, params, [transcoders.key, *paragraph_keys.values()],
                    version=VERSION)


@dataclass(frozen=True)
class TranscoderOverlapJob:
    """One block: its transcoder (an item of the core's stage) measured on the stored measured paragraphs."""

    transcoders: Stage
    stage: Stage
    block: int
    paragraphs: dict[str, str]  # language -> store URL (positions=all, sites mlp_in and mlp_out at this block)
    pairs: list[tuple[str, str]]
    perm: list[int]
    skip_first: bool

    @property
    def item(self) -> str:
        return f"layer_{self.block:02d}"


@dataclass(frozen=True)
class TranscoderLayerResult:
    block: int
    metrics: dict[str, float]  # held-out general text (the core stage's): fve, l0, dead, loss_clean, loss_spliced
    fve_lang: dict[str, float]  # FVE of the MLP output on each language's measured paragraphs
    overlap: LayerOverlap
    measured: bool  # by this run


@torch.no_grad()
def store_fve(tc: Transcoder, acts: Activations, block: int, skip_first: bool) -> float:
    """1 - SSE / total variance of the MLP output over every real token of the store, streamed in float64."""
    sse = sum_y2 = 0.0
    sum_vec, n = None, 0
    rows = slice(0, acts.n)
    for x, y in zip(token_blocks(acts, block, rows, acts.chunk_rows, skip_first, site="mlp_in"),
                    token_blocks(acts, block, rows, acts.chunk_rows, skip_first, site="mlp_out")):
        if not len(x):
            continue
        y_hat = tc(torch.from_numpy(x))[0].double()
        yd = torch.from_numpy(y).double()
        sse += float((y_hat - yd).pow(2).sum())
        sum_y2 += float(yd.pow(2).sum())
        sum_vec = yd.sum(0) if sum_vec is None else sum_vec + yd.sum(0)
        n += len(y)
    if n == 0:
        raise ValueError(f"{acts.url}: no tokens to measure the transcoder of block {block} on")
    return 1.0 - sse / (sum_y2 - float(sum_vec.pow(2).sum()) / n)


@torch.no_grad()
def store_active_sets(tc: Transcoder, acts: Activations, block: int, skip_first: bool) -> np.ndarray:
    """bool [n, width]: transcoder features active anywhere in each stored text (real tokens, first one dropped)."""
    out = []
    for lo in range(0, acts.n, acts.chunk_rows):
        rows = slice(lo, min(acts.n, lo + acts.chunk_rows))
        x = torch.from_numpy(acts.layer(block, rows, site="mlp_in"))
        mask = torch.from_numpy(token_mask(acts.token_ids[rows], skip_first))
        z = torch.zeros(*mask.shape, tc.width)
        z[mask] = tc.encode(x[mask])
        out.append(active_sets(z, mask))
    return np.concatenate(out)


def _measure(tc: Transcoder, job: TranscoderOverlapJob) -> Item:
    sets, fve = {}, {}
    for lang, url in job.paragraphs.items():
        acts = Activations(url)
        sets[lang] = store_active_sets(tc, acts, job.block, job.skip_first)
        fve[lang] = store_fve(tc, acts, job.block, job.skip_first)
    overlap = layer_overlap(job.block, sets, job.pairs, np.asarray(job.perm))
    return Item(meta={"pairs": {p: asdict(v) for p, v in overlap.pairs.items()}, "size": overlap.size, "fve_lang": fve})


def transcoder_layer(job: TranscoderOverlapJob) -> TranscoderLayerResult:
    """Ray remote body: the block's transcoder from its stage, measured per language (found or computed)."""
    trained = job.transcoders.load(job.item)
    tc = Transcoder.from_state(trained.tensors)
    item, measured = job.stage.get_or_compute(job.item, lambda: _measure(tc, job))
    pairs = {p: PairOverlap(**v) for p, v in item.meta["pairs"].items()}
    return TranscoderLayerResult(job.block, dict(trained.meta["metrics"]), item.meta["fve_lang"],
                                 LayerOverlap(job.block, pairs, item.meta["size"]), measured)
