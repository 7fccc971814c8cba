"""LRE Jacobian benchmark (single process, no Ray/MLflow), on SmolLM2 by default: the batched Jacobian of
tasks/relations/jacobian.py (one forward, then the d backwards vectorised by autograd's batched gradients) against the
per-dimension loop (one forward, one backward per output dimension at a time); both give W to 1e-5, the ratio is the loop's time over the batched.

    python benchmarks/bench_lre_jacobian.py [--model smollm2-135m] [--layer 4] [--rows 0] [--repeat 1]
"""

from __future__ import annotations

import argparse
import time

from results import emit

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.models import load_model
from lensflow.tasks.relations.data import load_relations, split
from lensflow.tasks.relations.jacobian import encode_prompt, jacobian, jacobian_loop
from lensflow.tasks.relations.lre import demos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--rows", type=int, default=0, help="cotangents per batched backward (0 = d_model: one)")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    lm = load_model(ModelConf(name=args.model))
    rel = next(r for r in load_relations() if r.name == "adjective antonym")
    sp = split(rel, 4, 2, None, 0)
    prompt = encode_prompt(lm.tokenizer, demos(rel, sp.train[1:]), rel.template, sp.train[0].subject)
    jacobian(lm, prompt, args.layer, 8)  # warm-up
    t = {"batched": [], "loop": []}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fast = jacobian(lm, prompt, args.layer, args.rows or None)
        t["batched"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slow = jacobian_loop(lm, prompt, args.layer)
        t["loop"].append(time.perf_counter() - t0)
    err = (fast.jacobian - slow.jacobian).abs().max().item()
    assert err < 1e-5, f"batched and per-dimension Jacobians differ by {err:g}"
    batched, loop = min(t["batched"]), min(t["loop"])
    print(f"{args.model} layer {args.layer}, prompt {len(prompt.ids)} tokens ({len(prompt.ids) - prompt.subject_last} "
          f"after the subject's last): batched {batched:.2f} s, per-dimension loop {loop:.2f} s, max |diff| {err:.2e}")
    emit("lre", "Jacobian time (one sample)", f"batched backward ({args.rows or lm.d_model} cotangents)",
         f"per-dimension loop ({lm.d_model} backwards)", loop / batched, batched_s=round(batched, 3),
         loop_s=round(loop, 3), max_abs_diff=err)


if __name__ == "__main__":
    main()
