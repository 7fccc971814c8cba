"""Every flow on a GPU machine, with the settings a one-GPU box would use, timed, with the GPU's own account of
what ran on it (nvidia-smi, sampled every 0.5 s): peak memory and the processes that held a CUDA context.

Each flow runs as `lensflow run FLOW --set ...` in a fresh process, so model loading, Ray and Prefect start-up
are part of its time, as for a user. Results go to OUT/gpu_smoke.json after every flow (a cut-off run keeps
what it finished) and a markdown table to OUT/gpu_smoke.md.

    python benchmarks/gpu_smoke.py --out /tmp/gpu-smoke [--flows extract,logit-lens] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# (label, flow, extra overrides): every flow at its defaults, then the reduced-precision training paths
RUNS = [
    ("extract", "extract", []),
    ("logit-lens", "logit-lens", []),
    ("future-lens", "future-lens", []),
    ("function-vectors", "function-vectors", []),
    ("multilingual", "multilingual", []),
    ("causal-trace", "causal-trace", []),
    ("future-lens fp16", "future-lens", ["model.dtype=float16"]),
    ("logit-lens bf16", "logit-lens", ["model.dtype=bfloat16"]),
]


class GpuSampler(threading.Thread):
    """Peak used memory (MiB) and the PIDs nvidia-smi saw with a CUDA context while a flow ran."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib, self.pids, self.stop = 0, set(), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5) and shutil.which("nvidia-smi"):
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True).stdout.split()
            apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.split()
            self.peak_mib = max(self.peak_mib, *(int(u) for u in used or ["0"]))
            self.pids.update(apps)


def headline(tracking_uri: str, flow: str, since_ms: int) -> dict:
    """The newest run of this flow started after `since_ms`: its status and headline metric."""
    from mlflow.tracking import MlflowClient

    from lensflow.tasks.core.metric_names import metric_key
    from lensflow.tasks.registry import experiment

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("lensflow")
    # by name: a flow's own run is "<flow>-<time>"; its per-layer child runs start later and outnumber it
    runs = client.search_runs([exp.experiment_id], f"attributes.start_time >= {since_ms} and "
                              f"attributes.run_name LIKE '{flow}-%'", order_by=["attributes.start_time DESC"],
                              max_results=1) if exp else []
    if not runs:
        return {"mlflow_status": None}
    run = runs[0]
    name = experiment(flow).headline.metric
    history = client.get_metric_history(run.info.run_id, metric_key(name))
    return {"mlflow_status": run.info.status, "run_id": run.info.run_id, "headline": metric_key(name),
            "headline_by_step": {m.step: round(m.value, 4) for m in history}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--flows", default=None, help="comma-separated labels of RUNS (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--timeout", type=float, default=1200)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.out / 'mlflow.db'}"
    common = [f"tracking.uri={uri}", f"store.root={args.out / 'store'}", *args.overrides]
    wanted = args.flows.split(",") if args.flows else [label for label, _, _ in RUNS]
    results_file = args.out / "gpu_smoke.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for label, flow, extra in RUNS:
        if label not in wanted or results.get(label, {}).get("rc") == 0:
            continue
        cmd = [sys.executable, "-m", "lensflow.flows.cli", "run", flow]
        for kv in [*common, *extra]:
            cmd += ["--set", kv]
        sampler, t0, since_ms = GpuSampler(), time.perf_counter(), int(time.time() * 1000)
        sampler.start()
        with open(args.out / f"{flow}{'-' + extra[0] if extra else ''}.log".replace("=", "-"), "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        sampler.stop.set()
        sampler.join()
        results[label] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "gpu_peak_mib": sampler.peak_mib,
                          "cuda_processes": len(sampler.pids), "overrides": extra, **headline(uri, flow, since_ms)}
        print(label, json.dumps(results[label]), flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    rows = ["| run | exit | wall s | GPU peak MiB | CUDA processes | MLflow |", "|---|---|---|---|---|---|"]
    rows += [f"| {k} | {v['rc']} | {v['wall_s']} | {v['gpu_peak_mib']} | {v['cuda_processes']} | {v['mlflow_status']} |"
             for k, v in results.items()]
    (args.out / "gpu_smoke.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
