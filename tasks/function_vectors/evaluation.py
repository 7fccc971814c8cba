"""What a function vector does on an ICL task's held-out queries: the evaluation on test queries, the zero-shot
layer scan on validation queries that `function_vectors.layer=auto` chooses from (never on test queries), and the
transfer of one ICL task's vector to another's queries (e.g. capitalizing English words -> French words).

Each is a stage item (per ICL task, or per directed transfer) keyed by the patching(s) its head means come from, the
chosen heads, the layer(s) and the settings and held-out pairs it reads: changing `top_k` recomputes these, never
the patchings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lensflow.tasks.core.config import Config
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, ModelId, Stage
from lensflow.tasks.function_vectors.heads import (
    Head,
    add_vector_edits,
    function_vector,
    last_token_logits,
    tokenize,
)
from lensflow.tasks.function_vectors.icl import (
    Pair,
    Template,
    demonstrations,
    pairs_digest,
    scored_prompt,
)
from lensflow.tasks.function_vectors.patching import (
    IclTaskJob,
    IclTaskPatching,
    Patchings,
    StageWork,
    find_or_compute,
    prompt_rng,
    template,
)

EVAL_VERSION = 3  # of the evaluation code's numbers for the same inputs; part of every evaluation stage key
KINDS = ("zero_shot", "zero_shot_fv", "shuffled", "shuffled_fv", "natural_text", "natural_text_fv")


def nanmean(values: list[float]) -> float:
    v = np.array([x for x in values if np.isfinite(x)], dtype=float)
    return float(v.mean()) if len(v) else float("nan")


def _mean(x: np.ndarray | None) -> float:
    return float(np.mean(x)) if x is not None and len(x) else float("nan")


# ---------------------------------------------------------------- scoring (on the model actors)


def _accuracy(lm: LM, texts: list[str], answers: list[int], job: IclTaskJob, fv: torch.Tensor | None = None,
              layer: int = 0, plain: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top-1 first-token correctness without (if plain) and with (if fv is given) the vector, in one packed call."""
    ids = tokenize(lm, texts)
    ans = torch.tensor(answers)
    rows = (ids if plain else []) + (ids if fv is not None else [])
    flags = torch.tensor([False] * len(ids) * plain + [True] * len(ids) * (fv is not None))
    edit_fn = add_vector_edits(fv, layer, flags) if fv is not None else None
    logits = last_token_logits(lm, rows, edit_fn, job.conf.pack_tokens)
    ok = (logits.argmax(-1) == ans.repeat(len(rows) // len(ids))).numpy()
    n = len(ids)
    return (ok[:n] if plain else None), (ok[-n:] if fv is not None else None)


def _demo_groups(job: IclTaskJob, queries: list[Pair], shuffle_labels: bool,
                 purpose: str) -> list[tuple[list[Pair], list[int]]]:
    """Queries grouped by shared demonstration set (one set per query by default, as in the paper)."""
    conf = job.conf
    n_sets = min(conf.demo_sets or len(queries), len(queries))
    rng = prompt_rng(conf, job.name, purpose)
    groups = []
    for s in range(n_sets):
        demos = demonstrations(job.split.train, conf.n_shots, rng, shuffle_labels=shuffle_labels)
        groups.append((demos, list(range(s, len(queries), n_sets))))
    return groups


def _scored(lm: LM, prompts: list[str], queries: list[Pair], tpl: Template) -> tuple[list[str], list[int]]:
    """The prompts as scored (ending with the answer's leading whitespace token, if any) and their answer tokens."""
    scored = [scored_prompt(lm.tokenizer, p, tpl.continuation(y)) for p, (_, y) in zip(prompts, queries)]
    return [t for t, _ in scored], [a for _, a in scored]


def _icl_accuracy(lm: LM, job: IclTaskJob, queries: list[Pair], shuffle_labels: bool, purpose: str,
                  fv: torch.Tensor | None = None, layer: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    tpl = template(job.conf)
    plain = np.zeros(len(queries), bool)
    with_fv = np.zeros(len(queries), bool) if fv is not None else None
    for demos, idx in _demo_groups(job, queries, shuffle_labels, purpose):
        texts, answers = _scored(lm, [tpl.prompt(demos, queries[i][0]) for i in idx], [queries[i] for i in idx], tpl)
        a, b = _accuracy(lm, texts, answers, job, fv, layer)
        plain[idx] = a
        if with_fv is not None:
            with_fv[idx] = b
    return plain, with_fv


def _zero_shot(lm: LM, job: IclTaskJob, queries: list[Pair], fmt: str, fv: torch.Tensor | None, layer: int,
               plain: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
    texts, answers = _scored(lm, [fmt.format(input=x) for x, _ in queries], queries, template(job.conf))
    return _accuracy(lm, texts, answers, job, fv, layer, plain)


def _solved(lm: LM, job: IclTaskJob, queries: list[Pair], purpose: str) -> tuple[np.ndarray, list[Pair]]:
    """Correctness at n_shots, and the queries kept for the vector's tests (those solved, with filter_correct)."""
    icl, _ = _icl_accuracy(lm, job, queries, False, purpose)
    return icl, [q for q, ok in zip(queries, icl) if ok or not job.conf.filter_correct]


def zero_shot_layer_scan(lm: LM, job: IclTaskJob, queries: list[Pair], fv: torch.Tensor,
                          layers: list[int]) -> dict[int, float]:
    """Zero-shot accuracy on `queries` with the vector added at each of `layers`: where the vector works."""
    tpl = job.conf.query_template
    return {layer: _mean(_zero_shot(lm, job, queries, tpl, fv, layer, plain=False)[1]) for layer in layers}


# ---------------------------------------------------------------- the three per-ICL-task stages


@dataclass(frozen=True)
class VectorJob:
    """A function vector tested on one ICL task's held-out queries: the vector's heads and head means (another ICL
    task's for a transfer), the patching they come from, and the resid layer(s) it is added at."""

    task: IclTaskJob
    heads: list[Head]
    head_means: torch.Tensor  # [k, head_dim]
    patching_key: str
    layer: int | None = None
    scan_layers: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, task: IclTaskJob, patching: IclTaskPatching, heads: list[Head], layer: int | None = None,
           scan_layers: list[int] = ()) -> VectorJob:
        return cls(task, heads, patching.head_means(heads), patching.key, layer, list(scan_layers))

    def vector(self, lm: LM) -> torch.Tensor:
        return function_vector(lm, self.heads, self.head_means) * self.task.conf.scale


@dataclass(frozen=True)
class Accuracies:
    """One ICL task's (or the mean's) accuracies; the six vector tests run on the n_eval queries kept."""

    icl: float
    n_eval: float
    zero_shot: float = float("nan")
    zero_shot_fv: float = float("nan")
    shuffled: float = float("nan")
    shuffled_fv: float = float("nan")
    natural_text: float = float("nan")
    natural_text_fv: float = float("nan")

    def metrics(self) -> dict[str, float]:
        """Metric name suffixes as logged under fv.<ICL task>. and fv.mean."""
        return {"icl.acc": self.icl, "n_eval": self.n_eval, **{f"{k}.acc": getattr(self, k) for k in KINDS}}


@dataclass(frozen=True)
class IclTaskEval:
    name: str
    acc: Accuracies
    layer_scan: dict[int, float]  # zero-shot accuracy with the vector at each scanned layer (test queries)
    fv: torch.Tensor  # [d_model] the ICL task's function vector (scale applied)
    computed: bool


@dataclass(frozen=True)
class LayerCurve:
    name: str
    acc: dict[int, float]  # zero-shot accuracy with the vector at each candidate layer (validation queries)
    n: int  # validation queries kept
    computed: bool


@dataclass(frozen=True)
class TransferJob:
    """The source ICL task's vector on the target's test queries, beside the target's own vector."""

    source: str
    source_means: torch.Tensor  # [k, head_dim] the source's mean outputs of the chosen heads
    source_key: str  # the source's patching key
    own: VectorJob  # the target ICL task with its own vector

    @property
    def name(self) -> str:
        return f"{self.source}->{self.own.task.name}"


@dataclass(frozen=True)
class TransferResult:
    """Accuracies on the target's test queries: icl over the first n_test; the zero-shot ones over the n_eval kept
    (solved at n_shots, with filter_correct), without a vector, with the target's own and with the source's."""

    source: str
    target: str
    icl: float
    zero_shot: float
    zero_shot_own_fv: float
    zero_shot_fv: float
    n_eval: int
    computed: bool

    @property
    def metric_name(self) -> str:
        """'>' is not allowed in MLflow metric names: fv.transfer.<source>__to__<target>.*"""
        return f"{self.source}__to__{self.target}"

    def metrics(self) -> dict[str, float]:
        return {"icl.acc": self.icl, "zero_shot.acc": self.zero_shot, "zero_shot_own_fv.acc": self.zero_shot_own_fv,
                "zero_shot_fv.acc": self.zero_shot_fv, "n_eval": float(self.n_eval)}


def compute_eval(lm: LM, job: VectorJob) -> Item:
    """Accuracy with and without the vector on test queries the model solves at n_shots: zero-shot, shuffled-label
    n_shots, natural-text templates, and zero-shot with the vector at the scanned layers."""
    conf, task = job.task.conf, job.task
    fv = job.vector(lm)
    icl, kept = _solved(lm, task, task.split.test[: conf.n_test], "test_clean")
    acc = {"icl": _mean(icl), "n_eval": float(len(kept))}
    patching: dict[int, float] = {}
    if kept:
        zs, zs_fv = _zero_shot(lm, task, kept, conf.query_template, fv, job.layer)
        sh, sh_fv = _icl_accuracy(lm, task, kept, True, "test_shuffled", fv, job.layer)
        nat = [_zero_shot(lm, task, kept, t, fv, job.layer) for t in conf.natural_templates]
        acc |= {"zero_shot": _mean(zs), "zero_shot_fv": _mean(zs_fv), "shuffled": _mean(sh),
                "shuffled_fv": _mean(sh_fv),
                "natural_text": float(np.mean([_mean(a) for a, _ in nat])) if nat else float("nan"),
                "natural_text_fv": float(np.mean([_mean(b) for _, b in nat])) if nat else float("nan")}
        patching = zero_shot_layer_scan(lm, task, kept, fv, job.scan_layers)
    return Item({"fv": fv.float().cpu()}, {"acc": acc, "layer_scan": patching})


def compute_validation(lm: LM, job: VectorJob) -> Item:
    """The zero-shot layer scan on VALIDATION queries solved at n_shots: what `layer=auto` chooses from."""
    conf, task = job.task.conf, job.task
    _, kept = _solved(lm, task, task.split.valid[: conf.n_valid], "valid_clean")
    curve = zero_shot_layer_scan(lm, task, kept, job.vector(lm), job.scan_layers) if kept else {}
    return Item({}, {"layer_scan": curve, "n": len(kept)})


def compute_transfer(lm: LM, job: TransferJob) -> Item:
    """On the target's test queries solved at n_shots (the evaluation's demonstrations): zero-shot accuracy with
    no vector, with the target's own vector and with the source's (how often the first answer token is the
    target's answer, e.g. a capitalized French word from the vector of capitalizing English words)."""
    own = job.own
    task, conf = own.task, own.task.conf
    icl, kept = _solved(lm, task, task.split.test[: conf.n_test], "test_clean")
    acc = {"zero_shot": float("nan"), "zero_shot_own_fv": float("nan"), "zero_shot_fv": float("nan")}
    if kept:
        source = replace(own, head_means=job.source_means).vector(lm)
        plain, with_own = _zero_shot(lm, task, kept, conf.query_template, own.vector(lm), own.layer)
        _, with_source = _zero_shot(lm, task, kept, conf.query_template, source, own.layer, plain=False)
        acc = {"zero_shot": _mean(plain), "zero_shot_own_fv": _mean(with_own), "zero_shot_fv": _mean(with_source)}
    return Item({}, {"icl": _mean(icl), "n_eval": len(kept), **acc})


def _vector_stage(root: str, model: ModelId, name: str, job: VectorJob, reads: dict,
                  more_inputs: list[str] = ()) -> Stage:
    """Keyed by the patching(s) the head means come from, the heads, the layer(s), the scale and what the stage reads."""
    params = {"icl_task": job.task.name, "heads": [list(h) for h in job.heads], "scale": job.task.conf.scale,
              "layer": job.layer, "scan_layers": job.scan_layers, **reads}
    return Stage.of(root, name, model, params, inputs=[job.patching_key, *more_inputs], version=EVAL_VERSION)


def _held_out(pairs: list[Pair], n: int, job: IclTaskJob) -> dict:
    """The held-out pairs an accuracy stage reads and how it filters and prompts them."""
    c = job.conf
    return {"pairs": pairs_digest(pairs[:n]), "demo_sets": c.demo_sets, "filter_correct": c.filter_correct}


def _run(conf: Config, pool, name: str, compute: Callable[[LM, VectorJob], Item], jobs: list[VectorJob],
         reads: list[dict], desc: str) -> list[tuple[Item, bool]]:
    """Each job's item of stage `name`, found or computed on the model actors (pool: actors.ModelPool)."""
    model = pool.describe().id
    work = [StageWork(_vector_stage(conf.store.root, model, name, j, r), j.task.name, compute, j)
            for j, r in zip(jobs, reads)]
    return pool.map(find_or_compute, work, desc=desc) if work else []


def evaluate_icl_tasks(conf: Config, jobs: list[IclTaskJob], patchings: Patchings, heads: list[Head], layer: int,
                       scan_layers: list[int], pool) -> list[IclTaskEval]:
    """Every ICL task's test accuracies with its own vector at `layer`, across the model actors."""
    fc = conf.function_vectors
    vjobs = [VectorJob.of(j, patchings[j.name], heads, layer, scan_layers) for j in jobs]
    reads = [{**_held_out(j.split.test, fc.n_test, j), "natural": fc.natural_templates} for j in jobs]
    found = _run(conf, pool, "fv_eval", compute_eval, vjobs, reads, "FV evaluation (ICL tasks)")
    return [IclTaskEval(j.name, Accuracies(**item.meta["acc"]), _curve(item), item.tensors["fv"], computed)
            for j, (item, computed) in zip(jobs, found)]


def validation_layer_scans(conf: Config, jobs: list[IclTaskJob], patchings: Patchings, heads: list[Head],
                            layers: list[int], pool) -> list[LayerCurve]:
    """Every ICL task's zero-shot layer scan on its validation queries (for `layer=auto`)."""
    vjobs = [VectorJob.of(j, patchings[j.name], heads, None, layers) for j in jobs]
    reads = [_held_out(j.split.valid, conf.function_vectors.n_valid, j) for j in jobs]
    found = _run(conf, pool, "fv_valid", compute_validation, vjobs, reads, "FV layer choice (validation)")
    return [LayerCurve(j.name, _curve(item), item.meta["n"], computed) for j, (item, computed) in zip(jobs, found)]


def evaluate_transfers(conf: Config, jobs: list[TransferJob], pool) -> list[TransferResult]:
    """Each directed transfer's target accuracies: n_shots, zero-shot, + own vector, + the source's vector."""
    model, work = pool.describe().id, []
    for j in jobs:
        reads = {**_held_out(j.own.task.split.test, conf.function_vectors.n_test, j.own.task), "source": j.source}
        stage = _vector_stage(conf.store.root, model, "fv_transfer", j.own, reads, [j.source_key])
        work.append(StageWork(stage, j.name.replace("->", "__to__"), compute_transfer, j))
    found = pool.map(find_or_compute, work, desc="FV transfer") if work else []
    return [TransferResult(j.source, j.own.task.name, computed=computed, **item.meta)
            for j, (item, computed) in zip(jobs, found)]


def _curve(item: Item) -> dict[int, float]:
    return {int(layer): acc for layer, acc in item.meta["layer_scan"].items()}  # JSON keys are strings
