"""Flow `future-lens`: Pal et al. (CoNLL 2023), "Future Lens: Anticipating Subsequent Tokens from a Single
Hidden State".

  1. prefixes cut from data.* texts at word boundaries; on the model actors: greedy continuation (4 tokens),
     final-layer states at T..T+3, filter to prefixes whose next token the model predicts (cached by
     fingerprint next to the store); split by text (seeded) into train / test;
  2. hidden states of every layer at T from the zarr store (tasks.extraction, resumable);
  3. per source layer, in parallel: linear model approximation (closed-form ridge, actors: it decodes with the
     model), fixed-prompt and learned-prompt transplants (actors), direct vocabulary probe (Ray tasks, after
     the actors are released); n-gram baselines on the driver;
  4. Precision@k and surprisal per (method, layer, N) to MLflow (step = layer), the Figure-4 style plot,
     probes and soft prompts as artifacts. future_lens.reuse_run_id evaluates a previous run's artifacts.
`render_grid` draws the layer x token Future Lens grid for one prompt with a run's soft prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lensflow.flows.extract import log_extraction
from lensflow.tasks import extraction, tracking
from lensflow.tasks.actors import ModelPool, map_remote
from lensflow.tasks.config import Config, ConfigError, load_config, with_overrides
from lensflow.tasks.data import load_prompts
from lensflow.tasks.future_lens import (METHODS, LayerJob, PrepItem, Samples, candidate_windows, linear_hidden_job, linear_vocab_job,
                               prefixed, prepare_windows, read_block, read_targets, scan_texts, score, tokenize_texts,
                               write_targets)
from lensflow.tasks.models import prepare
from lensflow.tasks.ngram import NGram, ngram_logits
from lensflow.tasks.plots import save_grid, layer_curves, lens_grid
from lensflow.tasks.soft_prompt import fixed_prompt_job, soft_prompt_job


def _fingerprint(conf: Config, texts: list[str], info: dict) -> str:
    fc = conf.future_lens
    identity = {"model": conf.model.model_dump(mode="json"), "weights": info["weights_hash"],
                "max_tokens": conf.data.max_tokens, "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
                "fl": fc.model_dump(mode="json", include={"min_prefix_tokens", "n_train", "n_test", "test_fraction",
                                                          "n_future", "seed"})}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def prepare_samples(conf: Config, texts: list[str], pool: ModelPool, info: dict) -> tuple[str, dict]:
    """Filtered, split samples with the model's own continuation; reused when the same preparation exists."""
    fc = conf.future_lens
    url = f"{conf.store.root.rstrip('/')}/future_lens_targets-{_fingerprint(conf, texts, info)}"
    attrs = read_targets(url)
    if attrs:
        return url, attrs
    step = conf.store.chunk_size
    scans = pool.map(scan_texts, [(texts[i : i + step], conf.data.max_tokens, fc.min_prefix_tokens)
                                  for i in range(0, len(texts), step)], desc="future lens: scan texts")
    windows = candidate_windows([sc for part in scans for sc in part])
    rng = random.Random(fc.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    test_texts = set(order[: max(1, round(fc.test_fraction * len(texts)))])
    train = [w for w in windows if w.text_id not in test_texts]
    test = [w for w in windows if w.text_id in test_texts]
    rng.shuffle(train)
    rng.shuffle(test)
    # a few extra: re-tokenisation of the prefix text can differ from the text's tokens (those are dropped)
    chosen = train[: int(fc.n_train * 1.05) + 2] + test[: int(fc.n_test * 1.05) + 2]
    n_tr = min(len(train), int(fc.n_train * 1.05) + 2)
    items = [PrepItem(chosen[i : i + step], conf.data.max_tokens, fc.n_future) for i in range(0, len(chosen), step)]
    parts = pool.map(prepare_windows, items, desc="future lens: model continuations")
    arr = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = np.flatnonzero(arr["keep"])
    tr = [i for i in keep if i < n_tr][: fc.n_train]
    te = [i for i in keep if i >= n_tr][: fc.n_test]
    if len(tr) < 2 or len(te) < 1:
        raise ConfigError(f"future_lens: only {len(tr)} train / {len(te)} test samples survive the filter "
                          f"(model predicts the next token); raise data.max_prompts or data.max_tokens")
    rows = np.array(tr + te)
    out = {"greedy": arr["greedy"][rows], "final": arr["final"][rows].astype(conf.store.dtype), "x_last": arr["x_last"][rows],
           "text_id": np.array([chosen[i].text_id for i in rows]), "prefix": arr["prefix"][rows]}
    n_pos = sum(max(0, min(len(sc["ids"]) - 1, conf.data.max_tokens) - fc.min_prefix_tokens + 1) for p in scans for sc in p)
    attrs = {"n_train": len(tr), "n_test": len(te), "candidates": n_pos, "model_correct": len(windows),
             "keep_rate": len(windows) / max(1, n_pos), "train_texts": sorted(set(range(len(texts))) - test_texts)}
    write_targets(url, out, attrs, conf.store.chunk_size)
    return url, read_targets(url)


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def extract_states(conf: Config, prefixes: list[str], pool: ModelPool) -> tuple[str, dict]:
    """Every resid layer at the last prefix token (a retry resumes from the store's finished chunks)."""
    cx = with_overrides(conf, {"store.positions": "last", "store.layers": None, "store.sites": ["resid"]})
    return extraction.extract(cx, prefixes, pool, label="future_lens")


def ngram_baseline(conf: Config, samples: Samples, texts: list[str], train_texts: list[int], pool: ModelPool) -> list[dict]:
    """Counts from the training texts only; metrics per N on the test split (no hidden state involved)."""
    fc = conf.future_lens
    seqs = pool.map(tokenize_texts, [[texts[i] for i in train_texts]], desc="tokenize training texts")[0]
    model = NGram(fc.ngram_order, samples.vocab_size).fit(seqs)
    test = read_block(samples, None, samples.test)
    greedy, x_last = test["greedy"].numpy(), test["x_last"].numpy()
    return [score(ngram_logits(model, x_last, greedy, n), test["greedy"][:, n], tuple(fc.ks)) for n in range(greedy.shape[1])]


def causal_layers(conf: Config, n_layers: int) -> list[int]:
    fc = conf.future_lens
    if fc.causal_layers is not None:
        return _check_layers(fc.causal_layers, n_layers, "future_lens.causal_layers")
    return sorted({*range(n_layers, -1, -fc.causal_layer_stride)})


def _check_layers(layers: list[int], n_layers: int, key: str) -> list[int]:
    bad = [l for l in layers if not 0 <= l <= n_layers]
    if bad:
        raise ConfigError(f"config key '{key}': {bad} out of range 0..{n_layers}")
    return sorted(set(layers))


@task(cache_policy=NO_CACHE)
def model_jobs(fn, jobs: list[LayerJob], pool: ModelPool, desc: str) -> list[dict]:
    return pool.map(fn, jobs, desc=desc, in_flight=1)


def _series(results: list[dict], n: int, key: str = "p_at_1") -> dict[int, float]:
    return {r["layer"]: r["metrics"][n][key] for r in results}


def log_results(run: tracking.RunRef, results: dict[str, list[dict]], n_future: int, title: str) -> dict:
    """Metrics with step = source layer, the Precision@1 figure, and a best-layer summary table."""
    per_layer: dict[int, dict[str, float]] = {}
    for method, rs in results.items():
        for r in rs:
            for n, m in enumerate(r["metrics"]):
                per_layer.setdefault(r["layer"], {}).update(prefixed(method, m, n))
    for layer, metrics in sorted(per_layer.items()):
        tracking.log_metrics(run, metrics, step=layer)
    panels = {f"N={n}": {m: _series(rs, n) for m, rs in results.items() if m in METHODS} for n in range(n_future)}
    tracking.log_figure(run, layer_curves(panels, "Precision@1", title), "plots/future_lens_p_at_1.png")
    best: dict[str, dict] = {}
    for method, rs in results.items():
        best[method] = {}
        for n in range(n_future):
            s = _series(rs, n)
            layer = max(s, key=s.get)
            best[method][f"n{n}"] = {"layer": layer, **rs[[r["layer"] for r in rs].index(layer)]["metrics"][n]}
    lines = ["| method | " + " | ".join(f"N={n} P@1 (layer)" for n in range(n_future)) + " |",
             "|---" * (n_future + 1) + "|"]
    for method, b in best.items():
        lines.append(f"| {method} | " + " | ".join(f"{b[f'n{n}']['p_at_1']:.3f} ({b[f'n{n}']['layer']})"
                                                   for n in range(n_future)) + " |")
    table = "\n".join(lines)
    tracking.log_text(run, table + "\n", "future_lens_summary.md")
    tracking.log_text(run, json.dumps({m: rs for m, rs in results.items()}, indent=1, default=float), "future_lens_results.json")
    return {"best": best, "table": table}


@flow(name="future-lens", log_prints=True)
def future_lens_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    conf = load_config(config, overrides)
    fc = conf.future_lens
    texts = load_prompts(conf.data)
    prepare(conf.model)
    reuse = fc.reuse_run_id
    timings: dict[str, float] = {}
    with tracking.flow_run(conf, "future-lens") as run:
        if reuse:
            tracking.set_tags(run, {"future_lens.reused_from": reuse})
        with ModelPool(conf) as pool:
            t0 = time.perf_counter()
            info = pool.map(extraction.describe, [None], desc="describe model")[0]
            tracking.tag_model(run, info)
            n_layers = info["n_layers"]
            lin_layers = (_check_layers(fc.linear_layers, n_layers, "future_lens.linear_layers")
                          if fc.linear_layers is not None else list(range(n_layers + 1)))
            cau_layers = causal_layers(conf, n_layers)
            targets_url, attrs = prepare_samples(conf, texts, pool, info)
            prefixes = [str(p) for p in zarr.open_group(targets_url, mode="r")["prefix"][:]]
            timings["prepare_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            acts_url, stats = extract_states(conf, prefixes, pool)
            log_extraction(run, acts_url, stats, "future_lens")
            timings["extract_s"] = time.perf_counter() - t0
            samples = Samples(acts_url, targets_url, attrs["n_train"], attrs["n_test"], info["vocab_size"],
                              conf.store.chunk_size)
            tracking.log_metrics(run, {"future_lens.n_train": samples.n_train, "future_lens.n_test": samples.n_test,
                                       "future_lens.keep_rate": attrs["keep_rate"]})
            tracking.set_tags(run, {"future_lens.targets": targets_url,
                                    "future_lens.soft_prompt_layers": json.dumps(cau_layers)})
            t0 = time.perf_counter()
            ngram = ngram_baseline(conf, samples, texts, attrs["train_texts"], pool)
            timings["ngram_s"] = time.perf_counter() - t0

            def jobs(layers: list[int]) -> list[LayerJob]:
                return [LayerJob(l, samples, fc, run, reuse) for l in layers]

            t0 = time.perf_counter()
            soft = model_jobs(soft_prompt_job, jobs(cau_layers), pool, "future lens: soft prompts")
            timings["soft_prompt_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fixed = model_jobs(fixed_prompt_job, jobs(cau_layers), pool, "future lens: fixed prompts")
            timings["fixed_prompt_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            hidden = model_jobs(linear_hidden_job, jobs(lin_layers), pool, "future lens: linear model approximation")
            timings["linear_hidden_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # the actors' CPUs are free again: the model-free probes run as plain Ray tasks
        vocab = map_remote(linear_vocab_job, jobs(lin_layers), "future lens: vocabulary probes", conf.ray)
        timings["linear_vocab_s"] = time.perf_counter() - t0

        # fixed prompts: each prompt under its own name, and `fixed_prompt` = the best prompt (mean P@1), as the paper reports
        per_prompt = [[{"layer": r["layer"], "metrics": r["per_prompt"][i]} for r in fixed] for i in range(len(fc.fixed_prompts))]
        means = [np.mean([m["p_at_1"] for r in rs for m in r["metrics"]]) for rs in per_prompt]
        best_prompt = int(np.argmax(means))
        results: dict[str, list[dict]] = {
            "bigram": [{"layer": l, "metrics": ngram} for l in lin_layers],
            "linear_vocab": vocab, "linear_hidden": hidden, "fixed_prompt": per_prompt[best_prompt], "soft_prompt": soft,
            **{f"fixed_prompt_p{i}": rs for i, rs in enumerate(per_prompt)},
        }
        tracking.set_tags(run, {"future_lens.best_fixed_prompt": fc.fixed_prompts[best_prompt]})
        summary = log_results(run, results, fc.n_future, f"Future Lens, {conf.model.name}: Precision@1 vs source layer")
        sps = [r["samples_per_s"] for r in soft if r.get("samples_per_s")]
        timings["total_s"] = time.perf_counter() - t_start
        tracking.log_metrics(run, {f"future_lens.time.{k}": v for k, v in timings.items()}
                             | ({"future_lens.soft_prompt.samples_per_s": float(np.mean(sps))} if sps else {}))
    print(summary["table"])
    print(f"MLflow run: {run.run_id}; timings: " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()))
    return {"run_id": run.run_id, "store": acts_url, "targets": targets_url, "n_train": samples.n_train,
            "n_test": samples.n_test, "keep_rate": attrs["keep_rate"], "best": summary["best"], "table": summary["table"],
            "timings": timings, "trained": any(r["trained"] for r in [*soft, *hidden, *vocab]),
            "best_fixed_prompt": fc.fixed_prompts[best_prompt]}


# --------------------------------------------------------------------------------------------- grid


def _soft_prompt_layers(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    files = MlflowClient(tracking.local_uri(uri)).list_artifacts(run_id, "soft_prompts")
    return sorted(int(m.group(1)) for f in files if (m := re.search(r"layer_(\d+)\.safetensors$", f.path)))


@torch.no_grad()
def render_grid(conf: Config, prompt: str, run_id: str | None = None, out_dir: str | Path = ".lensflow/grids"
                ) -> dict[str, str]:
    """Layer x token grid for `prompt`: each cell shows the logit-lens token and, after '→', the tokens the
    learned prompt of that layer decodes from the state (greedy, n_future of them); colour = the lens's
    probability of its first token. Soft prompts come from run_id, else future_lens.reuse_run_id, else
    the latest finished future-lens run of the experiment. PNG + HTML are written locally and logged to
    that run under grids/."""
    from lensflow.tasks.hooks import Read, trace
    from lensflow.tasks.models import load_model
    from lensflow.tasks.soft_prompt import lens_generate

    uri = conf.tracking.uri
    run_id = run_id or conf.future_lens.reuse_run_id or tracking.latest_run(uri, conf.tracking.experiment, "future-lens")
    if not run_id:
        raise ConfigError(f"no finished future-lens run in experiment '{conf.tracking.experiment}'; "
                          "run `lensflow run future-lens` first or pass --run-id")
    layers = _soft_prompt_layers(uri, run_id)
    if not layers:
        raise ConfigError(f"run {run_id} has no soft prompts (artifacts soft_prompts/layer_XX.safetensors)")
    prepare(conf.model)
    lm = load_model(conf.model)
    enc = lm.encode([prompt])
    ids = enc["input_ids"][0]
    with trace(lm, reads=[Read("resid", l) for l in layers]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    tok = lm.tokenizer
    tokens = [tok.decode([i]) for i in ids.tolist()]
    cells, probs = [], np.zeros((len(layers), len(tokens)))
    for i, l in enumerate(layers):
        soft = tracking.load_tensors(uri, run_id, f"soft_prompts/layer_{l:02d}.safetensors")["prompt"]
        h = t["resid", l][0]
        lens_tok = lm.decode(h).argmax(-1).tolist()
        gen, p = lens_generate(lm, soft, l, h, conf.future_lens.n_future)
        row = []
        for j in range(len(tokens)):
            row.append(f"{tok.decode([lens_tok[j]])!r}→{tok.decode(gen[j].tolist())!r}")
            probs[i, j] = float(p[j, 0])
        cells.append(row)
    title = f"Future Lens: {prompt!r} ({conf.model.name}, soft prompts of run {run_id[:8]})"
    fig, page = lens_grid(tokens, layers, cells, probs, title)
    paths = save_grid(fig, page, "future_lens", prompt, Path(out_dir).resolve())
    png, html = paths["png"], paths["html"]
    ref = tracking.RunRef(tracking.local_uri(uri), "", run_id)
    for path in paths.values():
        tracking.log_file(ref, path, "grids")
    print(f"grid: {png} and {html} (logged to run {run_id} under grids/)")
    return {"png": str(png), "html": str(html), "run_id": run_id}
