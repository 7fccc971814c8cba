"""The tuned lens as stages under store.root, each found again when its inputs are unchanged.

  activations (extraction.extract) -> lenses/targets (one item per store chunk) -> lenses/translators (one item per
  layer) -> lenses/evaluations (one item per layer)

Each stage's key covers the key of the stage it reads, so a changed input moves exactly the stages below it:
a new learning rate retrains the translators and re-evaluates them, but finds the store and the targets. A
layer's translator is published inside its Ray remote function as soon as it is trained, so a killed run keeps
every finished layer and a rerun trains only the others. The science (which prompts are held out, what the
lenses train on) is here, as plain functions testable without Ray or Prefect.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import ray
import torch

from lensflow.tasks.core.actors import map_remote
from lensflow.tasks.core.config import Config, ConfigError, with_overrides
from lensflow.tasks.core.devices import cluster_gpus, compute_device, task_gpus
from lensflow.tasks.core.kernels import compute_dtype
from lensflow.tasks.core.ray_cluster import connect
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.core.store import Activations
from lensflow.tasks.lenses.config import LensesConf
from lensflow.tasks.lenses.readouts import (
    LensTargets,
    Readout,
    Translator,
    evaluate,
    final_targets,
    flatten_tokens,
    token_batches,
    train_translator,
)

TARGETS_VERSION = 1  # bump when the targets change for the same store
TRANSLATOR_VERSION = 1  # ... when training changes for the same targets and settings
EVALUATION_VERSION = 1  # ... when the held-out metrics change for the same translators
TRAINING_KEYS = ("epochs", "batch_tokens", "lr", "weight_decay", "compute_dtype", "seed")  # lenses.* in the key


def lens_config(conf: Config) -> Config:
    """The store variant the lenses train on: every resid layer at every position of the first
    lenses.max_prompts texts (the final layer supplies the targets, every other layer gets a translator)."""
    n = conf.lenses.max_prompts or conf.data.max_prompts
    return with_overrides(conf, {"store.positions": "all", "store.layers": None, "store.sites": ["resid"],
                                 "data.max_prompts": n})


@dataclass(frozen=True)
class PromptSplit:
    """Prompts (store rows) the translators train on, and those both lenses are evaluated on."""

    train: range
    heldout: range

    def params(self) -> dict[str, list[int]]:
        return {"train": [self.train.start, self.train.stop], "heldout": [self.heldout.start, self.heldout.stop]}

    def __str__(self) -> str:
        return (f"train prompts {self.train.start}-{self.train.stop - 1}, "
                f"held-out {self.heldout.start}-{self.heldout.stop - 1}")


def split(n: int, heldout: float) -> PromptSplit:
    """The last `heldout` share of prompts (at least one) is held out; the rest trains (at least one)."""
    n_eval = min(n - 1, max(1, round(n * heldout)))
    if n_eval < 1:
        raise ConfigError(f"lenses: {n} prompt(s) cannot be split into train and held-out; raise lenses.max_prompts")
    return PromptSplit(range(0, n - n_eval), range(n - n_eval, n))


@dataclass(frozen=True)
class LensStages:
    """The three lens stages of one store, split and training setting."""

    targets: Stage
    translators: Stage
    evaluations: Stage
    split: PromptSplit


def lens_stages(conf: Config, store_key: str, rows: PromptSplit) -> LensStages:
    """Keys: targets <- the store; translators <- the targets, the split and the training settings; evaluations
    <- the translators and the held-out rows. The model is in the store's key, so no stage repeats it."""
    root = conf.store.root
    targets = Stage.of(root, "lenses/targets", None, {}, [store_key], version=TARGETS_VERSION)
    training = conf.lenses.model_dump(mode="json", include=set(TRAINING_KEYS))
    translators = Stage.of(root, "lenses/translators", None, {**rows.params(), **training}, [store_key, targets.key],
                           version=TRANSLATOR_VERSION)
    evaluations = Stage.of(root, "lenses/evaluations", None, {"heldout": rows.params()["heldout"]}, [translators.key],
                           version=EVALUATION_VERSION)
    return LensStages(targets, translators, evaluations, rows)


def lens_task_gpus(conf: Config) -> float:
    """GPUs per lens Ray task: lenses.gpus_per_task, `auto` = a quarter GPU on a GPU cluster (tasks/core/devices.py)."""
    connect(conf.ray)
    return task_gpus(conf.lenses.gpus_per_task, cluster_gpus(), "lenses.gpus_per_task")


