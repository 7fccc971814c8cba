"""Attribution graphs: many target nodes per backward pass (a batch of copies of the prompt, one target per row)
against one backward pass per target node, on the same prompt and transcoders; checks the two adjacency matrices
agree to 1e-5 and prints the speed ratio.

    python benchmarks/bench_attribution.py [--model tiny-gemma3] [--prompt ...] [--batch 64] [--width 512] [--k 8]
    python benchmarks/bench_attribution.py --lengths 8,32,128 [--max-feature-rows 64]

--lengths: prompt length against time and memory, each length in its own process (so its peak resident memory is
its own): seconds for the graph and for pruning and scoring it, peak RSS above the loaded model, and the dense graph's estimate
(attribution.graph_mib, what circuits.max_graph_mb is checked against).

Transcoders are random (the cost does not depend on what they learned, only on how many features are active:
width and k set that). One thread, float32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from results import emit

from lensflow.tasks.circuits.attribution import attribute, graph_mib
from lensflow.tasks.circuits.pruning import prune, scores
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


def one_length(args) -> None:
    """Child process: one graph at --length tokens; prints one JSON line."""
    torch.set_num_threads(1)
    lm = load_model(ModelConf(name=args.model, device="cpu"))
    tcs = random_transcoders(lm, args.width, args.k)
    prompt = prompt_of(lm, args.length)
    before = rss_mib()
    t0 = time.perf_counter()
    g = attribute(lm, tcs, prompt, batch_rows=args.batch, max_batch_tokens=4096,
                  max_feature_rows=args.max_feature_rows)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    prune(g, 0.8, 0.98), scores(g)
    prune_s = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": g.n_pos, "nodes": g.size, "rows": int(g.rows_computed.sum()), "seconds": seconds,
                      "prune_s": prune_s,
                      "peak_mib": peak - before, "dense_mib": 4 * g.size ** 2 / 2**20, "estimate_mib": graph_mib(g.size)}))


def lengths(args) -> None:
    torch.set_num_threads(1)  # the children's setting, so emit's kernel line says what ran
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        cmd = [sys.executable, __file__, "--length", str(n), "--model", args.model, "--batch", str(args.batch),
               "--width", str(args.width), "--k", str(args.k), "--max-feature-rows", str(args.max_feature_rows)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"{args.model}, width {args.width}, k {args.k}, {args.max_feature_rows} feature rows, one thread:")
    print("| tokens | nodes | rows | attribution s | prune+scores s | peak RSS above model (MiB) | dense adjacency (MiB) "
          "| max_graph_mb estimate (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['nodes']} | {r['rows']} | {r['seconds']:.2f} | {r['prune_s']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['dense_mib']:.0f} | {r['estimate_mib']:.0f} |")
    first, last = rows[0], rows[-1]
    emit("attribution", "seconds per graph", f"{first['tokens']} tokens", f"{last['tokens']} tokens",
         last["seconds"] / first["seconds"], model=args.model, rows=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gemma3")
    p.add_argument("--prompt", default='The opposite of "small" is "')
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--lengths", help="comma-separated prompt lengths (tokens): time and memory per length")
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-feature-rows", type=int, default=64)
    args = p.parse_args()
    if args.length:
        return one_length(args)
    if args.lengths:
        return lengths(args)
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
