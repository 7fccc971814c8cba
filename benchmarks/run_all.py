"""`make bench`: every CPU benchmark, each side by side with its baseline, gathered into one table
(benchmarks/RESULTS.md) that the README quotes. A benchmark that fails is listed as failed; the others still run.

    python benchmarks/run_all.py [--only extract,tuned_lens] [--skip cluster]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results import PREFIX, machine

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["extract", "tuned_lens", "future_lens", "fv_patching", "causal_trace", "lre_jacobian", "edit_values",
              "dictionaries", "cluster"]


def run(name: str) -> tuple[list[dict], str, float]:
    script = HERE / f"bench_{name}.py"
    if not script.is_file():
        return [], "absent", 0.0
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    rows = [json.loads(line[len(PREFIX):]) for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return rows, status, time.perf_counter() - t0


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | measure | method | baseline | ratio | kernel |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['benchmark']} | {r['measure']} | {r['method']} | {r['baseline']} | **{r['ratio']:g}x** | {r['kernel']} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated names (bench_<name>.py)")
    ap.add_argument("--skip", default="", help="comma-separated names")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n and n not in args.skip.split(",")]
    rows, notes = [], []
    for name in names:
        got, status, wall = run(name)
        print(f"{name}: {status}, {len(got)} rows, {wall:.0f} s", flush=True)
        rows += got
        notes.append(f"- `bench_{name}.py`: {status}, {wall:.0f} s")
    text = (f"# Benchmarks\n\n`make bench` on {machine()}, {time.strftime('%Y-%m-%d')}. Ratio > 1: the method beats "
            f"its baseline by that factor (time, or peak memory), both run side by side in the same process or "
            f"machine.\n\n{table(rows)}\n\n" + "\n".join(notes) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
