"""Activation extraction: prompts -> model actors -> zarr store, resumable and chunk-parallel.

The driver never loads the model: one actor describes it (shape, identity), the driver names and sizes the store,
and each actor computes and writes whole chunks itself, so the driver only moves chunk indices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lensflow.tasks.core import store
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config, ConfigError
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import LM, ModelInfo
from lensflow.tasks.core.stages import Stage, digest


@dataclass(frozen=True)
class ChunkJob:
    url: str
    chunk: int
    texts: list[str]
    spec: store.StoreSpec


@torch.inference_mode()
def compute_chunk(lm: LM, job: ChunkJob) -> dict[str, np.ndarray]:
    """Activations of one chunk of prompts, cut after the last stored layer (no later blocks, no logits)."""
    spec = job.spec
    enc = lm.encode(job.texts, max_tokens=spec.max_tokens)
    ids, mask, last = enc["input_ids"], enc["attention_mask"], enc["last"]
    pos = last if spec.positions == "last" else None
    block_sites = [site for site in store.BLOCK_SITES if site in spec.sites]
    reads = [Read("resid", l, pos) for l in spec.layers] if "resid" in spec.sites else []
    reads += [Read(site, b, pos) for site in block_sites for b in spec.blocks]
    deepest = max([*(spec.layers if "resid" in spec.sites else []), *(b + 1 for b in spec.blocks if block_sites)])
    with trace(lm, reads=reads) as t:
        t.forward(input_ids=ids, attention_mask=mask, until=deepest)
    b, s = ids.shape
    store_dtype = getattr(torch, spec.dtype)

    def stack(site: str, layers: list[int]) -> np.ndarray:
        """One layer at a time: masked and cast to the store dtype on the device, then copied into a host array,
        so the device never holds the stacked layers (in float32) beside the model's own outputs."""
        axis = 1 if spec.positions == "last" else 2  # the layer axis
        first = t[site, layers[0]]
        shape = [*first.shape]
        if spec.positions == "all":
            shape[1] = spec.max_tokens
        out = torch.zeros(*shape[:axis], len(layers), *shape[axis:], dtype=store_dtype)
        for i, l in enumerate(layers):
            x = t.values.pop((site, l))  # released as soon as it is copied
            if spec.positions == "all":  # zeros past each row's end; the token axis is padded by `out`
                x = x * mask.view(b, s, *[1] * (x.ndim - 2)).to(x.dtype)
            out.select(axis, i)[:, :x.shape[1]] = x.to(store_dtype).cpu()
        return out.numpy()

    token_ids = torch.full((b, spec.max_tokens), -1, dtype=torch.int32)
    token_ids[:, :s] = torch.where(mask.bool(), ids, -1).to(torch.int32).cpu()
    out = {"token_ids": token_ids.numpy(), "lengths": mask.sum(1).to(torch.int32).cpu().numpy()}
    if "resid" in spec.sites:
        out["resid"] = stack("resid", spec.layers)
    for site in block_sites:
        out[site] = stack(site, spec.blocks)
    return out


def extract_chunk(lm: LM, job: ChunkJob) -> dict:
    """Actor-side unit of work: compute one chunk and write it (the actor owns the chunk)."""
    t0 = time.perf_counter()
    arrays = compute_chunk(lm, job)
    store.write_chunk(job.url, job.chunk, job.spec.rows(job.chunk), arrays)
    return {"chunk": job.chunk, "tokens": int(arrays["lengths"].sum()), "seconds": time.perf_counter() - t0}


VERSION = 1  # of the activation layout computed here; part of every store's key


def plan(conf: Config, texts: list[str], info: ModelInfo, label: str) -> tuple[Stage, store.StoreSpec]:
    """The store's stage (its key covers the model, the texts and every store setting that changes the bytes)
    and its layout. `label` only names the store in logs: two flows extracting the same texts share one store."""
    sc = conf.store
    n_layers = info.n_layers
    layers = sorted(set(sc.layers)) if sc.layers is not None else list(range(n_layers + 1))
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise ConfigError(f"config key 'store.layers': {bad} out of range 0..{n_layers} for {info.name}")
    blocks = [l for l in layers if l < n_layers] if sc.layers is not None else list(range(n_layers))
    params = {**sc.model_dump(mode="json", exclude={"root", "shared"}), "layers": layers, "max_tokens": conf.data.max_tokens,
              "texts": digest(texts)}
    stage = Stage.of(sc.root, "activations", info.id, params, version=VERSION)
    spec = store.StoreSpec(
        n=len(texts), max_tokens=conf.data.max_tokens, d_model=info.d_model, n_heads=info.n_heads,
        head_dim=info.head_dim, layers=layers, blocks=blocks, positions=sc.positions, sites=list(sc.sites),
        dtype=sc.dtype, chunk_size=sc.chunk_size, compression_level=sc.compression_level,
        attrs={"fingerprint": stage.key, "model": info.name, "weights_hash": info.id.weights_hash, "label": label,
               "store": params},
    )
    return stage, spec


@dataclass(frozen=True)
class Extraction:
    """A finished activation store and what it cost this run (zero computed chunks when it was found)."""

    url: str
    key: str
    n_prompts: int
    chunks_total: int
    chunks_computed: int
    tokens_computed: int
    wall_s: float

    @property
    def chunks_resumed(self) -> int:
        return self.chunks_total - self.chunks_computed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_computed / self.wall_s if self.wall_s > 0 and self.tokens_computed else 0.0

    def metrics(self) -> dict[str, float]:
        return {"n_prompts": self.n_prompts, "chunks_total": self.chunks_total, "chunks_computed": self.chunks_computed,
                "chunks_resumed": self.chunks_resumed, "tokens_computed": self.tokens_computed,
                "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s}


def extract(conf: Config, texts: list[str], pool: ModelPool, label: str = "prompts") -> Extraction:
    """Extract (or finish extracting, or find) the activations of `texts` under store.root."""
    stage, spec = plan(conf, texts, pool.describe(), label)
    with stage.claim():
        group = store.create(stage.url, spec, texts)
    todo = store.pending_chunks(group)
    t0 = time.perf_counter()
    jobs = [ChunkJob(stage.url, c, texts[spec.rows(c)], spec) for c in todo]
    results = pool.map(extract_chunk, jobs, desc=f"extract {label}")
    wall = time.perf_counter() - t0
    store.mark_complete(stage.url)
    return Extraction(stage.url, stage.key, spec.n, spec.n_chunks, len(todo), sum(r["tokens"] for r in results), wall)
