"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"): where a fact is carried.

Corrupt the subject's token embeddings with Gaussian noise, then restore ONE clean state, the residual stream at
(layer, position) or an MLP / attention output over a window of layers at one position, and measure how much of
the answer's probability comes back. A state's indirect effect is restored minus corrupted probability, each the
mean over the same seeded noise draws.

Fast and exact (`trace_fast`): restoring at position p leaves positions < p as in the corrupted run, so every
restoration at p starts from the corrupted run's key/value cache of its first p tokens and runs only tokens p..;
one batch per position holds every restoration x noise draw. Positions before the subject are the same in the clean
and corrupted runs, so restoring them changes nothing: they get the corrupted probability without a forward pass.
`trace_naive` is the reference the issue asks for: one full forward pass per (site, layer, position).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from lensflow.tasks.causal_trace.facts import (
    Encoded,
    Fact,
    Known,
    answers,
    encode_fact,
    select_known,
)
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, Stage, digest

SITES = {"resid": "resid", "mlp": "mlp_out", "attn": "attn_out"}  # name in metrics and plots -> hooks site


@dataclass(frozen=True)
class TraceSettings:
    samples: int  # noise draws per fact
    noise_scale: float  # noise std = noise_scale x std of the input embedding matrix's entries
    window: int  # MLP / attention outputs are restored at layers [c - window // 2, c + ceil(window / 2)), clipped
    seed: int
    batch_tokens: int  # most tokens per restoration forward pass (memory only; results do not depend on it)

    def key_params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "batch_tokens"}


def noise_std(lm: LM) -> float:
    return lm.model.get_input_embeddings().weight.float().std().item()


def draw_noise(fact: Fact, n_tokens: int, d_model: int, settings: TraceSettings, std: float) -> torch.Tensor:
    """[samples, n_tokens, d_model] float32, drawn on the CPU from a generator seeded by (seed, fact): a rerun, another
    actor or another device draws the same noise."""
    g = torch.Generator().manual_seed(int(digest([str(settings.seed), fact.key])[:15], 16))
    return torch.randn(settings.samples, n_tokens, d_model, generator=g) * (settings.noise_scale * std)


@dataclass
class FactTrace:
    """One fact's causal trace. probs[site] is [layers, positions]: P(answer) with that state restored, mean over
    noise draws (resid: layers 0..n_layers, 0 = embeddings; mlp / attn: the window's centre block 0..n_layers-1)."""

    fact: Fact
    tokens: list[str]
    start: int
    end: int
    clean: float
    corrupted: float
    probs: dict[str, torch.Tensor]

    def effects(self, site: str) -> torch.Tensor:
        """Indirect effects: restored minus corrupted probability."""
        return self.probs[site] - self.corrupted

    def to_item(self) -> Item:
        meta = {"fact": asdict(self.fact), "tokens": self.tokens, "start": self.start, "end": self.end,
                "clean": self.clean, "corrupted": self.corrupted}
        return Item({s: p.float().cpu() for s, p in self.probs.items()}, meta)

    @classmethod
    def from_item(cls, item: Item) -> FactTrace:
        m = item.meta
        return cls(Fact(**m["fact"]), m["tokens"], m["start"], m["end"], m["clean"], m["corrupted"], dict(item.tensors))


