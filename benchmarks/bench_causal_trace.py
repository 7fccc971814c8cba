"""Causal tracing: the exact batched trace (one pass per restored position, the corrupted run's key/value cache
shared) against the naive method (one full forward pass per (site, layer, position)), on the same facts and the same
seeded noise draws. Prints the time of each, their ratio and the largest difference in P(answer).

    python benchmarks/bench_causal_trace.py [--model smollm2-135m] [--facts 3] [--samples 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from results import emit

from lensflow.tasks.causal_trace.config import CausalTraceConf
from lensflow.tasks.causal_trace.facts import answers, load_facts, select_known
from lensflow.tasks.causal_trace.tracing import TraceSettings, trace_fact
from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=3)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(ModelConf(name=args.model))
    facts = load_facts()
    known = select_known(facts, answers(lm, facts), True, args.facts).facts
    settings = TraceSettings(args.samples, 3.0, args.window, 0, CausalTraceConf().batch_tokens)
    print(f"{lm.name}: {lm.n_layers} layers, {args.samples} noise draws, window {args.window}; "
          f"torch threads {torch.get_num_threads()}")
    t_fast = t_naive = 0.0
    worst = 0.0
    for fact in known:
        t0 = time.perf_counter()
        fast = trace_fact(lm, fact, settings)
        t1 = time.perf_counter()
        naive = trace_fact(lm, fact, settings, naive=True)
        t2 = time.perf_counter()
        diff = max((fast.probs[s] - naive.probs[s]).abs().max().item() for s in fast.probs)
        diff = max(diff, abs(fast.corrupted - naive.corrupted), abs(fast.clean - naive.clean))
        cells = sum(p.numel() for p in fast.probs.values())
        print(f"  {fact.prompt!r} -> {fact.target!r}: {len(fast.tokens)} tokens, {cells} restorations; fast "
              f"{t1 - t0:.1f} s, naive {t2 - t1:.1f} s, max |diff| {diff:.2e}")
        t_fast, t_naive, worst = t_fast + t1 - t0, t_naive + t2 - t1, max(worst, diff)
    print(f"total: fast {t_fast:.1f} s, naive {t_naive:.1f} s, speed-up {t_naive / t_fast:.1f}x, "
          f"max |diff| {worst:.2e} over {len(known)} facts")
    emit("causal_trace", "time per fact", "batched exact trace (shared KV cache)", "one forward per restoration",
         t_naive / t_fast, max_abs_diff=worst)


if __name__ == "__main__":
    main()
