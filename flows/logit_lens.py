"""Flow `logit-lens`: the logit lens (nostalgebraist 2020) and the tuned lens (Belrose et al. 2023, "Eliciting
Latent Predictions from Transformers with the Tuned Lens").

  1. every residual layer at every position of the first lenses.max_prompts texts -> zarr store (resumable);
  2. the model's final distribution per token, summarised as lens targets (tasks/lenses.py), from the stored
     last layer, in parallel Ray tasks;
  3. per layer, in parallel Ray tasks streaming from the store: train the affine translator on KL(final || lens)
     (a child MLflow run each: loss curve + translator), evaluate both lenses on the held-out prompts;
     translators of a finished identical job are reused (resume), lenses.reuse_run_id evaluates a previous run's;
  4. KL to the final distribution and top-1 agreement per layer (step = layer), curves, the translators as one
     safetensors artifact, and the layer x token grid of lenses.grid_prompt for both lenses.
`render_grid` draws that grid for any prompt (`lensflow lens --lens logit|tuned "prompt"`).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import ray
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lensflow.flows.extract import log_extraction
from lensflow.tasks import extraction, tracking
from lensflow.tasks.actors import ModelPool, map_remote
from lensflow.tasks.config import Config, ConfigError, load_config, with_overrides
from lensflow.tasks.data import load_prompts
from lensflow.tasks.lenses import (LayerJob, Readout, Targets, TargetsJob, Translator, grid_cells, load_translators, prompt_states,
                          readout_of, run_layer, save_translators, targets_job)
from lensflow.tasks.models import prepare
from lensflow.tasks.plots import save_grid, layer_curves, lens_grid

FLOW = "logit-lens"
LENSES = {"logit": "logit_lens", "tuned": "tuned_lens"}


def lens_config(conf: Config) -> Config:
    """The store variant the lenses train on: every resid layer at every position of the first
    lenses.max_prompts texts (the final layer supplies the targets, every other layer gets a translator)."""
    n = conf.lenses.max_prompts or conf.data.max_prompts
    return with_overrides(conf, {"store.positions": "all", "store.layers": None, "store.sites": ["resid"],
                                 "data.max_prompts": n})


def split(n: int, heldout: float) -> tuple[range, range]:
    """The last `heldout` share of prompts (at least one) is held out; the rest trains (at least one)."""
    n_eval = min(n - 1, max(1, round(n * heldout)))
    if n_eval < 1:
        raise ConfigError(f"lenses: {n} prompt(s) cannot be split into train and held-out; raise lenses.max_prompts")
    return range(0, n - n_eval), range(n - n_eval, n)


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def extract_all_positions(conf: Config, texts: list[str], pool: ModelPool) -> tuple[str, dict]:
    """A retry resumes: chunks already marked done in the store are not recomputed."""
    return extraction.extract(conf, texts, pool, label="lenses")


@task(cache_policy=NO_CACHE)
def compute_targets(conf: Config, url: str, n: int, last_layer: int, readout_ref) -> Targets:
    step = conf.store.chunk_size
    jobs = [TargetsJob(url, last_layer, range(i, min(n, i + step)), readout_ref) for i in range(0, n, step)]
    return Targets.cat(map_remote(targets_job, jobs, "lens targets", conf.ray))


def _family_key(conf: Config, url: str, train: range, evals: range) -> str:
    """Identity of a translator training job minus its layer: same store, split and hyperparameters."""
    hp = {"epochs", "batch_tokens", "lr", "weight_decay", "compute_dtype", "seed"}
    ident = {"store": url, "train": [train.start, train.stop], "eval": [evals.start, evals.stop],
             "hp": conf.lenses.model_dump(mode="json", include=hp)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_translators(run: tracking.RunRef, key: str) -> dict[int, dict]:
    """Translators from finished child runs of identical jobs (an interrupted or repeated flow resumes here)."""
    runs = tracking.finished_runs(run.tracking_uri, run.experiment_id, {"lens_key": key})
    found: dict[int, str] = {}
    for r in runs:
        found.setdefault(int(r.data.tags["layer"]), r.info.run_id)
    return {l: tracking.load_tensors(run.tracking_uri, rid, "translator.safetensors") for l, rid in found.items()}


def log_results(run: tracking.RunRef, results: list[dict], title: str) -> dict:
    """Per-layer metrics (step = layer), curves, summary table; returns the summary figures."""
    layers = [r["layer"] for r in results]
    series: dict[str, dict[int, float]] = {}
    for r in results:
        metrics = {f"{LENSES[lens]}.{k}": v for lens in LENSES for k, v in r[lens].items()}
        tracking.log_metrics(run, metrics, step=r["layer"])
        for k, v in metrics.items():
            series.setdefault(k, {})[r["layer"]] = v
    for metric, label in (("kl_to_final", "KL(final || lens), nats"), ("top1_agree", "top-1 agreement with the model")):
        curves = {f"{lens} lens": series[f"{name}.{metric}"] for lens, name in LENSES.items()}
        fig = layer_curves({metric: curves}, label, title)
        tracking.log_figure(run, fig, f"plots/{metric}.png")
    inner = [l for l in layers if l != max(layers)]
    better = [l for l in inner if series["tuned_lens.kl_to_final"][l] < series["logit_lens.kl_to_final"][l]]
    summary = {f"{k}_mean": float(np.mean(list(v.values()))) for k, v in series.items()}
    summary["tuned_lens.better_layers"] = len(better)
    tracking.log_metrics(run, summary)
    lines = ["| layer | logit KL | tuned KL | logit top-1 | tuned top-1 |", "|---|---|---|---|---|"]
    lines += [f"| {l} | {series['logit_lens.kl_to_final'][l]:.3f} | {series['tuned_lens.kl_to_final'][l]:.3f} | "
              f"{series['logit_lens.top1_agree'][l]:.3f} | {series['tuned_lens.top1_agree'][l]:.3f} |" for l in layers]
    table = "\n".join(lines)
    tracking.log_text(run, table + "\n", "lenses_summary.md")
    return {**summary, "tuned_beats_logit_below_last": len(better) == len(inner), "table": table,
            "per_layer": {k: {int(l): v for l, v in s.items()} for k, s in series.items()}}


def log_grids(run: tracking.RunRef, readout: Readout, grid: dict, translators: dict, prompt: str, model: str) -> None:
    for lens, trs in (("logit", None), ("tuned", translators)):
        layers, cells, probs = grid_cells(readout, grid["states"], grid["tokenizer"], trs)
        fig, page = lens_grid(grid["tokens"], layers, cells, probs, f"{lens} lens: {prompt!r} ({model})")
        tracking.log_figure(run, fig, f"grids/{lens}_lens.png")
        tracking.log_text(run, page, f"grids/{lens}_lens.html")


@flow(name=FLOW, log_prints=True)
def logit_lens_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    conf = lens_config(load_config(config, overrides))
    lc = conf.lenses
    texts = load_prompts(conf.data)  # bad or empty inputs fail here, before a store or run exists
    train_rows, eval_rows = split(len(texts), lc.heldout)
    prepare(conf.model)
    timings: dict[str, float] = {}
    with tracking.flow_run(conf, FLOW) as run:
        with ModelPool(conf) as pool:
            t0 = time.perf_counter()
            url, stats = extract_all_positions(conf, texts, pool)
            log_extraction(run, url, stats, "lenses")
            n_layers = stats["model"]["n_layers"]
            readout = pool.map(readout_of, [None], desc="final norm + unembedding")[0]
            grid = pool.map(prompt_states, [lc.grid_prompt], desc="grid prompt")[0]
            timings["extract_s"] = time.perf_counter() - t0
        # the actors' CPUs are free again: everything below is model-free Ray tasks
        t0 = time.perf_counter()
        readout_ref = ray.put(readout)
        targets = compute_targets(conf, url, len(texts), n_layers, readout_ref)
        targets_ref = ray.put(targets)
        timings["targets_s"] = time.perf_counter() - t0

        key = _family_key(conf, url, train_rows, eval_rows)
        if lc.reuse_run_id:
            given = {l: t.tensors() for l, t in load_translators(conf.tracking.uri, lc.reuse_run_id).items()}
            tracking.set_tags(run, {"lenses.reused_from": lc.reuse_run_id})
        else:
            given = cached_translators(run, key)
        jobs = [LayerJob(url, l, n_layers, train_rows, eval_rows, readout_ref, targets_ref, lc.epochs, lc.batch_tokens,
                         lc.lr, lc.weight_decay, lc.compute_dtype, lc.seed, given.get(l), run, key)
                for l in range(n_layers + 1)]
        t0 = time.perf_counter()
        results = map_remote(run_layer, jobs, "tuned lens: train + evaluate per layer", conf.ray, num_cpus=1,
                            num_gpus=lc.gpus_per_task)
        timings["layers_s"] = time.perf_counter() - t0
        timings["layers_cpu_s"] = sum(r["cpu_s"] for r in results)
        for k in ("wall_s", "cpu_s"):  # cpu: the cost per layer on an idle core, whatever else shares the machine
            tracking.log_series(run, f"lenses.layer_{k}", {r["layer"]: r[k] for r in results})
        translators = {r["layer"]: r["translator"] for r in results}
        save_translators(run, translators)
        trained = sum(r["trained"] for r in results)
        split_text = f"train prompts {train_rows.start}-{train_rows.stop - 1}, held-out {eval_rows.start}-{eval_rows.stop - 1}"
        tracking.set_tags(run, {"lenses.key": key, "lenses.trained_layers": trained, "lenses.split": split_text})
        summary = log_results(run, results, f"{conf.model.name}, held-out tokens")
        log_grids(run, readout, grid, {l: Translator.from_tensors(t) for l, t in translators.items()}, lc.grid_prompt,
                  conf.model.name)
        timings["total_s"] = time.perf_counter() - t_start
        tracking.log_metrics(run, {f"lenses.time.{k}": v for k, v in timings.items()})
    print(summary["table"])
    print(f"mean KL: logit {summary['logit_lens.kl_to_final_mean']:.3f}, "
          f"tuned {summary['tuned_lens.kl_to_final_mean']:.3f}; "
          f"tuned better at {summary['tuned_lens.better_layers']}/{n_layers} layers below the last")
    print(f"MLflow run: {run.run_id}; timings: " + ", ".join(f"{k}={v:.0f}s" for k, v in timings.items()))
    return {"run_id": run.run_id, "store": url, "trained_layers": trained, "timings": timings,
            "train_prompts": len(train_rows), "eval_prompts": len(eval_rows), "eval_tokens": results[0]["eval_tokens"],
            **{k: v for k, v in summary.items() if k != "table"}}


def render_grid(conf: Config, prompt: str, lens: str = "logit", run_id: str | None = None) -> dict[str, str]:
    """Layer x token grid of `prompt` for the logit or tuned lens (top next token and its probability per cell).
    The tuned lens comes from run_id, else lenses.reuse_run_id, else the latest finished logit-lens run.
    PNG + HTML are written to .lensflow/grids and logged to that run (if any) under grids/."""
    from lensflow.tasks.models import load_model

    if lens not in LENSES:
        raise ConfigError(f"--lens {lens}: expected one of {', '.join(LENSES)}")
    uri = conf.tracking.uri
    run_id = run_id or conf.lenses.reuse_run_id or tracking.latest_run(uri, conf.tracking.experiment, FLOW)
    translators = None
    if lens == "tuned":
        if not run_id:
            raise ConfigError(f"no finished {FLOW} run in experiment '{conf.tracking.experiment}'; "
                              f"run `lensflow run {FLOW}` first or pass --run-id")
        translators = load_translators(uri, run_id)
    prepare(conf.model)
    lm = load_model(conf.model)
    grid = prompt_states(lm, prompt, conf.data.max_tokens)
    layers, cells, probs = grid_cells(Readout.from_lm(lm), grid["states"], lm.tokenizer, translators)
    source = f", translators of run {run_id[:8]}" if translators is not None else ""
    fig, page = lens_grid(grid["tokens"], layers, cells, probs, f"{lens} lens: {prompt!r} ({conf.model.name}{source})")
    paths = save_grid(fig, page, f"{lens}_lens", prompt)
    out = {k: str(v) for k, v in paths.items()}
    if run_id:
        ref = tracking.RunRef(tracking.local_uri(uri), "", run_id)
        for path in paths.values():
            tracking.log_file(ref, path, "grids")
        out["run_id"] = run_id
    return out
