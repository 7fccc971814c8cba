"""MLP neurons as a second feature basis for the multilingual overlap, so the answer does not rest on one SAE.

A neuron is active in a text when it exceeds its threshold at any real token. The threshold is, by default, the
neuron's own activation quantile on general text (`multilingual.neurons.quantile`, averaged over chunks of
`batch_prompts` texts), so every neuron fires about equally rarely; `multilingual.neurons.threshold` sets one
absolute value instead. Neuron activations are large ([tokens, d_mlp] per block): the model actors reduce them to
per-paragraph sets and only booleans come back. The calibrated thresholds and each language's sets are stages,
so a rerun asks the actors nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lensflow.tasks.core.config import Config
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, Stage, digest
from lensflow.tasks.multilingual.overlap import LayerOverlap, active_sets, layer_overlap

if TYPE_CHECKING:
    from lensflow.tasks.core.actors import ModelPool
    from lensflow.tasks.multilingual.plan import MultilingualInputs

VERSION = 1  # of the neuron read-out (hook site, masking): part of both neuron stage keys


@dataclass(frozen=True)
class NeuronJob:
    """Model-actor unit: a chunk of texts, read at the MLP neurons of `blocks`."""

    texts: list[str]
    blocks: list[int]
    max_tokens: int
    skip_first: bool
    thresholds: dict[int, np.ndarray] | None = None  # per block: scalar or per-neuron [F]; None with `quantile`
    quantile: float | None = None


def _neuron_acts(lm: LM, job: NeuronJob) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    enc = lm.encode(job.texts, max_tokens=job.max_tokens)
    with trace(lm, reads=[Read("mlp_neurons", b) for b in job.blocks]) as t:
        t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=max(job.blocks) + 1)
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
class Thresholds:
    """What 'active' means per block: one absolute value, or calibrated per-neuron values [F]."""

    per_block: dict[int, np.ndarray]
    key: str | None  # the calibration stage's key; None for an absolute threshold
    absolute: float | None
    computed: bool  # calibrated by this call


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def _tensor_name(block: int) -> str:
    return f"block_{block:02d}"


def neuron_thresholds(conf: Config, pool: ModelPool, blocks: list[int], calibration: list[str]) -> Thresholds:
    """The thresholds choice: the configured absolute threshold, else per-neuron quantiles calibrated on general
    text (a stage keyed by the model, the calibration texts and every setting that changes the numbers)."""
    mc, nc = conf.multilingual, conf.multilingual.neurons
    if nc.threshold is not None:
        return Thresholds({b: np.float32(nc.threshold) for b in blocks}, None, nc.threshold, False)
    params = {"texts": digest(calibration), "quantile": nc.quantile, "max_tokens": conf.data.max_tokens,
              "skip_first": mc.skip_first, "blocks": blocks, "batch_prompts": nc.batch_prompts}
    stage = Stage.of(conf.store.root, "multilingual/neuron_thresholds", pool.describe().id, params, version=VERSION)

    def calibrate() -> Item:  # the mean over chunks of each chunk's quantile
        jobs = [NeuronJob(c, blocks, conf.data.max_tokens, mc.skip_first, quantile=nc.quantile)
                for c in _chunks(calibration, nc.batch_prompts)]
        parts = pool.map(neuron_quantiles, jobs, desc="calibrate neurons")
        return Item({_tensor_name(b): torch.from_numpy(np.mean([p[b] for p in parts], axis=0).astype(np.float32))
                     for b in blocks})

    item, computed = stage.get_or_compute("thresholds", calibrate)
    return Thresholds({b: item.tensors[_tensor_name(b)].numpy() for b in blocks}, stage.key, None, computed)


def neuron_sets(conf: Config, pool: ModelPool, thresholds: Thresholds, blocks: list[int], label: str,
                paragraphs: list[str]) -> tuple[dict[int, np.ndarray], bool]:
    """({block: bool [n, F]}, computed by this call) for one language's paragraphs: a stage keyed by the model, the
    texts, the thresholds (their stage key, or the absolute value) and the read-out settings."""
    mc, nc = conf.multilingual, conf.multilingual.neurons
    params = {"texts": digest(paragraphs), "max_tokens": mc.paragraph_tokens, "skip_first": mc.skip_first,
              "blocks": blocks, "batch_prompts": nc.batch_prompts, "threshold": thresholds.absolute}
    inputs = [thresholds.key] if thresholds.key else []
    stage = Stage.of(conf.store.root, "multilingual/neuron_sets", pool.describe().id, params, inputs, VERSION)

    def compute() -> Item:
        jobs = [NeuronJob(c, blocks, mc.paragraph_tokens, mc.skip_first, thresholds.per_block)
                for c in _chunks(paragraphs, nc.batch_prompts)]
        parts = pool.map(neuron_active_sets, jobs, desc=f"neurons {label}")
        return Item({_tensor_name(b): torch.from_numpy(np.concatenate([p[b] for p in parts])) for b in blocks})

    item, computed = stage.get_or_compute("sets", compute)
    return {b: item.tensors[_tensor_name(b)].numpy() for b in blocks}, computed


@dataclass(frozen=True)
class NeuronOverlaps:
    blocks: dict[int, LayerOverlap]  # MLP block -> overlaps (block b writes into resid layer b + 1)
    computed: int  # neuron stages (thresholds, per-language sets) computed by this run


def neuron_overlaps(conf: Config, pool: ModelPool, layers: list[int],
                    inputs: MultilingualInputs) -> NeuronOverlaps | None:
    """Overlaps of MLP-neuron sets at the blocks writing into the chosen resid layers (None when switched off or
    when only layer 0 is chosen)."""
    blocks = [l - 1 for l in layers if l >= 1]
    if not conf.multilingual.neurons.enabled or not blocks:
        return None
    calibration = inputs.general[: conf.multilingual.neurons.calibration_prompts]
    thresholds = neuron_thresholds(conf, pool, blocks, calibration)
    sets: dict[int, dict[str, np.ndarray]] = {b: {} for b in blocks}
    computed = int(thresholds.computed)
    for lang, paras in inputs.corpus.items():
        per_block, was_computed = neuron_sets(conf, pool, thresholds, blocks, lang, paras)
        computed += was_computed
        for b in blocks:
            sets[b][lang] = per_block[b]
    return NeuronOverlaps({b: layer_overlap(b, s, inputs.pairs, inputs.perm) for b, s in sets.items()}, computed)
