"""Future Lens benchmark (single process, no Ray/MLflow), on SmolLM2 by default.

  1. learned-prompt training throughput (samples/s, seconds per layer at the configured step count), with the
     shared-prompt KV cache (tasks.soft_prompt) against the plain full-sequence forward as the baseline;
  2. linear model approximation: closed-form ridge (streamed statistics, validation-chosen penalty) against the
     SGD recipe (Adam on squared error), time and test Precision@1 side by side, per N.

    python benchmarks/bench_future_lens.py [--model smollm2-135m] [--texts 48] [--layer 15] [--steps 6]
"""

from __future__ import annotations

import argparse
import time

import torch
from results import emit

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.future_lens.config import FutureLensConf
from lensflow.tasks.future_lens.metrics import decoded_scores
from lensflow.tasks.future_lens.ridge import RidgeStats, fit_linear_sgd, fit_ridge
from lensflow.tasks.future_lens.samples import (
    Block,
    PrepItem,
    candidate_windows,
    memory_batches,
    prepare_windows,
    scan_texts,
)
from lensflow.tasks.future_lens.soft_prompt import (
    prompt_embeddings,
    teacher_logprobs,
    train_soft_prompt,
)


def samples(lm, n_texts: int, layer: int, max_tokens: int = 48) -> dict[str, torch.Tensor]:
    texts = builtin_texts(n_texts, seed=1)
    scans = scan_texts(lm, (texts, max_tokens, 4))
    windows = candidate_windows(scans)
    prep = prepare_windows(lm, PrepItem(windows, max_tokens, 4))
    keep = torch.from_numpy(prep["keep"])
    prefixes = [str(p) for p, k in zip(prep["prefix"], keep) if k]
    hs = []
    for i in range(0, len(prefixes), 32):
        enc = lm.encode(prefixes[i : i + 32], max_tokens)
        with torch.no_grad(), trace(lm, reads=[Read("resid", layer, position=enc["last"])]) as t:
            t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=layer)
        hs.append(t["resid", layer])
    text_id = torch.tensor([w.text_id for w in windows])[keep]
    return {"h": torch.cat(hs), "greedy": torch.from_numpy(prep["greedy"])[keep], "final": torch.from_numpy(prep["final"])[keep],
            "text_id": text_id}


def soft_prompt_throughput(lm, data: dict, layer: int, steps: int, batch: int, conf_steps: int) -> None:
    init = prompt_embeddings(lm, FutureLensConf().soft_prompt_init, 10)
    batches = memory_batches(Block(data["greedy"], data["h"], data["final"]), batch)
    train_soft_prompt(lm, layer, batches, init, 1, 0.1)  # warm-up
    t0 = time.perf_counter()
    train_soft_prompt(lm, layer, batches, init, steps, 0.1)
    cached = time.perf_counter() - t0

    # baseline: the same loss with the whole prompt recomputed for every sample (no shared KV cache)
    import lensflow.tasks.future_lens.soft_prompt as sp

    soft = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=1e-3)
    t0 = time.perf_counter()
    for _, mb in zip(range(steps), batches):
        logits = sp.transplant_logits(lm, soft, layer, mb.h, mb.greedy[:, :3], use_cache=False)
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1).flatten(0, 1),
                                          teacher_logprobs(lm, mb.final).flatten(0, 1), log_target=True,
                                          reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    plain = time.perf_counter() - t0
    n = steps * batch
    print(f"\n[soft prompt training] layer {layer}, batch {batch}, {steps} steps, torch threads {torch.get_num_threads()}")
    print(f"  {'':24s}{'samples/s':>10s}{'s/step':>9s}{f's/layer ({conf_steps} steps)':>24s}")
    for name, sec in (("shared-prompt KV cache", cached), ("plain full sequence", plain)):
        print(f"  {name:24s}{n / sec:10.1f}{sec / steps:9.2f}{sec / steps * conf_steps:24.0f}")
    print(f"  speed-up of the cache: {plain / cached:.2f}x")
    emit("future_lens", "soft-prompt training time", "shared-prompt KV cache", "full sequence per sample",
         plain / cached)


def linear_approximation(lm, data: dict, layer: int, ks=(1, 5)) -> None:
    tid = data["text_id"]
    test_mask = tid % 5 == 0  # split by text
    tr = {k: v[~test_mask] for k, v in data.items()}
    te = {k: v[test_mask] for k, v in data.items()}
    n_tr = tr["h"].shape[0]
    y = tr["final"].flatten(1)
    t0 = time.perf_counter()
    n_val = max(1, n_tr // 10)
    fit, val = RidgeStats(), RidgeStats()
    fit.add(tr["h"][:-n_val], y[:-n_val])
    val.add(tr["h"][-n_val:], y[-n_val:])
    ridges = FutureLensConf().ridge
    _, _, info = fit_ridge(fit, val, ridges, 4)
    w, b, _ = fit_ridge(fit.merge(val), None, ridges, 4, chosen=info["ridge"])
    closed = time.perf_counter() - t0
    res = {}
    res["closed-form ridge"] = (closed, decoded_scores(lm, (te["h"] @ w + b).view(len(te["h"]), 4, -1), te["greedy"], ks, 50))
    for steps in (200, 1000):
        t0 = time.perf_counter()
        w2, b2, _ = fit_linear_sgd(tr["h"], y, steps=steps, lr=1e-3, batch=128)
        sec = time.perf_counter() - t0
        res[f"Adam MSE, {steps} steps"] = (sec, decoded_scores(lm, (te["h"] @ w2 + b2).view(len(te["h"]), 4, -1),
                                                               te["greedy"], ks, 50))
    print(f"\n[linear model approximation] layer {layer}: {n_tr} train / {len(te['h'])} test samples "
          f"(ridge chosen per N: {info['ridge']})")
    print(f"  {'':24s}{'fit s':>8s}" + "".join(f"{f'P@1 N={n}':>10s}" for n in range(4)) + f"{'vs ridge time':>15s}")
    for name, (sec, m) in res.items():
        print(f"  {name:24s}{sec:8.2f}" + "".join(f"{x.p_at_1:10.3f}" for x in m) + f"{sec / closed:14.1f}x")
    sgd_s, sgd = res["Adam MSE, 1000 steps"]
    emit("future_lens", "linear map fit time", "closed-form ridge", "Adam on squared error, 1000 steps", sgd_s / closed,
         p_at_1_n1={"ridge": res["closed-form ridge"][1][1].p_at_1, "adam": sgd[1].p_at_1})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(ModelConf(name=args.model))
    t0 = time.perf_counter()
    data = samples(lm, args.texts, args.layer)
    print(f"{args.model}: {data['h'].shape[0]} model-correct samples from {args.texts} texts "
          f"({time.perf_counter() - t0:.0f} s to prepare)")
    soft_prompt_throughput(lm, data, args.layer, args.steps, args.batch, FutureLensConf().soft_prompt_steps)
    linear_approximation(lm, data, args.layer)


if __name__ == "__main__":
    main()
