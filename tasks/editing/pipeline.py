"""The editing stages, driver side, each run on the model actors and kept under store.root by fingerprint:
key covariance per layer (once per model and text set), ROME deltas (one item per request), MEMIT's target values
(one per request) and deltas (one item per batch size), and the scores of each edited model beside the unedited
one. Deltas are applied inside the actor for a score and removed after; the cached model is never changed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.core.stages import Item, ModelId, Stage, digest
from lensflow.tasks.editing.requests import Request
from lensflow.tasks.editing.rome import (
    ValueSettings,
    applied,
    key_covariance,
    memit_deltas,
    optimise_value,
    rome_delta,
)
from lensflow.tasks.editing.scores import Scores, score

VERSION = 1  # of the deltas and scores computed here; part of every stage key


def context_prefixes(n: int, seed: int) -> list[str]:
    """The empty prefix and n - 1 short openings of built-in paragraphs (ROME samples them from the model)."""
    return [""] + [" ".join(t.split()[:5]).rstrip(",.;:") + ". " for t in builtin_texts(n - 1, seed=seed + 1)]


@dataclass(frozen=True)
class Plan:
    """What every edit stage shares: the stages' homes and the settings they depend on."""

    model: ModelId
    root: str
    prefixes: tuple[str, ...]
    values: ValueSettings
    cov_texts: int
    cov_tokens: int
    cov_weight: float
    seed: int
    fluency_prompts: int
    fluency_tokens: int

    @classmethod
    def of(cls, conf: Config, model: ModelId) -> Plan:
        ec = conf.edit
        return cls(model, conf.store.root, tuple(context_prefixes(ec.prefixes, ec.seed)),
                   ValueSettings(ec.steps, ec.lr, ec.kl_factor, ec.weight_decay, ec.clamp_norm), ec.cov_texts,
                   ec.cov_tokens, ec.cov_weight, ec.seed, ec.fluency_prompts, ec.fluency_tokens)

    def stage(self, name: str, params: dict, inputs: Sequence[str] = ()) -> Stage:
        return Stage.of(self.root, f"edit/{name}", self.model, params, inputs, version=VERSION)

    @property
    def covariance(self) -> Stage:
        return self.stage("covariance", {"texts": self.cov_texts, "tokens": self.cov_tokens, "seed": self.seed})

    def cov(self, layer: int) -> torch.Tensor:
        return self.covariance.load(f"layer{layer}").tensors["cov"]


# ---------------------------------------------------------------- actor side


@dataclass(frozen=True)
class CovJob:
    plan: Plan
    layer: int


def cov_job(lm: LM, job: CovJob) -> bool:
    p = job.plan

    def compute() -> Item:
        texts = builtin_texts(p.cov_texts, seed=p.seed)
        return Item({"cov": key_covariance(lm, job.layer, texts, p.cov_tokens)}, {"texts": len(texts)})

    return p.covariance.get_or_compute(f"layer{job.layer}", compute)[1]


@dataclass(frozen=True)
class RomeJob:
    plan: Plan
    stage: Stage
    request: Request
    layer: int


def rome_job(lm: LM, job: RomeJob) -> dict:
    """One request's value at the MLP output and its rank-one delta."""

    def compute() -> Item:
        value = optimise_value(lm, job.request, "mlp_out", job.layer, job.plan.prefixes, job.plan.values)
        delta = rome_delta(lm, job.layer, job.request, value, job.plan.prefixes, job.plan.cov(job.layer))
        return Item({"delta": delta}, {"nll_before": value.nll_before, "nll_after": value.nll_after})

    item, computed = job.stage.get_or_compute(job.request.key, compute)
    return {**item.meta, "computed": computed}


@dataclass(frozen=True)
class ValueJob:
    plan: Plan
    stage: Stage
    request: Request
    layer: int  # resid layer: the output of the last MEMIT block


