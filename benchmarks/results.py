"""One line per comparison that every benchmark prints, so `make bench` (benchmarks/run_all.py) can gather them into
one table: what was measured, against which baseline, the ratio, and the kernel (dtype, threads) that ran it."""

from __future__ import annotations

import json
import platform

import torch

PREFIX = "BENCH "


def emit(benchmark: str, measure: str, method: str, baseline: str, ratio: float, kernel: str = "float32",
         **detail: object) -> None:
    """ratio > 1: the method is better than the baseline by that factor (faster, or less memory)."""
    row = {"benchmark": benchmark, "measure": measure, "method": method, "baseline": baseline,
           "ratio": round(float(ratio), 3), "kernel": f"{kernel}, {torch.get_num_threads()} thread(s)", **detail}
    print(PREFIX + json.dumps(row, default=str), flush=True)


def machine() -> str:
    """CPU model, whether bfloat16 is native, cores, torch: what a reader needs to compare two tables."""
    from lensflow.tasks.core.kernels import cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    bf16 = sorted(f for f in cpu_flags() if "bf16" in f) or ["none"]
    import os

    return f"{model}; native bf16: {' '.join(bf16)}; {os.cpu_count()} cores; torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []
