"""Prompt length against time and peak memory: the row-held graph (only the computed rows, [rows, nodes]) against the
unchunked dense layout (every node's row slot, [nodes, nodes]) on the same prompt and transcoders, each length and
method in its own process (so each peak resident memory is its own). Checks the two give the same graph: the same
edges, pruned nodes and edges, and scores.

    python benchmarks/bench_attribution_length.py [--model tiny-gemma3] [--lengths 8,16,32,64,128]
        [--width 512] [--k 8] [--max-feature-rows 64] [--dense-max-mb 4096]

The dense method runs only where its estimate (attribution.graph_mib) is under --dense-max-mb. Transcoders are
random (the cost depends on how many features are active, which width and k set). One thread, float32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from bench_attribution import prompt_of, random_transcoders, rss_mib
from results import emit

from lensflow.tasks.circuits.attribution import attribute, graph_mib, max_nodes
from lensflow.tasks.circuits.pruning import prune, scores
from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.models import load_model


def one(args) -> None:
    """Child process: one graph at --length tokens with --method; prints one JSON line."""
    torch.set_num_threads(1)
    lm = load_model(ModelConf(name=args.model, device="cpu"))
    tcs = random_transcoders(lm, args.width, args.k)
    prompt = prompt_of(lm, args.length)
    before = rss_mib()
    t0 = time.perf_counter()
    g = attribute(lm, tcs, prompt, batch_rows=64, max_batch_tokens=4096, max_feature_rows=args.max_feature_rows,
                  dense=args.method == "dense")
    t1 = time.perf_counter()
    pr, s = prune(g, 0.8, 0.98), scores(g)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    edges = sorted(zip(g.rows[pr.edges.nonzero(as_tuple=True)[0]].tolist(), pr.edges.nonzero(as_tuple=True)[1].tolist()))
    print(json.dumps({"tokens": g.n_pos, "nodes": g.size, "rows": int((g.weights != 0).any(1).sum()),
                      "attribution_s": t1 - t0, "prune_s": t2 - t1, "peak_mib": peak - before,
                      "replacement": s.replacement, "completeness": s.completeness,
                      "kept_nodes": int(pr.nodes.sum()), "kept_edges": len(edges),
                      "edges_hash": hash(tuple(edges)) & 0xFFFFFFFF,
                      "weights_sum": float(g.weights.abs().double().sum())}))


def child(args, n: int, method: str) -> dict:
    cmd = [sys.executable, __file__, "--length", str(n), "--method", method, "--model", args.model,
           "--width", str(args.width), "--k", str(args.k), "--max-feature-rows", str(args.max_feature_rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-gemma3")
    p.add_argument("--lengths", default="8,16,32,64,128")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-feature-rows", type=int, default=64)
    p.add_argument("--dense-max-mb", type=float, default=4096)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["rows", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.length:
        return one(args)
    torch.set_num_threads(1)
    lm = load_model(ModelConf(name=args.model, device="cpu"))
    print(f"{args.model}, width {args.width}, k {args.k}, {args.max_feature_rows} feature rows, one thread:")
    print("| tokens | nodes | rows | rows: attribution s | prune+scores s | peak MiB | dense: attribution s "
          "| prune+scores s | peak MiB | same graph |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for n in [int(x) for x in args.lengths.split(",")]:
        r = child(args, n, "rows")
        bound = max_nodes(lm.n_layers, r["tokens"], args.k, 10)
        d = child(args, n, "dense") if graph_mib(bound) <= args.dense_max_mb else None
        same = "-"
        if d is not None:
            keys = ("nodes", "kept_nodes", "kept_edges", "edges_hash")
            assert all(r[k] == d[k] for k in keys), (r, d)
            for k in ("replacement", "completeness"):  # sums over r rows or n rows: the last bit may differ
                assert abs(r[k] - d[k]) <= 1e-12, (k, r[k], d[k])
            assert abs(r["weights_sum"] - d["weights_sum"]) <= 1e-9 * max(1.0, r["weights_sum"]), (r, d)
            same = "yes"
        dense_cols = (f"{d['attribution_s']:.2f} | {d['prune_s']:.2f} | {d['peak_mib']:.0f}" if d else
                      f"not run (estimate {graph_mib(bound):.0f} MiB) | | ")
        print(f"| {r['tokens']} | {r['nodes']} | {r['rows']} | {r['attribution_s']:.2f} | {r['prune_s']:.2f} | "
              f"{r['peak_mib']:.0f} | {dense_cols} | {same} |", flush=True)
        results.append((r, d))
    both = [(r, d) for r, d in results if d is not None]
    if both:
        r, d = both[-1]
        emit("attribution length", "peak MiB", f"rows only, {r['tokens']} tokens", "dense",
             d["peak_mib"] / max(r["peak_mib"], 1.0), model=args.model,
             seconds_ratio=(d["attribution_s"] + d["prune_s"]) / (r["attribution_s"] + r["prune_s"]),
             rows=[x for x, _ in results], dense=[y for _, y in results])


if __name__ == "__main__":
    main()