def windows(n_layers: int, window: int) -> list[tuple[str, int, list[int]]]:
    """Every restoration at one position: (site, layer on its curve, hooks layers restored)."""
    out = [("resid", l, [l]) for l in range(n_layers + 1)]
    for site in ("mlp", "attn"):
        out += [(site, c, list(range(max(0, c - window // 2), min(n_layers, c - (-window // 2))))) for c in range(n_layers)]
    return out


def _noise_edit(noise: torch.Tensor, start: int, rows_per_draw: int, offset: int) -> list[Edit]:
    """Add draw k's noise to the subject tokens at positions >= offset of a batch whose sequences start at token
    `offset`; batch row i belongs to draw i // rows_per_draw."""
    samples, n, _ = noise.shape
    positions = range(max(start, offset), start + n)
    if not positions:
        return []
    rows = torch.arange(samples * rows_per_draw, device=noise.device)
    draw = rows // rows_per_draw
    values = torch.cat([noise[draw, p - start] for p in positions])
    pos = torch.cat([torch.full_like(rows, p - offset) for p in positions])
    return [Edit("resid", 0, values, position=pos, rows=rows.repeat(len(positions)), mode="add")]


@torch.no_grad()
def clean_run(lm: LM, enc: Encoded) -> tuple[float, dict[str, torch.Tensor]]:
    """P(answer) on the clean prompt and every state a restoration copies: hooks site -> [layers, tokens, d]."""
    n = lm.n_layers
    layers = {"resid": range(n + 1), "mlp_out": range(n), "attn_out": range(n)}
    reads = [Read(site, l) for site, ls in layers.items() for l in ls]
    with trace(lm, reads=reads) as t:
        h = lm.base(input_ids=torch.tensor([enc.ids], device=lm.device)).last_hidden_state[:, -1]
    prob = lm.unembed(h).float().softmax(-1)[0, enc.target].item()
    return prob, {site: torch.stack([t[site, l][0] for l in ls]) for site, ls in layers.items()}


@torch.no_grad()
def trace_fast(lm: LM, enc: Encoded, noise: torch.Tensor, window: int, batch_tokens: int
               ) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(clean P, corrupted P, probs per site) with one batched pass per restored position (and per batch_tokens)."""
    n, T, samples = lm.n_layers, len(enc.ids), noise.shape[0]
    noise = noise.to(lm.device, lm.dtype)
    ids = torch.tensor(enc.ids, device=lm.device)
    clean, states = clean_run(lm, enc)
    with trace(lm, edits=_noise_edit(noise, enc.start, 1, 0)):
        out = lm.base(input_ids=ids.expand(samples, -1), use_cache=True)
    corrupted = lm.unembed(out.last_hidden_state[:, -1]).float().softmax(-1)[:, enc.target].mean().item()
    cache = out.past_key_values
    probs = {"resid": torch.full((n + 1, T), corrupted), "mlp": torch.full((n, T), corrupted),
             "attn": torch.full((n, T), corrupted)}
    todo = windows(n, window)
    for p in range(enc.start, T):
        per_pass = max(1, batch_tokens // (samples * (T - p)))
        for i in range(0, len(todo), per_pass):
            chunk = todo[i:i + per_pass]
            r = len(chunk)
            rows: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
            for j, (site, _, layers) in enumerate(chunk):
                for layer in layers:
                    rows[SITES[site], layer].append(torch.arange(samples, device=lm.device) * r + j)
            edits = _noise_edit(noise, enc.start, r, p)  # first: a restored embedding replaces the noisy one
            edits += [Edit(site, layer, states[site][layer, p], position=0, rows=torch.cat(rr))
                      for (site, layer), rr in rows.items()]
            past = None
            if p > 0:
                past = copy.deepcopy(cache)
                past.crop(p - T)
                past.batch_repeat_interleave(r)  # row k * r + j: draw k, restoration j
            with trace(lm, edits=edits):
                h = lm.base(input_ids=ids[p:].expand(samples * r, -1), past_key_values=past,
                            use_cache=past is not None).last_hidden_state[:, -1]
            restored = lm.unembed(h).float().softmax(-1)[:, enc.target].view(samples, r).mean(0).cpu()
            for j, (site, c, _) in enumerate(chunk):
                probs[site][c, p] = restored[j]
    return clean, corrupted, probs


@torch.no_grad()
def restored_prob(lm: LM, enc: Encoded, noise: torch.Tensor, states: dict[str, torch.Tensor],
                  restore: list[tuple[str, int, int]]) -> float:
    """Naive building block: one full forward of the corrupted prompt (every noise draw a row) with the clean
    states restored at (hooks site, layer, position) for each entry of `restore`; P(answer), mean over draws."""
    noise = noise.to(lm.device, lm.dtype)
    edits = _noise_edit(noise, enc.start, 1, 0)
    edits += [Edit(site, layer, states[site][layer, p], position=p) for site, layer, p in restore]
    ids = torch.tensor([enc.ids], device=lm.device).expand(noise.shape[0], -1)
    with trace(lm, edits=edits):
        logits = lm.model(input_ids=ids, logits_to_keep=1).logits[:, -1]
    return logits.float().softmax(-1)[:, enc.target].mean().item()


def trace_naive(lm: LM, enc: Encoded, noise: torch.Tensor, window: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    """The reference: one forward pass per (site, layer, position), every position included."""
    n, T = lm.n_layers, len(enc.ids)
    clean, states = clean_run(lm, enc)
    corrupted = restored_prob(lm, enc, noise, states, [])
    probs = {"resid": torch.zeros(n + 1, T), "mlp": torch.zeros(n, T), "attn": torch.zeros(n, T)}
    for site, c, layers in windows(n, window):
        for p in range(T):
            probs[site][c, p] = restored_prob(lm, enc, noise, states, [(SITES[site], l, p) for l in layers])
    return clean, corrupted, probs


def trace_fact(lm: LM, fact: Fact, settings: TraceSettings, naive: bool = False) -> FactTrace:
    enc = encode_fact(lm.tokenizer, fact)
    noise = draw_noise(fact, enc.end - enc.start, lm.d_model, settings, noise_std(lm))
    run = trace_naive(lm, enc, noise, settings.window) if naive else \
        trace_fast(lm, enc, noise, settings.window, settings.batch_tokens)
    clean, corrupted, probs = run
    tokens = lm.tokenizer.convert_ids_to_tokens(enc.ids)
    return FactTrace(fact, [lm.tokenizer.convert_tokens_to_string([t]) for t in tokens], enc.start, enc.end,
                     clean, corrupted, probs)


# ---------------------------------------------------------------- actor-side stage work


@dataclass(frozen=True)
class TraceJob:
    stage: Stage
    fact: Fact
    settings: TraceSettings


def trace_job(lm: LM, job: TraceJob) -> tuple[FactTrace, bool]:
    """One fact's trace, found under the stage or computed and published (a killed run resumes per fact)."""
    item, computed = job.stage.get_or_compute(job.fact.key, lambda: trace_fact(lm, job.fact, job.settings).to_item())
    return FactTrace.from_item(item), computed


# ---------------------------------------------------------------- stage functions (driver side)

VERSION = 1  # of the trace computed here; part of the stage key


def find_known(conf: Config, facts: list[Fact], pool: ModelPool, chunk: int = 32) -> Known:
    """Which facts the model answers right (greedy first token), and the ones to trace (cheap: not stored)."""
    chunks = [facts[i:i + chunk] for i in range(0, len(facts), chunk)]
    correct = [ok for part in pool.map(answers, chunks, desc="causal trace: answers") for ok in part]
    ct = conf.causal_trace
    return select_known(facts, correct, ct.filter_correct, ct.max_facts)


@dataclass(frozen=True)
class Traced:
    """Every traced fact, and how many this run computed (the rest were found under the stage)."""

    url: str
    key: str
    traces: list[FactTrace]
    computed: int
    wall_s: float

    def metrics(self) -> dict[str, float]:
        return {"n_traced": len(self.traces), "computed": self.computed, "resumed": len(self.traces) - self.computed,
                "wall_s": self.wall_s}


def trace_facts(conf: Config, facts: list[Fact], pool: ModelPool) -> Traced:
    """Causal traces of `facts` on the model actors, one stage item per fact (named by the fact's content, so any
    fact set, order or rerun reuses what was traced with the same model, noise settings, window and seed)."""
    ct = conf.causal_trace
    settings = TraceSettings(ct.samples, ct.noise_scale, ct.window, ct.seed, ct.batch_tokens)
    stage = Stage.of(conf.store.root, "causal_trace", pool.describe().id, settings.key_params(), version=VERSION)
    t0 = time.perf_counter()
    done = pool.map(trace_job, [TraceJob(stage, f, settings) for f in facts], desc="causal trace (facts)")
    return Traced(stage.url, stage.key, [t for t, _ in done], sum(c for _, c in done), time.perf_counter() - t0)
