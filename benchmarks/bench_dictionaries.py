"""Dictionaries for every layer from one activation store: one pass over the store (each chunk read once, all layers
at a time, every layer's SAE stepped on its slice) against one pass per layer (what the multilingual flow's per-layer
Ray tasks do: each reads its own layer's objects, `token_blocks`), side by side on the same store and the same SAE
steps. The store keeps one layer of one chunk per object, so both read the same bytes; the ratio is what reading
per layer costs beyond that (token ids read again, one request per layer object, smaller decompressions).

    python benchmarks/bench_dictionaries.py [--prompts 128] [--tokens 64] [--layers 7] [--d 640] [--train-tokens 256]

Activations are random normal (incompressible, like real float32 activations), shaped like Gemma 3 270M's
multilingual store (d 640, 7 resid layers, chunks of 32 prompts). Prints seconds and ratios; one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from results import emit

from lensflow.tasks.core import store
from lensflow.tasks.core.dictionaries.autoencoder import SparseAutoencoder
from lensflow.tasks.multilingual.sae import loss_terms, token_blocks, token_mask


def make_store(url: str, n: int, t: int, layers: int, d: int, chunk: int, seed: int = 0) -> store.Activations:
    rng = np.random.default_rng(seed)
    spec = store.StoreSpec(n=n, max_tokens=t, d_model=d, n_heads=1, head_dim=d, layers=list(range(layers)), blocks=[],
                           positions="all", sites=["resid"], dtype="float32", chunk_size=chunk, compression_level=3,
                           attrs={"fingerprint": "bench"})
    store.create(url, spec, [f"text {i}" for i in range(n)])
    lengths = rng.integers(t // 2, t + 1, n)
    for c in range(spec.n_chunks):
        rows = spec.rows(c)
        m = rows.stop - rows.start
        ids = np.where(np.arange(t)[None] < lengths[rows, None], 7, -1).astype(np.int32)
        acts = rng.standard_normal((m, t, layers, d), dtype=np.float32) * (ids >= 0)[..., None, None]
        store.write_chunk(url, c, rows, {"resid": acts, "token_ids": ids, "lengths": lengths[rows].astype(np.int32)})
    store.mark_complete(url)
    return store.Activations(url)


class Steps:
    """One Adam step per (layer, block) on `train_tokens` tokens of the block: the same work for both read orders."""

    def __init__(self, d: int, layers: int, width: int, k: int, train_tokens: int):
        self.saes = [SparseAutoencoder(d, width, "topk", k, seed=l) for l in range(layers)]
        self.opts = [torch.optim.Adam(s.parameters(), lr=1e-3) for s in self.saes]
        self.train_tokens, self.steps = train_tokens, 0

    def __call__(self, layer: int, block: np.ndarray) -> None:
        if self.train_tokens == 0:
            return
        x = torch.from_numpy(block[: self.train_tokens])
        loss, _ = loss_terms(self.saes[layer], x, 0.0)
        self.opts[layer].zero_grad(set_to_none=True)
        loss.backward()
        self.opts[layer].step()
        self.steps += 1


def per_layer(acts: store.Activations, step: Steps) -> None:
    for i, layer in enumerate(acts.layers):
        for block in token_blocks(acts, layer, slice(0, acts.n), acts.chunk_rows, True):
            step(i, block)


def one_pass(acts: store.Activations, step: Steps) -> None:
    for lo in range(0, acts.n, acts.chunk_rows):
        rows = slice(lo, min(acts.n, lo + acts.chunk_rows))
        x = np.asarray(acts.resid[rows])  # [rows, T, L, d]: every layer of the chunk in one read
        mask = token_mask(acts.token_ids[rows], True)
        for i in range(len(acts.layers)):
            step(i, x[:, :, i][mask])


def timed(fn, acts: store.Activations, make: callable) -> float:
    step = make()
    t0 = time.perf_counter()
    fn(acts, step)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--train-tokens", type=int, default=256, help="tokens per SAE step (0: read only)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        acts = make_store(f"{tmp}/store", args.prompts, args.tokens, args.layers, args.d, args.chunk)
        mb = args.prompts * args.tokens * args.layers * args.d * 4 / 2**20
        print(f"store: {args.prompts} prompts x {args.tokens} tokens x {args.layers} layers x d {args.d} "
              f"({mb:.0f} MiB float32), chunks of {args.chunk}; 1 thread")
        for label, tokens in (("read only", 0), (f"read + SAE steps ({args.train_tokens} tokens)", args.train_tokens)):
            make = lambda: Steps(args.d, args.layers, 4 * args.d, 32, tokens)  # noqa: E731
            res = {name: min(timed(fn, acts, make) for _ in range(args.repeats))
                   for name, fn in (("per layer", per_layer), ("one pass", one_pass))}
            ratio = res["per layer"] / res["one pass"]
            print(f"{label:40s} per layer {res['per layer']:7.2f} s   one pass {res['one pass']:7.2f} s   "
                  f"ratio {ratio:.2f}")
            emit("dictionaries", f"all layers' SAEs from one store: {label.split(' (')[0]}", "one pass over the store",
                 "one pass per layer", ratio, store_mib=round(mb), layers=args.layers)


if __name__ == "__main__":
    main()