def value_job(lm: LM, job: ValueJob) -> dict:
    def compute() -> Item:
        v = optimise_value(lm, job.request, "resid", job.layer, job.plan.prefixes, job.plan.values)
        return Item({"target": v.v + v.delta}, {"nll_before": v.nll_before, "nll_after": v.nll_after})

    item, computed = job.stage.get_or_compute(job.request.key, compute)
    return {**item.meta, "computed": computed}


@dataclass(frozen=True)
class MemitJob:
    plan: Plan
    stage: Stage
    values: Stage
    requests: tuple[Request, ...]
    layers: tuple[int, ...]


def memit_job(lm: LM, job: MemitJob) -> bool:
    def compute() -> Item:
        targets = torch.stack([job.values.load(r.key).tensors["target"] for r in job.requests])
        covs = {l: job.plan.cov(l) for l in job.layers}
        deltas = memit_deltas(lm, job.layers, job.requests, targets, job.plan.prefixes, covs, job.plan.cov_weight)
        return Item({f"layer{l}": d for l, d in deltas.items()}, {"layers": list(job.layers)})

    return job.stage.get_or_compute(f"n{len(job.requests)}", compute)[1]


@dataclass(frozen=True)
class Deltas:
    """Where an edit's weight deltas are published: an item of a stage, its tensors named layer<l> (or `delta` for
    ROME's one layer)."""

    stage: Stage
    item: str
    layer: int | None = None  # ROME: the one layer its `delta` belongs to

    def load(self) -> dict[int, torch.Tensor]:
        item = self.stage.load(self.item)
        if self.layer is not None:
            return {self.layer: item.tensors["delta"]}
        return {int(k.removeprefix("layer")): v for k, v in item.tensors.items()}


@dataclass(frozen=True)
class ScoreJob:
    plan: Plan
    stage: Stage
    name: str
    requests: tuple[Request, ...]
    deltas: Deltas | None  # None: the unedited model


def score_job(lm: LM, job: ScoreJob) -> Scores:
    def compute() -> Item:
        with applied(lm, job.deltas.load() if job.deltas else {}):
            s = score(lm, job.requests, job.plan.fluency_prompts, job.plan.fluency_tokens)
        return Item({}, {"scores": asdict(s)})

    item, _ = job.stage.get_or_compute(job.name, compute)
    m = item.meta["scores"]
    return Scores(**{**m, "samples": tuple(m["samples"])})


# ---------------------------------------------------------------- driver side


def request_digest(requests: Sequence[Request]) -> str:
    return digest([r.key for r in requests])[:16]


def covariances(plan: Plan, layers: Sequence[int], pool: ModelPool) -> int:
    """The key covariance of every layer an edit touches (computed once per model and text set)."""
    done = pool.map(cov_job, [CovJob(plan, l) for l in sorted(set(layers))], desc="edit: key covariance (layers)")
    return sum(done)


@dataclass(frozen=True)
class EditRun:
    """One edit setting's scores (ROME: the mean over single edits; MEMIT: the batch) beside the unedited model's on
    the same requests."""

    method: str
    n_edits: int
    edited: Scores
    unedited: Scores
    layers: tuple[int, ...]


def rome(plan: Plan, requests: Sequence[Request], layer: int, pool: ModelPool) -> EditRun:
    """Each request edited alone at `layer`, scored on itself, removed; scores averaged over requests."""
    stage = plan.stage("rome", {"layer": layer, "prefixes": plan.prefixes, "values": asdict(plan.values)},
                       [plan.covariance.key])
    pool.map(rome_job, [RomeJob(plan, stage, r, layer) for r in requests], desc="edit: ROME deltas (requests)")
    scores = plan.stage("scores", {"fluency": [plan.fluency_prompts, plan.fluency_tokens]}, [stage.key])
    jobs = [ScoreJob(plan, scores, f"rome-{r.key}", (r,), Deltas(stage, r.key, layer)) for r in requests]
    per = pool.map(score_job, jobs, desc="edit: ROME scores (requests)")
    gens = [s for s in per[: plan.fluency_prompts]]
    mean = {k: sum(getattr(s, k) for s in per) / len(per) for k in ("efficacy", "paraphrase", "specificity")}
    fluency = sum(s.fluency for s in gens) / len(gens)
    edited = Scores(**mean, fluency=fluency, n_requests=len(per), samples=tuple(g.samples[0] for g in gens[:3]))
    return EditRun("rome", len(requests), edited, unedited(plan, requests, pool), (layer,))


