"""ROME/MEMIT value optimisation benchmark (single process, no Ray/MLflow), on SmolLM2 by default:
`rome.optimise_value` (the tokens before each subject's last one cached once, each step runs the rest) against the
naive loop written here (each step runs every row whole, as ROME's reference code does); both optimise the same loss
from the same start, so the values agree to float rounding; the ratio is the naive time over the cached.

    python benchmarks/bench_edit_values.py [--model smollm2-135m] [--requests 3] [--layer 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from results import emit

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.hooks import Edit, trace
from lensflow.tasks.core.models import load_model
from lensflow.tasks.editing.pipeline import context_prefixes
from lensflow.tasks.editing.requests import load_requests
from lensflow.tasks.editing.rome import (
    ValueRows,
    ValueSettings,
    _batch,
    encode,
    optimise_value,
    read_at_subject,
)


def naive_value(lm, req, site, layer, prefixes, st: ValueSettings) -> torch.Tensor:
    """The same loss and optimiser, every row run whole at every step."""
    tok = lm.tokenizer
    vr = ValueRows.of(tok, req, prefixes)
    ids, mask = _batch(lm, vr.rows)
    positions = torch.tensor(vr.subject)
    kl_last = len(vr.rows[-1]) - 1
    v = read_at_subject(lm, site, layer, [encode(tok, req.prompt, req.subject)])[0]
    with torch.no_grad():
        base = lm.model(input_ids=ids[-1:], attention_mask=mask[-1:]).logits[0, kl_last].float().log_softmax(-1)
    delta = torch.zeros_like(v, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=st.lr)
    limit = st.clamp_norm * v.norm()
    for _ in range(st.steps):
        opt.zero_grad()
        with trace(lm, edits=[Edit(site, layer, delta, position=positions, mode="add")]):
            logp = lm.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        nll = torch.stack([-logp[i, s + torch.arange(len(t)), torch.tensor(t)].mean()
                           for i, (s, t) in enumerate(vr.targets)]).mean()
        kl_div = (base.exp() * (base - logp[-1, kl_last])).sum()
        (nll + st.kl_factor * kl_div + st.weight_decay * delta.norm() ** 2 / v.norm() ** 2).backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    return delta.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--layer", type=int, default=4)
    args = ap.parse_args()
    lm = load_model(ModelConf(name=args.model))
    st = ValueSettings(steps=20, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm=4.0)  # the edit defaults
    prefixes = context_prefixes(5, 0)
    reqs = load_requests()[:args.requests]
    t = {"cached": 0.0, "naive": 0.0}
    err = 0.0
    for req in reqs:
        t0 = time.perf_counter()
        fast = optimise_value(lm, req, "mlp_out", args.layer, prefixes, st).delta
        t["cached"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = naive_value(lm, req, "mlp_out", args.layer, prefixes, st)
        t["naive"] += time.perf_counter() - t0
        err = max(err, ((fast - slow).norm() / slow.norm()).item())
    assert err < 1e-3, f"cached and naive values differ by {err:g} (relative norm)"
    print(f"{args.model}, {len(reqs)} requests at mlp_out {args.layer}, {st.steps} steps: cached {t['cached']:.2f} s, "
          f"naive {t['naive']:.2f} s, max relative |diff| {err:.2e}")
    emit("edit", "value optimisation (per request)", "fixed tokens cached once", "every row whole each step",
         t["naive"] / t["cached"], cached_s=round(t["cached"] / len(reqs), 3), naive_s=round(t["naive"] / len(reqs), 3),
         max_rel_diff=err)


if __name__ == "__main__":
    main()