def layer_item(layer: int) -> str:
    return f"layer_{layer:02d}"


def _resolve(x):
    """Big shared inputs (readout, targets) travel as Ray object refs inside job items; tests pass values."""
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


def share_targets(targets: LensTargets) -> ray.ObjectRef:
    """The targets of every token put once in Ray's object store as numpy arrays, which each node's tasks map
    read-only instead of unpickling a copy each (4.2 GB per layer's task at GPT-J scale, beyond a pod's memory)."""
    return ray.put({k: v.numpy() for k, v in targets.tensors().items()})


def _targets(x: LensTargets | ray.ObjectRef) -> LensTargets:
    if not isinstance(x, ray.ObjectRef):
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns of the read-only view; the targets are only read
        return LensTargets.from_tensors({k: torch.from_numpy(v) for k, v in ray.get(x).items()})


# ---- lens targets: one item per store chunk ----

@dataclass(frozen=True)
class TargetsChunk:
    """Job of one Ray remote function: the targets of one store chunk of prompts."""

    stage: Stage
    url: str  # the activation store
    chunk: int
    rows: range
    last_layer: int  # the model's last resid layer (n_layers)
    readout: object  # Readout or its ray.put ref


@dataclass(frozen=True)
class ChunkTargets:
    targets: LensTargets
    computed: bool


def targets_chunk(job: TargetsChunk) -> ChunkTargets:
    """Found, or computed from the stored last layer and published: targets of every real token of the chunk."""
    def compute() -> Item:
        acts = Activations(job.url)
        block = acts.layer(job.last_layer, slice(job.rows.start, job.rows.stop))
        h = flatten_tokens(block, acts.lengths[job.rows.start:job.rows.stop])
        dev = compute_device()
        targets = final_targets(_resolve(job.readout).to(dev), h.to(dev)).to("cpu")
        return Item(targets.tensors(), {"rows": [job.rows.start, job.rows.stop]})

    item, computed = job.stage.get_or_compute(f"chunk_{job.chunk:04d}", compute)
    return ChunkTargets(LensTargets.from_tensors(item.tensors), computed)


@dataclass(frozen=True)
class TargetsResult:
    """Targets of every token of the store in (prompt, position) order, and what this run computed of them."""

    targets: LensTargets
    chunks_total: int
    chunks_computed: int
    wall_s: float


def lens_targets(conf: Config, stages: LensStages, url: str, last_layer: int, readout) -> TargetsResult:
    """Model-free Ray remote functions, one per store chunk (lenses.gpus_per_task GPUs each)."""
    t0 = time.perf_counter()
    acts = Activations(url)
    step = acts.chunk_rows
    jobs = [TargetsChunk(stages.targets, url, c, range(i, min(acts.n, i + step)), last_layer, readout)
            for c, i in enumerate(range(0, acts.n, step))]
    parts = map_remote(targets_chunk, jobs, "lens targets", conf.ray, num_gpus=lens_task_gpus(conf))
    return TargetsResult(LensTargets.cat([p.targets for p in parts]), len(parts), sum(p.computed for p in parts),
                         time.perf_counter() - t0)


# ---- translators and their evaluation: one item each per layer ----

@dataclass(frozen=True)
class TranslatorJob:
    """Job of one Ray remote function: train (or find) one layer's translator, then evaluate (or find) both lenses."""

    stages: LensStages
    url: str  # the activation store
    layer: int
    last_layer: int
    training: LensesConf  # TRAINING_KEYS are read from it
    readout: object  # Readout or ray ref
    targets: object  # LensTargets of every token of the store, or ray ref


@dataclass(frozen=True)
class LayerLenses:
    """One layer's translator and held-out metrics ({"kl_to_final", "top1_agree"} per lens), and its cost here."""

    layer: int
    translator: dict[str, torch.Tensor]
    trained: bool  # this call trained the translator (False: found, or the last layer's identity)
    evaluated: bool  # this call computed the held-out metrics (False: found)
    logit: dict[str, float]
    tuned: dict[str, float]
    eval_tokens: int
    wall_s: float
    cpu_s: float  # the cost on an idle core, whatever else shares the machine
    losses: list[float] = field(default_factory=list)  # the training curve, where this call trained