def unedited(plan: Plan, requests: Sequence[Request], pool: ModelPool) -> Scores:
    scores = plan.stage("scores", {"fluency": [plan.fluency_prompts, plan.fluency_tokens]})
    return pool.map(score_job, [ScoreJob(plan, scores, f"unedited-{request_digest(requests)}", tuple(requests), None)],
                    desc="edit: unedited scores")[0]


def memit(plan: Plan, requests: Sequence[Request], layers: Sequence[int], sizes: Sequence[int],
          pool: ModelPool) -> list[EditRun]:
    """Target values for every request once (at the output of the last layer), then one MEMIT batch per size
    (the first n requests), each scored with its deltas applied."""
    layers = tuple(sorted(layers))
    values = plan.stage("memit-values", {"layer": layers[-1] + 1, "prefixes": plan.prefixes,
                                         "values": asdict(plan.values)})
    n_max = max(sizes)
    pool.map(value_job, [ValueJob(plan, values, r, layers[-1] + 1) for r in requests[:n_max]],
             desc="edit: MEMIT target values (requests)")
    stage = plan.stage("memit", {"layers": layers, "cov_weight": plan.cov_weight, "prefixes": plan.prefixes,
                                 "requests": request_digest(requests[:n_max])}, [values.key, plan.covariance.key])
    batches = [tuple(requests[:n]) for n in sizes]
    pool.map(memit_job, [MemitJob(plan, stage, values, b, layers) for b in batches], desc="edit: MEMIT deltas (sizes)")
    scores = plan.stage("scores", {"fluency": [plan.fluency_prompts, plan.fluency_tokens]}, [stage.key])
    jobs = [ScoreJob(plan, scores, f"memit-n{len(b)}", b, Deltas(stage, f"n{len(b)}")) for b in batches]
    edited = pool.map(score_job, jobs, desc="edit: MEMIT scores (sizes)")
    return [EditRun("memit", len(b), e, unedited(plan, b, pool), layers) for b, e in zip(batches, edited)]


def rome_layer(conf: Config, model: ModelId, n_layers: int) -> tuple[int, str]:
    """ROME's layer: where a finished causal-trace stage of this model (same trace settings) puts the MLP's
    highest average indirect effect at the last subject token, else edit.layer."""
    ec = conf.edit
    if ec.layer_from_trace:
        layer = traced_layer(conf, model, n_layers)
        if layer is not None:
            return layer, "causal trace"
    return ec.rome_layer(n_layers), "edit.layer"


def traced_layer(conf: Config, model: ModelId, n_layers: int) -> int | None:
    """Reads the causal-trace stage's items through the core's Stage (the trace's stage key: its settings
    without batch_tokens, version 1); each item holds probs["mlp"] [layers, tokens] and its subject span."""
    import fsspec

    ct = getattr(conf, "causal_trace", None)
    if ct is None:
        return None
    params = {"samples": ct.samples, "noise_scale": ct.noise_scale, "window": ct.window, "seed": ct.seed}
    stage = Stage.of(conf.store.root, "causal_trace", model, params, version=1)
    fs, path = fsspec.core.url_to_fs(stage.url)
    try:
        names = [p.rsplit("/", 1)[-1].removesuffix(".safetensors") for p in fs.ls(path, detail=False)
                 if p.endswith(".safetensors")]
    except FileNotFoundError:
        return None
    total, count = torch.zeros(n_layers, dtype=torch.float64), 0
    for name in names:
        item = stage.load(name)
        mlp = item.tensors.get("mlp") if item else None
        if mlp is None or mlp.shape[0] != n_layers:
            continue
        total += mlp[:, item.meta["end"] - 1].double() - item.meta["corrupted"]
        count += 1
    return int(total.argmax()) if count else None


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
