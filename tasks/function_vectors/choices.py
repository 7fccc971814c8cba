"""The function-vectors experiment's decisions: how many heads, which heads, at which resid layer the vector is
added, and which transfers run. Pure functions of the config, the model's shape, the patchings and the validation
curves, so each is tested without a model, Prefect or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.models import ModelInfo
from lensflow.tasks.function_vectors.config import FunctionVectorsConf
from lensflow.tasks.function_vectors.evaluation import (
    LayerCurve,
    TransferJob,
    VectorJob,
    nanmean,
)
from lensflow.tasks.function_vectors.heads import Head
from lensflow.tasks.function_vectors.patching import IclTasks, Patchings


def default_top_k(n_layers: int, n_heads: int) -> int:
    """Paper: 10 of GPT-J's 448 heads; small models keep 10 unless that is over a quarter of their heads."""
    return min(10, max(1, n_layers * n_heads // 4))


def top_heads(aie: torch.Tensor | np.ndarray, k: int) -> list[Head]:
    """The k heads of largest average indirect effect, largest first."""
    flat = torch.as_tensor(aie).flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k].tolist()
    n_heads = torch.as_tensor(aie).shape[1]
    return [(i // n_heads, i % n_heads) for i in order]


@dataclass(frozen=True)
class FvPlan:
    """The config resolved against the model's shape, checked before any work."""

    top_k: int
    layer: int | None  # the configured resid layer; None = auto (chosen on validation queries)
    scan_layers: list[int]  # where the vector is also tested on test queries (the reported layer scan)
    candidate_layers: list[int]  # what auto chooses from; empty for a configured layer


def plan(fc: FunctionVectorsConf, info: ModelInfo) -> FvPlan:
    n_layers, n_heads = info.n_layers, info.n_heads
    k = fc.top_k or default_top_k(n_layers, n_heads)
    if k > n_layers * n_heads:
        raise ConfigError(f"config key 'function_vectors.top_k': {k} > {n_layers * n_heads} heads of {info.name}")
    layer = None if fc.layer == "auto" else fc.layer
    if layer is not None and layer > n_layers:
        raise ConfigError(f"config key 'function_vectors.layer': {layer} out of range 0..{n_layers} for {info.name}")
    stride = fc.layer_scan_stride
    scan_layers = list(range(0, n_layers, stride)) if stride else []
    candidates = list(range(0, n_layers, stride or 1)) if layer is None else []
    return FvPlan(k, layer, scan_layers, candidates)


@dataclass(frozen=True)
class LayerChoice:
    layer: int
    how: Literal["config", "auto", "auto-fallback"]  # auto-fallback: no ICL task kept a validation query
    curve: dict[int, float]  # mean over ICL tasks of validation zero-shot accuracy with the vector, per candidate


def choose_layer(p: FvPlan, curves: list[LayerCurve], n_layers: int) -> LayerChoice:
    """The configured layer, or (auto) the candidate with the best mean validation accuracy over ICL tasks, the
    earliest on ties; ICL tasks with no validation query kept do not vote. Test queries are never read here."""
    if p.layer is not None:
        return LayerChoice(p.layer, "config", {})
    curve = {layer: nanmean([c.acc.get(layer, float("nan")) for c in curves]) for layer in p.candidate_layers}
    scored = {layer: v for layer, v in curve.items() if np.isfinite(v)}
    if not scored:
        print(f"layer=auto: no ICL task kept a validation query; using n_layers // 3 = {n_layers // 3}")
        return LayerChoice(n_layers // 3, "auto-fallback", curve)
    best = max(scored.values())
    return LayerChoice(min(layer for layer, v in scored.items() if v == best), "auto", curve)


def transfer_jobs(fc: FunctionVectorsConf, icl: IclTasks, patchings: Patchings, heads: list[Head],
                  layer: int) -> list[TransferJob]:
    """Each directed transfer of `function_vectors.transfer`: the source's and the target's vectors from the same
    heads at the same layer (patchings must hold both ICL tasks)."""
    return [TransferJob(source, patchings[source].head_means(heads), patchings[source].key,
                        VectorJob.of(icl[target], patchings[target], heads, layer))
            for source, target in fc.transfer_pairs()]
