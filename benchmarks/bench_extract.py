"""Extraction throughput and peak memory against a bare transformers forward pass, side by side.

Baseline: `model(..., output_hidden_states=True)` on the same batches, keeping each layer's last-token state
(what one would write by hand). Pipeline: the actor's unit of work (`extraction.compute_chunk`), and the same
plus the zarr write. Timings interleave the methods over several rounds; peak memory is measured in fresh
subprocesses (VmHWM reset after the model is loaded), so one method's allocations never mask the other's.

    python benchmarks/bench_extract.py [--model smollm2-135m] [--batches 6] [--batch 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import emit

from lensflow.tasks.core import (
    extraction,  # noqa: E402
    store,  # noqa: E402
)
from lensflow.tasks.core.models import load_model  # noqa: E402
from lensflow.tasks.core.prompts import builtin_texts  # noqa: E402
from lensflow.tasks.registry import load_config  # noqa: E402


def setup(args):
    conf = load_config("conf/default.yaml", [f"model.name={args.model}", f"data.max_tokens={args.tokens}",
                                             f"store.chunk_size={args.batch}", f"data.max_prompts={args.batch * args.batches}"])
    lm = load_model(conf.model)
    texts = builtin_texts(args.batch * args.batches)
    info = extraction.describe(lm)
    url = f"{tempfile.mkdtemp()}/bench"
    _, spec = extraction.plan(conf, texts, info, "bench")
    store.create(url, spec, texts)
    jobs = [extraction.ChunkJob(url, c, texts[spec.rows(c)], spec) for c in range(spec.n_chunks)]
    return lm, jobs


@torch.inference_mode()
def bare(lm, job):
    enc = lm.encode(job.texts, max_tokens=job.spec.max_tokens)
    out = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    rows = torch.arange(len(job.texts))
    return torch.stack([h[rows, enc["last"]] for h in out.hidden_states], 1).numpy()


METHODS = {
    "bare_forward": bare,
    "pipeline_compute": extraction.compute_chunk,
    "pipeline_compute_write": extraction.extract_chunk,
}


def peak_memory(args, method: str) -> float:
    """Extra peak RSS (MiB) of running every batch with one method, in a fresh process."""
    code = f"""
import sys; sys.argv = {sys.argv[:1] + [a for a in sys.argv[1:] if a != '--child']!r}
sys.path.insert(0, {str(Path(__file__).parent)!r})
import bench_extract as b
args = b.parse()
lm, jobs = b.setup(args)
b.METHODS[{method!r}](lm, jobs[0])
open('/proc/self/clear_refs', 'w').write('5')
def rss(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) / 1024
base = rss('VmRSS:')
for j in jobs:
    b.METHODS[{method!r}](lm, j)
print(rss('VmHWM:') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main():
    args = parse()
    torch.set_num_threads(args.threads)
    lm, jobs = setup(args)
    tokens = sum(len(lm.tokenizer(j.texts, truncation=True, max_length=args.tokens)["input_ids"][i])
                 for j in jobs for i in range(len(j.texts)))
    for fn in METHODS.values():  # warm-up
        fn(lm, jobs[0])
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m, fn in METHODS.items():
            t0 = time.perf_counter()
            for j in jobs:
                fn(lm, j)
            times[m].append(time.perf_counter() - t0)
    tps = {m: tokens / statistics.median(ts) for m, ts in times.items()}
    mem = {m: peak_memory(args, m) for m in METHODS}
    base = "bare_forward"
    report = {
        "model": args.model, "batches": args.batches, "batch": args.batch, "max_tokens": args.tokens, "tokens": tokens,
        "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
        "speedup_vs_bare": {m: round(v / tps[base], 3) for m, v in tps.items()},
        "peak_extra_mib": {m: round(v, 1) for m, v in mem.items()},
        "memory_ratio_vs_bare": {m: round(v / mem[base], 3) for m, v in mem.items()},
    }
    print(json.dumps(report, indent=2))
    emit("extract", "tokens/s", "actor chunk + zarr write", "bare transformers forward",
         tps["pipeline_compute_write"] / tps[base])
    emit("extract", "peak extra memory", "actor chunk + zarr write", "bare transformers forward",
         mem[base] / mem["pipeline_compute_write"])


if __name__ == "__main__":
    main()
