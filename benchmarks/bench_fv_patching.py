"""Function-vector head patching: the exact fast patching (one prefix pass + one packed pass of n_layers * n_heads
single-token rows) against the naive method (one full forward pass per head), side by side on the same
shuffled-label 10-shot prompts. Prints the time of each, their ratio and the largest difference.

    python benchmarks/bench_fv_patching.py [--model smollm2-135m] [--prompts 2] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from results import emit

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.hooks import Edit, trace
from lensflow.tasks.core.models import load_model
from lensflow.tasks.function_vectors.config import FunctionVectorsConf
from lensflow.tasks.function_vectors.heads import indirect_effects, mean_head_outputs
from lensflow.tasks.function_vectors.icl import answer_token, load_pairs, split
from lensflow.tasks.function_vectors.patching import icl_prompts, template


@torch.no_grad()
def naive_sweep(lm, ids: list[int], answer: int, means: torch.Tensor) -> torch.Tensor:
    """The textbook method: patch one head at the last token, run the whole prompt again, for every head."""
    x = torch.tensor([ids], device=lm.device)

    def p_answer(edits):
        with trace(lm, edits=edits):
            return lm.model(input_ids=x, logits_to_keep=1).logits[0, -1].float().softmax(-1)[answer].item()

    base = p_answer([])
    out = torch.zeros(lm.n_layers, lm.n_heads)
    for layer in range(lm.n_layers):
        for head in range(lm.n_heads):
            out[layer, head] = p_answer([Edit("attn_head", layer, means[layer, head].to(lm.device, lm.dtype),
                                              position=-1, head=head)]) - base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--icl-task", default="antonym")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(ModelConf(name=args.model))
    fc = FunctionVectorsConf(n_clean=5, n_shuffled=args.prompts)
    sp = split(load_pairs(args.icl_task), fc.seed)
    clean, _ = icl_prompts(sp, fc, args.icl_task, fc.n_clean, False, "clean")
    means = mean_head_outputs(lm, clean)
    prompts, queries = icl_prompts(sp, fc, args.icl_task, fc.n_shuffled, True, "shuffled")
    rows = lm.n_layers * lm.n_heads
    print(f"{lm.name}: {lm.n_layers} layers x {lm.n_heads} heads = {rows} patches per prompt; "
          f"torch threads {torch.get_num_threads()}")
    t_fast = t_naive = 0.0
    worst = 0.0
    for text, (_, y) in zip(prompts, queries):
        ids = lm.tokenizer(text)["input_ids"]
        answer = answer_token(lm.tokenizer, text, template(fc).continuation(y))
        t = time.perf_counter()
        fast = indirect_effects(lm, ids, answer, means)
        tf = time.perf_counter() - t
        t = time.perf_counter()
        naive = naive_sweep(lm, ids, answer, means)
        tn = time.perf_counter() - t
        diff = (fast - naive).abs().max().item()
        worst = max(worst, diff)
        t_fast += tf
        t_naive += tn
        print(f"prompt of {len(ids)} tokens: fast {tf:.2f} s, naive {tn:.1f} s, ratio {tn / tf:.1f}x, "
              f"max |diff| {diff:.2e} (largest effect {naive.abs().max().item():.3f})")
    print(f"total: fast {t_fast:.2f} s, naive {t_naive:.1f} s -> speed-up {t_naive / t_fast:.1f}x; "
          f"max abs diff {worst:.2e}")
    emit("fv_patching", "time per prompt", "packed single-token head patching", "one forward per head",
         t_naive / t_fast, max_abs_diff=worst)


if __name__ == "__main__":
    main()
