"""Future Lens per-layer stages: each method's trained state and test scores at one source layer, published the
moment that layer is done (inside the actor or Ray remote function), so a rerun recomputes nothing and a killed
run keeps its finished layers.

Under store.root (`plan` names them all):
  future_lens/targets/{key}                     samples and targets (tasks/future_lens/samples.py)
  future_lens/<method>/{key}/layer_LL           trained state (soft prompt, ridge map, vocabulary probe); key: the
                                                model, the method's training settings, the targets and activations
  future_lens/<method>_eval/{key}/layer_LL      test metrics per N; key: the trained stage's key + eval settings
  future_lens/fixed_prompt_eval/{key}/layer_LL  one stage per prompt text (nothing is trained)
  future_lens/ngram/{key}/metrics               the n-gram baseline (no hidden state)
The transplant methods live in tasks/future_lens/soft_prompt.py, the probes in tasks/future_lens/ridge.py and tasks/future_lens/vocab_probe.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lensflow.tasks.core.actors import ModelPool, map_remote
from lensflow.tasks.core.config import Config, ConfigError, RayConf
from lensflow.tasks.core.devices import cluster_gpus, compute_device, task_gpus
from lensflow.tasks.core.extraction import Extraction
from lensflow.tasks.core.models import LM, ModelInfo
from lensflow.tasks.core.ray_cluster import connect
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.future_lens.config import FutureLensConf
from lensflow.tasks.future_lens.metrics import Score, decoded_scores, score
from lensflow.tasks.future_lens.ngram import NGram, ngram_logits
from lensflow.tasks.future_lens.ridge import RidgeStats, finetune_hidden_kl, fit_ridge
from lensflow.tasks.future_lens.samples import (
    Samples,
    SampleTargets,
    blocks,
    minibatches,
    read_block,
    tokenize_texts,
)
from lensflow.tasks.future_lens.soft_prompt import (
    evaluate_prompt,
    prompt_embeddings,
    train_soft_prompt,
)
from lensflow.tasks.future_lens.vocab_probe import VocabProbe, fit_vocab_probe

VERSION = 1  # of the per-layer stages computed here; part of their keys
TRAINING = {  # the future_lens.* keys each method's trained state depends on
    "soft_prompt": ("soft_prompt_len", "soft_prompt_init", "soft_prompt_steps", "soft_prompt_batch", "soft_prompt_lr", "seed"),
    "linear_hidden": ("ridge", "hidden_kl_steps", "hidden_kl_lr", "seed"),
    "linear_vocab": ("vocab_rank", "vocab_steps", "vocab_lr", "vocab_batch", "vocab_weight_decay", "seed"),
}
EVALUATION = {  # ... and its test scores
    "soft_prompt": ("ks", "teacher_forcing", "eval_batch"),
    "fixed_prompt": ("ks", "teacher_forcing", "eval_batch"),
    "linear_hidden": ("ks", "eval_batch"),
    "linear_vocab": ("ks",),
}


# --------------------------------------------------------------------------------------------- science choices


def check_layers(layers: list[int], n_layers: int, key: str) -> list[int]:
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise ConfigError(f"config key '{key}': {bad} out of range 0..{n_layers}")
    return sorted(set(layers))


def linear_layers(fc: FutureLensConf, n_layers: int) -> list[int]:
    """Source layers of the linear methods: future_lens.linear_layers, or every resid layer 0..n_layers."""
    if fc.linear_layers is not None:
        return check_layers(fc.linear_layers, n_layers, "future_lens.linear_layers")
    return list(range(n_layers + 1))


def causal_layers(fc: FutureLensConf, n_layers: int) -> list[int]:
    """Source layers of the transplant methods (one forward pass per sample each): future_lens.causal_layers,
    or every causal_layer_stride-th layer counted down from the last, so the last layer is always included."""
    if fc.causal_layers is not None:
        return check_layers(fc.causal_layers, n_layers, "future_lens.causal_layers")
    return sorted({*range(n_layers, -1, -fc.causal_layer_stride)})


@dataclass(frozen=True)
class LayerResult:
    """One method at one source layer. trained / evaluated: this call computed it (False: found in the store)."""

    method: str
    layer: int
    metrics: list[Score]  # per offset N
    trained: bool = False
    evaluated: bool = False
    train_s: float | None = None  # wall time of the training, in whichever run did it


def best_fixed_prompt(per_prompt: Sequence[Sequence[LayerResult]]) -> int:
    """Index of the prompt with the highest Precision@1 averaged over layers and offsets N: the paper reports its
    best generic prompt as `fixed_prompt` (the first one on ties)."""
    means = [np.mean([m.p_at_1 for r in rs for m in r.metrics]) for rs in per_prompt]
    return int(np.argmax(means))


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ProbeJob:
    """One method at one source layer: what it reads, where its trained state and its scores are published."""

    method: str  # soft_prompt, linear_hidden, linear_vocab, or fixed_prompt_p<i>
    layer: int
    samples: Samples
    conf: FutureLensConf
    evaluated: Stage
    trained: Stage | None = None  # None: nothing is trained (fixed prompts)
    prompt: str | None = None  # fixed prompts: the prompt's text

    @property
    def item(self) -> str:
        return f"layer_{self.layer:02d}"


@dataclass(frozen=True)
class FutureLensPlan:
    conf: FutureLensConf
    samples: Samples
    train_texts: list[int]
    linear_layers: list[int]
    causal_layers: list[int]
    jobs: dict[str, list[ProbeJob]]  # soft_prompt, fixed_prompt, linear_hidden, linear_vocab
    ngram: Stage


def _settings(fc: FutureLensConf, keys: Sequence[str]) -> dict:
    return fc.model_dump(mode="json", include=set(keys))


def plan(conf: Config, info: ModelInfo, targets: SampleTargets, ex: Extraction) -> FutureLensPlan:
    """Every per-layer job of the run with the stages it publishes to (see the module docstring for the keys)."""
    fc, root = conf.future_lens, conf.store.root
    samples = targets.samples(ex.url, info.vocab_size, conf.store.chunk_size)
    inputs = (targets.key, ex.key)
    lin, cau = linear_layers(fc, info.n_layers), causal_layers(fc, info.n_layers)

    def jobs(method: str, layers: list[int]) -> list[ProbeJob]:
        trained = Stage.of(root, f"future_lens/{method}", info.id, _settings(fc, TRAINING[method]), inputs, VERSION)
        evaluated = Stage.of(root, f"future_lens/{method}_eval", info.id, _settings(fc, EVALUATION[method]),
                             (trained.key,), VERSION)
        return [ProbeJob(method, l, samples, fc, evaluated, trained) for l in layers]

    def fixed(prompt: str) -> Stage:
        params = {"prompt": prompt, **_settings(fc, EVALUATION["fixed_prompt"])}
        return Stage.of(root, "future_lens/fixed_prompt_eval", info.id, params, inputs, VERSION)

    fixed_stages = [fixed(p) for p in fc.fixed_prompts]
    ngram = Stage.of(root, "future_lens/ngram", info.id, _settings(fc, ("ngram_order", "ks")), (targets.key,), VERSION)
    return FutureLensPlan(fc, samples, targets.train_texts, lin, cau, {
        "soft_prompt": jobs("soft_prompt", cau),
        "fixed_prompt": [ProbeJob(f"fixed_prompt_p{i}", l, samples, fc, st, prompt=p)
                         for l in cau for i, (p, st) in enumerate(zip(fc.fixed_prompts, fixed_stages))],
        "linear_hidden": jobs("linear_hidden", lin),
        "linear_vocab": jobs("linear_vocab", lin),
    }, ngram)


ACTOR_METHODS = ("soft_prompt", "fixed_prompt", "linear_hidden")  # the per-layer methods that need the model


def on_actors(pool: ModelPool, jobs: list[ProbeJob]) -> list[LayerResult]:
    """Every per-layer job that needs the model, in one map, one at a time per actor (a replaced actor redoes one
    layer only), longest first: the short jobs fill the actor that the last soft prompt would leave idle (7 soft
    prompts on 2 actors kept one idle for a whole layer's training)."""
    order = sorted(jobs, key=lambda j: j.method != "soft_prompt")
    return pool.map(actor_job, order, desc="future lens: per-layer methods (actors)", in_flight=1)


def actor_job(lm: LM, job: ProbeJob) -> LayerResult:
    kind = "fixed_prompt" if job.method.startswith("fixed_prompt") else job.method
    return {"soft_prompt": soft_prompt_job, "fixed_prompt": fixed_prompt_job, "linear_hidden": linear_hidden_job}[kind](
        lm, job)


def on_workers(conf: RayConf, fn: Callable[[ProbeJob], LayerResult], jobs: list[ProbeJob]) -> list[LayerResult]:
    """Model-free per-layer jobs as Ray remote functions, future_lens.gpus_per_task GPUs each (`auto`: a quarter
    GPU on a GPU cluster)."""
    if not jobs:
        return []
    connect(conf)
    gpus = task_gpus(jobs[0].conf.gpus_per_task, cluster_gpus(), "future_lens.gpus_per_task")
    return map_remote(fn, jobs, f"future lens: {fn.__name__}", conf, num_gpus=gpus)


# --------------------------------------------------------------------------------------------- per-layer jobs


def run_probe(job: ProbeJob, train: Callable[[], Item] | None, evaluate: Callable[[Item], list[Score]]) -> LayerResult:
    """Find or train the layer's state, then find or score it on the test split; each is published as soon as it
    is done (the report reads the trained state back from its stage and logs it to the flow's run)."""
    state, trained = job.trained.get_or_compute(job.item, train) if job.trained else (Item(), False)
    scores, evaluated = job.evaluated.get_or_compute(
        job.item, lambda: Item(meta={"metrics": [m.as_dict() for m in evaluate(state)]}))
    return LayerResult(job.method, job.layer, [Score.from_dict(m) for m in scores.meta["metrics"]], trained, evaluated,
                       state.meta.get("train_s"))


def _timed(train: Callable[[], tuple[dict, dict, dict]]) -> Callable[[], Item]:
    """train() -> (tensors, curves, params) as a published Item with its wall time."""

    def run() -> Item:
        t0 = time.perf_counter()
        tensors, curves, params = train()
        return Item(tensors, {"train_s": time.perf_counter() - t0, "curves": curves, "params": params})

    return run


def soft_prompt_job(lm: LM, job: ProbeJob) -> LayerResult:
    """The learned prompt of one source layer (KL to the model's own distributions), then its test scores."""
    s, c, l = job.samples, job.conf, job.layer

    def train() -> tuple[dict, dict, dict]:
        init = prompt_embeddings(lm, c.soft_prompt_init, c.soft_prompt_len)
        batches = minibatches(s, l, s.train, c.soft_prompt_batch, s.chunk_rows, c.seed + l)
        prompt, losses = train_soft_prompt(lm, l, batches, init, c.soft_prompt_steps, c.soft_prompt_lr)
        params = {"steps": c.soft_prompt_steps, "batch": c.soft_prompt_batch, "lr": c.soft_prompt_lr,
                  "length": c.soft_prompt_len}
        return {"prompt": prompt}, {"loss": losses}, params

    def evaluate(state: Item) -> list[Score]:
        test = read_block(s, l, s.test)
        return evaluate_prompt(lm, state.tensors["prompt"], l, test.h, test.greedy, c.eval_batch, tuple(c.ks),
                               c.teacher_forcing)

    return run_probe(job, _timed(train), evaluate)


def fixed_prompt_job(lm: LM, job: ProbeJob) -> LayerResult:
    """One generic text prompt at one source layer (evaluation only: nothing is trained)."""
    s, c, l = job.samples, job.conf, job.layer

    def evaluate(_: Item) -> list[Score]:
        test = read_block(s, l, s.test)
        return evaluate_prompt(lm, prompt_embeddings(lm, job.prompt), l, test.h, test.greedy, c.eval_batch,
                               tuple(c.ks), c.teacher_forcing)

    return run_probe(job, None, evaluate)


def linear_hidden_job(lm: LM, job: ProbeJob) -> LayerResult:
    """h_l -> final-layer states at T..T+N-1 (one multi-output ridge, all N), decoded by the model: closed
    form from streamed sufficient statistics, penalty chosen on the last tenth of the training rows."""
    s, c, l = job.samples, job.conf, job.layer

    def train() -> tuple[dict, dict, dict]:
        n_val = max(1, s.n_train // 10)
        fit, val = RidgeStats(), RidgeStats()
        for sl in blocks(s.train, s.chunk_rows):
            d = read_block(s, l, sl)
            y = d.final.flatten(1)
            cut = max(0, min(sl.stop, s.n_train - n_val) - sl.start)
            if cut:
                fit.add(d.h[:cut], y[:cut])
            if cut < y.shape[0]:
                val.add(d.h[cut:], y[cut:])
        groups = int(read_block(s, None, slice(0, 1)).greedy.shape[1])  # one penalty per offset N
        _, _, info = fit_ridge(fit, val, c.ridge, groups)
        w, b, _ = fit_ridge(fit.merge(val), None, c.ridge, groups, chosen=info["ridge"])
        curves: dict = {"ridge_val_mse": list(info["val_mse"].values())}
        if c.hidden_kl_steps:
            d = read_block(s, l, s.train)
            dm = d.final.shape[-1]
            ws, bs = [], []
            for n in range(d.final.shape[1]):
                wn, bn, losses = finetune_hidden_kl(lm, d.h, d.final[:, n], w[:, n * dm : (n + 1) * dm],
                                                    b[n * dm : (n + 1) * dm], c.hidden_kl_steps, c.hidden_kl_lr, 64, c.seed)
                ws.append(wn)
                bs.append(bn)
                curves[f"kl_n{n}"] = losses
            w, b = torch.cat(ws, 1), torch.cat(bs)
        return {"w": w, "b": b}, curves, {"ridge": info["ridge"], "ridge_grid": c.ridge}

    def evaluate(state: Item) -> list[Score]:
        test = read_block(s, l, s.test)
        pred = (test.h @ state.tensors["w"] + state.tensors["b"]).view(test.h.shape[0], test.greedy.shape[1], -1)
        return decoded_scores(lm, pred, test.greedy, tuple(c.ks), c.eval_batch)

    return run_probe(job, _timed(train), evaluate)


def linear_vocab_job(job: ProbeJob) -> LayerResult:
    """Direct vocabulary probe (no model needed: a Ray remote function, on the GPU Ray gave it if any). Inputs
    standardised with streamed statistics of the training rows; see VocabProbe for the parameterisation."""
    s, c, l = job.samples, job.conf, job.layer
    dev = compute_device()

    def train() -> tuple[dict, dict, dict]:
        n, s1, s2, targets = 0, 0.0, 0.0, []
        for sl in blocks(s.train, s.chunk_rows):
            d = read_block(s, l, sl)
            h = d.h.double()
            n, s1, s2 = n + h.shape[0], s1 + h.sum(0), s2 + (h * h).sum(0)
            targets.append(d.greedy)
        mu = s1 / n
        sd = (s2 / n - mu * mu).clamp_min(0).sqrt().clamp_min(1e-6)
        greedy = torch.cat(targets)
        vocab = torch.unique(greedy)
        counts = torch.stack([torch.bincount(torch.searchsorted(vocab, greedy[:, k].contiguous()), minlength=vocab.numel())
                              for k in range(greedy.shape[1])]).float()
        prior = torch.log(counts + 0.1) - torch.log(counts.sum(1, keepdim=True))
        batches = minibatches(s, l, s.train, c.vocab_batch, s.chunk_rows, c.seed + l)
        probe, losses = fit_vocab_probe(batches, vocab.to(dev), mu.float().to(dev), sd.float().to(dev), greedy.shape[1],
                                        c.vocab_rank, c.vocab_steps, c.vocab_lr, c.vocab_weight_decay, prior.to(dev),
                                        c.seed + l)
        return probe.to("cpu").state(), {"loss": losses}, {"rank": c.vocab_rank, "steps": c.vocab_steps,
                                                           "vocab": int(vocab.numel())}

    def evaluate(state: Item) -> list[Score]:
        probe = VocabProbe.from_state(state.tensors).to(dev)
        test = read_block(s, l, s.test)
        return [score(probe.logprobs(test.h.to(dev), n, s.vocab_size).cpu(), test.greedy[:, n], tuple(c.ks))
                for n in range(test.greedy.shape[1])]

    return run_probe(job, _timed(train), evaluate)


# --------------------------------------------------------------------------------------------- baseline and results


@dataclass(frozen=True)
class NGramScores:
    metrics: list[Score]  # per offset N
    computed: bool


def ngram_baseline(plan: FutureLensPlan, texts: list[str], pool: ModelPool) -> NGramScores:
    """Counts from the training texts only (tokenized on an actor); metrics per N on the test split."""
    s, fc = plan.samples, plan.conf

    def compute() -> Item:
        seqs = pool.map(tokenize_texts, [[texts[i] for i in plan.train_texts]], desc="tokenize training texts")[0]
        model = NGram(fc.ngram_order, s.vocab_size).fit(seqs)
        test = read_block(s, None, s.test)
        greedy, x_last = test.greedy.numpy(), test.x_last.numpy()
        return Item(meta={"metrics": [score(ngram_logits(model, x_last, greedy, n), test.greedy[:, n],
                                            tuple(fc.ks)).as_dict() for n in range(greedy.shape[1])]})

    item, computed = plan.ngram.get_or_compute("metrics", compute)
    return NGramScores([Score.from_dict(m) for m in item.meta["metrics"]], computed)


@dataclass(frozen=True)
class FutureLensResults:
    methods: dict[str, list[LayerResult]]  # per method, by layer; fixed_prompt = the best prompt's rows
    best_fixed_prompt: str
    ngram_computed: bool

    def computed(self) -> dict[str, int]:
        """How many per-layer states this run trained and scored (all 0 when the store had everything)."""
        out = {"ngram": int(self.ngram_computed)}
        for method in TRAINING:
            out[f"{method}.trained"] = sum(r.trained for r in self.methods[method])
            out[f"{method}.evaluated"] = sum(r.evaluated for r in self.methods[method])
        out["fixed_prompt.evaluated"] = sum(r.evaluated for m, rs in self.methods.items() if m.startswith("fixed_prompt_p")
                                            for r in rs)
        return out


def assemble(plan: FutureLensPlan, ngram: NGramScores, results: list[LayerResult]) -> FutureLensResults:
    """Rows by method, the n-gram baseline repeated at every linear layer (it reads no state), and fixed_prompt =
    the best prompt (best_fixed_prompt), each prompt also under its own index."""
    by: dict[str, list[LayerResult]] = {}
    for r in results:
        by.setdefault(r.method, []).append(r)
    per_prompt = [by[f"fixed_prompt_p{i}"] for i in range(len(plan.conf.fixed_prompts))]
    best = best_fixed_prompt(per_prompt)
    methods = {"ngram": [LayerResult("ngram", l, ngram.metrics) for l in plan.linear_layers],
               "linear_vocab": by["linear_vocab"], "linear_hidden": by["linear_hidden"], "fixed_prompt": per_prompt[best],
               "soft_prompt": by["soft_prompt"], **{f"fixed_prompt_p{i}": rs for i, rs in enumerate(per_prompt)}}
    return FutureLensResults(methods, plan.conf.fixed_prompts[best], ngram.computed)
