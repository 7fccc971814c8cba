"""Tuned-lens training step throughput: the naive loss vs the one tasks/lenses/readouts.py uses, side by side.

naive     : target distribution recomputed from the last layer every step (a second vocab-sized matmul), KL from
            two full log-softmaxes, autograd's logsumexp, fp32 (what a first implementation writes)
compact   : the O(d) targets (u = W^T p, c = H(p) + p.b) computed once, the fused logsumexp, fp32
compact16 : the same with the frozen unembedding in bf16
auto      : the dtype lenses.compute_dtype=auto picks on this machine (tasks/core/kernels.py), printed
Same states, same translator, one thread (a per-layer Ray task gets one CPU). Prints tokens/s and ratios, and
checks that the losses agree.

    python benchmarks/bench_tuned_lens.py [--model smollm2-135m] [--tokens 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from results import emit

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.kernels import compute_dtype, cpu_flags
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.lenses.readouts import (
    Readout,
    Translator,
    final_targets,
    kl_and_top1,
)


def naive_loss(readout: Readout, tr: Translator, h: torch.Tensor, h_last: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(readout(h_last), -1)
    logq = torch.log_softmax(readout(tr(h)), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def timed(step, steps: int) -> tuple[float, float]:
    loss = step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return (time.perf_counter() - t0) / steps, loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per training step (lenses.batch_tokens)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layer", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(ModelConf(name=args.model))
    layer = args.layer if args.layer is not None else lm.n_layers // 2
    enc = lm.encode(builtin_texts(8), 32)
    with trace(lm, reads=[Read("resid", layer), Read("resid", lm.n_layers)]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    mask = enc["attention_mask"].bool()
    h, h_last = t["resid", layer][mask][: args.tokens].float(), t["resid", lm.n_layers][mask][: args.tokens].float()
    readout = Readout.from_lm(lm)
    head16 = copy.deepcopy(readout).to(torch.bfloat16)
    picked = compute_dtype("auto", torch.device("cpu"), (len(h), lm.d_model, lm.vocab_size))
    head_auto = copy.deepcopy(readout).to(picked)
    targets = final_targets(readout, h_last)

    def make(loss_fn):
        torch.manual_seed(0)
        tr = Translator(lm.d_model)
        torch.nn.init.normal_(tr.linear.weight, std=1e-3)
        opt = torch.optim.AdamW(tr.parameters(), lr=0.0)  # lr 0: every step sees the same translator

        def step() -> float:
            loss = loss_fn(tr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    runs = {
        "naive": make(lambda tr: naive_loss(readout, tr, h, h_last)),
        "compact": make(lambda tr: kl_and_top1(readout, tr(h), targets, top1=False)[0].mean()),
        "compact16": make(lambda tr: kl_and_top1(head16, tr(h), targets, top1=False)[0].mean()),
        "auto": make(lambda tr: kl_and_top1(head_auto, tr(h), targets, top1=False)[0].mean()),
    }
    res = {name: timed(step, args.steps) for name, step in runs.items()}
    base = res["naive"][0]
    native = sorted(f for f in cpu_flags() if "bf16" in f) or ["none"]
    print(f"{args.model}, layer {layer}, {len(h)} tokens/step, vocab {lm.vocab_size}, 1 thread; "
          f"{platform.processor() or platform.machine()}, native bf16 flags: {' '.join(native)}; "
          f"auto picks {str(picked).removeprefix('torch.')}")
    print(f"{'variant':10s} {'s/step':>8s} {'tokens/s':>9s} {'speed-up':>9s} {'loss':>9s}")
    for name, (sec, loss) in res.items():
        print(f"{name:10s} {sec:8.3f} {len(h) / sec:9.0f} {base / sec:8.2f}x {loss:9.4f}")
    emit("tuned_lens", "training step time", "compact loss, fp32", "naive loss, fp32", base / res["compact"][0])
    emit("tuned_lens", "training step time", "compact loss, lenses.compute_dtype=auto", "naive loss, fp32",
         base / res["auto"][0], kernel=str(picked).removeprefix("torch."))
    assert abs(res["compact"][1] - res["naive"][1]) <= 1e-3 * max(1.0, abs(res["naive"][1])), "compact loss != naive loss"


if __name__ == "__main__":
    main()