class _LayerData:
    """(h, targets) minibatches of one layer streamed from the store, moved to the compute device one batch at a
    time (the targets of every token stay in host memory: 4 GB for 256k GPT-J tokens)."""

    def __init__(self, url: str, layer: int, targets: LensTargets, batch_tokens: int, device: torch.device):
        self.acts, self.layer, self.targets = Activations(url), layer, targets
        self.lengths, self.batch_tokens, self.device = self.acts.lengths, batch_tokens, device

    def tokens(self, rows: range) -> int:
        return int(self.lengths[rows.start:rows.stop].sum())

    def batches(self, rows: range, shuffle_seed: int | None):
        step = self.acts.chunk_rows
        starts = range(rows.start, rows.stop, step)
        blocks = zip(starts, self.acts.iter_layer(self.layer, step, slice(rows.start, rows.stop)))
        for h, tgt in token_batches(blocks, self.lengths, self.targets, self.batch_tokens, rows, shuffle_seed):
            yield h.to(self.device), tgt.to(self.device)


def _train(job: TranslatorJob, data: _LayerData, readout: Readout) -> Item:
    """AdamW on KL(final || lens) over the training prompts, reshuffled every epoch (seeded)."""
    t0, c0 = time.perf_counter(), time.process_time()
    hp, rows = job.training, job.stages.split.train
    n_train = data.tokens(rows)
    dtype = compute_dtype(hp.compute_dtype, readout.weight.device, (hp.batch_tokens, *readout.weight.shape[::-1]))
    tr, losses = train_translator(
        readout, lambda epoch: data.batches(rows, hp.seed * 1000 + epoch), data.acts.d_model, hp.epochs, hp.lr,
        -(-n_train // hp.batch_tokens), hp.weight_decay, dtype, hp.seed)
    meta = {"layer": job.layer, "train_tokens": n_train, "losses": losses, "compute_dtype": str(dtype).removeprefix("torch."),
            "train_wall_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0}
    return Item(tr.cpu().tensors(), meta)


def train_and_evaluate(job: TranslatorJob) -> LayerLenses:
    """One layer of the tuned lens: its translator (the last layer's is the identity by definition), published
    before evaluation starts, then logit and tuned lens on the held-out prompts, published too."""
    t0, c0 = time.perf_counter(), time.process_time()
    dev = compute_device()
    readout = _resolve(job.readout).to(dev)
    data = _LayerData(job.url, job.layer, _targets(job.targets), job.training.batch_tokens, dev)
    name = layer_item(job.layer)
    trained, losses = False, []
    if job.layer == job.last_layer:
        tensors = Translator(data.acts.d_model).tensors()
    else:
        item, trained = job.stages.translators.get_or_compute(name, lambda: _train(job, data, readout))
        tensors, losses = item.tensors, item.meta["losses"]
    tr = Translator.from_tensors(tensors).to(dev)
    heldout = job.stages.split.heldout

    def measure() -> Item:
        logit = evaluate(readout, data.batches(heldout, None))
        tuned = evaluate(readout, data.batches(heldout, None), tr)
        return Item({}, {"layer": job.layer, "logit": logit, "tuned": tuned, "eval_tokens": data.tokens(heldout)})

    ev, evaluated = job.stages.evaluations.get_or_compute(name, measure)
    out = LayerLenses(job.layer, {k: v.cpu() for k, v in tensors.items()}, trained, evaluated, ev.meta["logit"],
                      ev.meta["tuned"], ev.meta["eval_tokens"], time.perf_counter() - t0, time.process_time() - c0,
                      losses if trained else [])
    return out


@dataclass(frozen=True)
class LayersResult:
    layers: list[LayerLenses]  # by layer, 0..n_layers
    wall_s: float

    @property
    def trained(self) -> int:
        return sum(r.trained for r in self.layers)

    @property
    def evaluated(self) -> int:
        return sum(r.evaluated for r in self.layers)


def lens_layers(conf: Config, stages: LensStages, url: str, last_layer: int, readout,
                targets: TargetsResult) -> LayersResult:
    """Model-free Ray remote functions, one per layer 0..last_layer (lenses.gpus_per_task GPUs each)."""
    t0 = time.perf_counter()
    gpus = lens_task_gpus(conf)
    targets_ref = share_targets(targets.targets)
    jobs = [TranslatorJob(stages, url, l, last_layer, conf.lenses, readout, targets_ref)
            for l in range(last_layer + 1)]
    layers = map_remote(train_and_evaluate, jobs, "tuned lens: train + evaluate per layer", conf.ray, num_cpus=1,
                        num_gpus=gpus)
    return LayersResult(layers, time.perf_counter() - t0)
