"""Attribution graphs: many target nodes per backward pass (a batch of copies of the prompt, one target per row)
against one backward pass per target node, on the same prompt and transcoders; checks the two adjacency matrices
agree to 1e-5 and prints the speed ratio.

    python benchmarks/bench_attribution.py [--model tiny-gemma3] [--prompt ...] [--batch 64] [--width 512] [--k 8]

Prompt length against time and memory (row-held against dense graphs): benchmarks/bench_attribution_length.py.

Transcoders are random (the cost does not depend on what they learned, only on how many features are active:
width and k set that). One thread, float32.
"""

from __future__ import annotations

import argparse
import time

import torch
from results import emit

from lensflow.tasks.circuits.attribution import attribute
from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.models import load_model


def random_transcoders(lm, width: int, k: int) -> dict[int, Transcoder]:
    out = {}
    for l in range(lm.n_layers):
        tc = Transcoder(lm.d_model, lm.d_model, width, k, seed=l)
        with torch.no_grad():
            tc.b_enc += 0.3
        out[l] = tc.requires_grad_(False)
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def prompt_of(lm, n_tokens: int) -> str:
    """A prompt of about n_tokens tokens (whole words of a repeated sentence)."""
    words = 'The opposite of "small" is "big", and the opposite of "hot" is "cold". '.split(" ")
    text = ""
    while len(lm.tokenizer(text).input_ids) < n_tokens:
        text += words[len(text.split(" ")) % len(words)] + " "
    return text.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gemma3")
    p.add_argument("--prompt", default='The opposite of "small" is "')
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    lm = load_model(ModelConf(name=args.model, device="cpu"))
    tcs = random_transcoders(lm, args.width, args.k)
    attribute(lm, tcs, args.prompt, batch_rows=args.batch)  # warm-up (imports, allocator)
    t0 = time.perf_counter()
    batched = attribute(lm, tcs, args.prompt, batch_rows=args.batch)
    t1 = time.perf_counter()
    single = attribute(lm, tcs, args.prompt, batch_rows=1)
    t2 = time.perf_counter()
    diff = float((batched.adjacency - single.adjacency).abs().max())
    assert diff <= 1e-5, f"batched and one-per-target adjacency differ by {diff}"
    rows = batched.n_features + len(batched.logit_tokens)
    print(f"{args.model}: {len(batched.tokens)} tokens, {rows} target rows, {batched.size} nodes; "
          f"batched ({args.batch} per pass) {t1 - t0:.2f} s, one per pass {t2 - t1:.2f} s; max |difference| {diff:.1e}")
    emit("attribution", "seconds per graph", f"{args.batch} targets per backward", "one backward per target",
         (t2 - t1) / (t1 - t0), model=args.model, tokens=len(batched.tokens), targets=rows,
         batched_s=round(t1 - t0, 3), single_s=round(t2 - t1, 3), max_abs_diff=diff)


if __name__ == "__main__":
    main()
