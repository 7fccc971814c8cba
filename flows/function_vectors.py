"""Flow `function-vectors`: Todd et al. (ICLR 2024), "Function Vectors in Large Language Models".

  1. per task, on the model actors: mean output of every attention head at the last token of clean n-shot
     prompts, then the indirect effect of patching each head (one at a time) with its mean into shuffled-label
     prompts (exact fast sweep: one prefix pass + one packed pass of n_layers * n_heads single-token rows);
     finished tasks are cached under function_vectors.cache_dir, so a rerun with the same settings skips them;
  2. average indirect effect over tasks (AIE) -> the top-k heads; a task's function vector is the sum of those
     heads' mean outputs through the attention output projection;
  3. per task: accuracy with / without the vector added at one residual layer (zero-shot, shuffled-label
     n-shot, natural-text templates) and a layer sweep; transfer of the English antonym vector to French
     and Spanish zero-shot prompts.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lensflow.tasks import tracking
from lensflow.tasks.actors import ModelPool
from lensflow.tasks.config import Config, ConfigError, FunctionVectorsConf, load_config
from lensflow.tasks.extraction import describe
from lensflow.tasks.function_vectors import EvalJob, TaskJob, TransferJob, cached_sweep, default_top_k, sweep_cache_file, \
    task_eval, top_heads, transfer_eval
from lensflow.tasks.icl import available_tasks, load_pairs, split
from lensflow.tasks.models import prepare
from lensflow.tasks.plots import heatmap, layer_curves

KINDS = ("zero_shot", "zero_shot_fv", "shuffled", "shuffled_fv", "natural_text", "natural_text_fv")


def load_jobs(fc: FunctionVectorsConf) -> dict[str, TaskJob]:
    """Every selected task (and the transfer targets), split by seed; unknown names fail before any work."""
    names = fc.tasks if fc.tasks is not None else list(available_tasks(fc.task_paths))
    extra = [t for t in fc.transfer_targets if fc.transfer_source in names and t not in names]
    return {n: TaskJob(n, split(load_pairs(n, fc.task_paths), fc.seed), fc) for n in [*names, *extra]}


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def sweep_tasks(conf: Config, jobs: list[TaskJob], pool: ModelPool) -> tuple[dict[str, dict], int]:
    """Means and indirect effects per task, tasks in parallel across the actors; a retry resumes from the cache."""
    files = [sweep_cache_file(conf.function_vectors.cache_dir, conf.model.model_dump(mode="json"), j) for j in jobs]
    cached = sum(f is not None and os.path.isfile(f) for f in files)
    results = pool.map(cached_sweep, list(zip(jobs, files)), desc="FV sweep (tasks)")
    return {j.name: r for j, r in zip(jobs, results)}, cached


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def evaluate(jobs: list[EvalJob], transfers: list[TransferJob], pool: ModelPool) -> tuple[list[dict], list[dict]]:
    evals = pool.map(task_eval, jobs, desc="FV evaluation (tasks)")
    return evals, pool.map(transfer_eval, transfers, desc="FV transfer") if transfers else []


def _nanmean(values: list[float]) -> float:
    v = np.array([x for x in values if np.isfinite(x)], dtype=float)
    return float(v.mean()) if len(v) else float("nan")


def _table(evals: dict[str, dict], transfer: dict[str, dict]) -> str:
    rows = ["| task | icl | n | zero-shot | +FV | shuffled | +FV | natural | +FV |", "|---|---|---|---|---|---|---|---|---|"]
    total = sum(r["metrics"].get("n_eval", 0) for r in evals.values())
    for name, r in [*evals.items(), ("**mean**", {"metrics": {**_means(evals), "n_eval": total}})]:
        m = r["metrics"]
        cells = " | ".join(f"{m.get(f'{k}.acc', float('nan')):.2f}" for k in KINDS)
        rows.append(f"| {name} | {m.get('icl.acc', float('nan')):.2f} | {m.get('n_eval', 0):.0f} | {cells} |")
    if transfer:
        rows += ["", "| transfer target | zero-shot | +FV | n |", "|---|---|---|---|"]
        rows += [f"| {t} | {r['acc']:.2f} | {r['fv.acc']:.2f} | {r['n']:.0f} |" for t, r in transfer.items()]
    return "\n".join(rows) + "\n"


def _means(evals: dict[str, dict]) -> dict[str, float]:
    keys = ["icl.acc", *(f"{k}.acc" for k in KINDS)]
    return {k: _nanmean([r["metrics"].get(k, float("nan")) for r in evals.values()]) for k in keys}


@flow(name="function-vectors", log_prints=True)
def function_vectors_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    conf = load_config(config, overrides)
    fc = conf.function_vectors
    jobs = load_jobs(fc)  # unknown tasks and bad task files fail here, before any run or actor exists
    selected = fc.tasks if fc.tasks is not None else [n for n in jobs if n in available_tasks(fc.task_paths)]
    prepare(conf.model)
    with tracking.flow_run(conf, "function-vectors") as run:
        with ModelPool(conf) as pool:
            info = pool.map(describe, [None], desc="describe model")[0]
            tracking.tag_model(run, info)
            n_layers, n_heads = info["n_layers"], info["n_heads"]
            layer = fc.layer if fc.layer is not None else n_layers // 3
            if layer > n_layers:
                raise ConfigError(f"config key 'function_vectors.layer': {layer} out of range 0..{n_layers}")
            k = fc.top_k or default_top_k(n_layers, n_heads)
            if k > n_layers * n_heads:
                raise ConfigError(f"config key 'function_vectors.top_k': {k} > {n_layers * n_heads} heads")

            sweeps, n_cached = sweep_tasks(conf, [jobs[n] for n in selected], pool)
            ie = np.stack([sweeps[n]["ie"] for n in selected])  # [tasks, layers, heads]
            aie = ie.mean(0)
            heads = top_heads(aie, k)
            _log_heads(run, info["name"], selected, ie, aie, heads, layer)

            def head_means(name: str) -> np.ndarray:
                return np.stack([sweeps[name]["means"][l, h] for l, h in heads])

            sweep_layers = list(range(0, n_layers, fc.layer_sweep_stride)) if fc.layer_sweep_stride else []
            eval_jobs = [EvalJob(jobs[n], heads, head_means(n), layer, sweep_layers) for n in selected]
            source = fc.transfer_source
            transfer_jobs = [TransferJob(jobs[t], heads, head_means(source), layer) for t in fc.transfer_targets] \
                if source in sweeps else []
            if source and source not in sweeps:
                print(f"transfer skipped: source task '{source}' is not among the selected tasks")
            results, transfers = evaluate(eval_jobs, transfer_jobs, pool)

        evals = dict(zip(selected, results))
        transfer = {j.target.name: r for j, r in zip(transfer_jobs, transfers)}
        means, curve = _log_results(run, info["name"], evals, transfer, sweep_layers)
        wall = time.perf_counter() - t0
        tracking.log_metrics(run, {"fv.layer": layer, "fv.top_k": k, "fv.tasks": len(selected),
                                   "fv.sweeps_cached": n_cached, "fv.wall_s": wall})
    print(_table(evals, transfer))
    print(f"top-{k} heads (layer, head): {heads}; FV added at resid layer {layer}; "
          f"{n_cached}/{len(selected)} task sweeps reused from cache")
    print(f"MLflow run: {run.run_id} at {run.tracking_uri} (experiment '{conf.tracking.experiment}'); {wall:.0f} s")
    return {"run_id": run.run_id, "tasks": len(selected), "layer": layer, "top_k": k, "heads": heads,
            "heads_per_layer": np.bincount([l for l, _ in heads], minlength=n_layers).tolist(), "mean": means,
            "transfer": transfer, "layer_sweep": curve, "sweeps_cached": n_cached, "wall_s": wall}


def _log_heads(run: tracking.RunRef, model: str, tasks: list[str], ie: np.ndarray, aie: np.ndarray,
               heads: list[tuple[int, int]], layer: int) -> None:
    tracking.log_array(run, aie, "aie.npy")
    tracking.log_figure(run, heatmap(aie, f"{model}: average indirect effect ({len(tasks)} tasks)"), "plots/fv_aie.png")
    tracking.log_array(run, ie, "fv/indirect_effects.npy")
    tracking.log_text(run, json.dumps({"axes": ["task", "layer", "head"], "tasks": tasks}, indent=1),
                      "fv/indirect_effects.json")
    tracking.log_text(run, json.dumps({"layer": layer, "k": len(heads), "heads": [
        {"layer": l, "head": h, "aie": float(aie[l, h])} for l, h in heads]}, indent=1), "fv/heads.json")


def _log_results(run: tracking.RunRef, model: str, evals: dict[str, dict], transfer: dict[str, dict],
                 sweep_layers: list[int]) -> tuple[dict[str, float], dict[int, float]]:
    metrics = {f"fv.{n}.{m}": v for n, r in evals.items() for m, v in r["metrics"].items()}
    means = _means(evals)
    metrics |= {f"fv.mean.{m}": v for m, v in means.items()}
    for t, r in transfer.items():
        metrics |= {f"fv.transfer.{t}.zero_shot.acc": r["acc"], f"fv.transfer.{t}.zero_shot_fv.acc": r["fv.acc"]}
    tracking.log_metrics(run, metrics)
    curve = {l: _nanmean([r["layer_sweep"].get(l, float("nan")) for r in evals.values()]) for l in sweep_layers}
    if curve:
        tracking.log_series(run, "fv.layer_sweep.zero_shot_fv.acc", curve)
        flat = {l: means["zero_shot.acc"] for l in curve}
        fig = layer_curves({"zero-shot": {"FV added at layer": curve, "no FV": flat}}, "accuracy (mean over tasks)",
                           f"{model}: where to add the function vector")
        tracking.log_figure(run, fig, "plots/fv_layer_sweep.png")
    tracking.log_tensors(run, {n: torch.tensor(r["fv"]) for n, r in evals.items()}, "fv/function_vectors.safetensors")
    tracking.log_text(run, _table(evals, transfer), "fv/results.md")
    return means, curve
