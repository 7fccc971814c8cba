"""Flow `multilingual`: do translations of a paragraph light up the same features, and where in depth?

After Anthropic's "On the Biology of a Large Language Model" (2025): per-layer SAEs trained on general text, then the
Jaccard overlap of the feature sets active in a paragraph and in its translation, against unrelated paragraphs of
the same language pair. The same analysis on raw MLP neurons checks that the answer is not an artifact of the SAEs.

  1. model actors: extract general text (positions=all, the chosen layers) and each language's paragraphs to the
     store; MLP-neuron active sets per paragraph are computed on the actors (only booleans come back);
  2. pool closed, then one Ray task per layer: train (or reuse) its SAE from the store, log a child run with the loss
     curve and the SAE, and measure overlaps on the stored paragraphs;
  3. metrics with step = layer (SAE: resid layer; neurons: MLP block, which writes into resid layer block + 1).
Reruns resume: extraction skips finished chunks, and an SAE with the same data and settings is reused from its
finished child run instead of being retrained.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lensflow.flows.extract import extract_activations, log_extraction
from lensflow.tasks import tracking
from lensflow.tasks.actors import ModelPool, map_remote
from lensflow.tasks.config import Config, ConfigError, MultilingualConf, load_config, with_overrides
from lensflow.tasks.data import load_prompts
from lensflow.tasks.data.parallel import load_parallel
from lensflow.tasks.extraction import describe
from lensflow.tasks.models import prepare
from lensflow.tasks.overlap import NeuronJob, SAELayerJob, derangement, neuron_active_sets, neuron_quantiles, pair_overlaps, \
    parse_pairs, sae_layer
from lensflow.tasks.plots import layer_curves
from lensflow.tasks.sae import LayerJob, TrainSpec


def choose_layers(mc: MultilingualConf, n_layers: int) -> list[int]:
    """Configured resid layers, or every `layer_stride`-th layer from 0 plus the last."""
    if mc.layers is not None:
        bad = [l for l in mc.layers if not 0 <= l <= n_layers]
        if bad:
            raise ConfigError(f"config key 'multilingual.layers': {bad} out of range 0..{n_layers}")
        return sorted(set(mc.layers))
    return sorted({*range(0, n_layers + 1, mc.layer_stride), n_layers})


def _chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def neuron_overlaps(conf: Config, pool: ModelPool, blocks: list[int], calibration: list[str],
                    corpus: dict[str, list[str]], pairs: list[tuple[str, str]], perm: np.ndarray) -> dict[int, dict]:
    """Per block: {pair: {translated, unrelated}} over MLP-neuron sets, plus the mean set size per language."""
    mc = conf.multilingual
    size = mc.neurons.batch_prompts
    if mc.neurons.threshold is not None:
        thresholds = {b: np.float32(mc.neurons.threshold) for b in blocks}
    else:  # per-neuron quantile on general text, averaged over chunks (so every neuron fires about equally rarely)
        jobs = [NeuronJob(c, blocks, conf.data.max_tokens, mc.skip_first, quantile=mc.neurons.quantile)
                for c in _chunks(calibration, size)]
        parts = pool.map(neuron_quantiles, jobs, desc="calibrate neurons")
        thresholds = {b: np.mean([p[b] for p in parts], axis=0).astype(np.float32) for b in blocks}
    sets: dict[int, dict[str, np.ndarray]] = {b: {} for b in blocks}
    for lang, paras in corpus.items():
        jobs = [NeuronJob(c, blocks, mc.paragraph_tokens, mc.skip_first, thresholds) for c in _chunks(paras, size)]
        parts = pool.map(neuron_active_sets, jobs, desc=f"neurons {lang}")
        for b in blocks:
            sets[b][lang] = np.concatenate([p[b] for p in parts])
    return {b: {"overlap": pair_overlaps(s, pairs, perm), "size": {l: float(x.sum(1).mean()) for l, x in s.items()}}
            for b, s in sets.items()}


def _log_overlaps(run: tracking.RunRef, prefix: str, per_layer: dict[int, dict]) -> dict[int, float]:
    """translated / unrelated per pair and their mean gap, step = layer; returns the gap per layer."""
    gaps = {}
    for layer, r in per_layer.items():
        ov = r["overlap"]
        gaps[layer] = float(np.mean([v["translated"] - v["unrelated"] for v in ov.values()]))
        metrics = {f"{prefix}.{kind}.{pair}": v[kind] for pair, v in ov.items()
                   for kind in ("translated", "unrelated", "gap_se")}
        metrics.update({f"{prefix}.gap": gaps[layer], **{f"{prefix}.size.{l}": s for l, s in r["size"].items()}})
        tracking.log_metrics(run, metrics, step=layer)
    return gaps


def _overlap_figure(per_layer: dict[int, dict], title: str):
    pairs = next(iter(per_layer.values()))["overlap"]
    panels = {pair: {kind: {l: r["overlap"][pair][kind] for l, r in per_layer.items()} for kind in ("translated", "unrelated")}
              for pair in pairs}
    return layer_curves(panels, "Jaccard overlap of active sets", title)


def _table(layers: list[int], sae: dict[int, dict], gaps: dict[int, float], ngaps: dict[int, float]) -> str:
    rows = ["| layer | SAE FVE (held-out) | SAE L0 | dead | SAE gap | neuron gap (block layer-1) |", "|---|---|---|---|---|---|"]
    for l in layers:
        s = sae[l]["sae"]
        ng = ngaps.get(l - 1)
        rows.append(f"| {l} | {s['fve']:.3f} | {s['l0']:.1f} | {s['dead']:.2f} | {gaps[l]:+.3f} | "
                    f"{'' if ng is None else f'{ng:+.3f}'} |")
    return "\n".join(rows) + "\n"


@flow(name="multilingual", log_prints=True)
def multilingual_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    conf = load_config(config, overrides)
    mc = conf.multilingual
    corpus = load_parallel(mc.languages, mc.files, mc.max_paragraphs)  # bad inputs fail before any work
    try:
        pairs = parse_pairs(mc.languages, mc.pairs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    general = load_prompts(with_overrides(conf, {"data.max_prompts": mc.sae.train_prompts}).data)
    n_par = len(next(iter(corpus.values())))
    perm = derangement(n_par, mc.seed)
    prepare(conf.model)
    with tracking.flow_run(conf, "multilingual") as run:
        with ModelPool(conf) as pool:
            info = pool.map(describe, [None], desc="describe model")[0]
            layers = choose_layers(mc, info["n_layers"])
            train_conf = with_overrides(conf, {"store.positions": "all", "store.layers": layers, "store.sites": ["resid"]})
            train_url, stats = extract_activations(train_conf, general, pool, "multilingual-general")
            log_extraction(run, train_url, stats, "multilingual-general")
            par_conf = with_overrides(train_conf, {"data.max_tokens": mc.paragraph_tokens})
            par_urls = {}
            for lang, paras in corpus.items():
                par_urls[lang], pstats = extract_activations(par_conf, paras, pool, f"parallel-{lang}")
                log_extraction(run, par_urls[lang], pstats, f"parallel-{lang}")
            blocks = [l - 1 for l in layers if l >= 1]
            neurons = neuron_overlaps(conf, pool, blocks, general[: mc.neurons.calibration_prompts], corpus, pairs,
                                      perm) if mc.neurons.enabled and blocks else {}
        # the actors are gone, so every CPU is free for one SAE per layer
        sc = mc.sae
        spec = TrainSpec(steps=sc.steps, batch_tokens=sc.batch_tokens, lr=sc.lr, l1=sc.l1, seed=mc.seed)
        jobs = [SAELayerJob(LayerJob(train_url, l, sc.expansion * info["d_model"], sc.activation, sc.k, spec, sc.holdout,
                                     mc.skip_first, run), par_urls, pairs, perm.tolist()) for l in layers]
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0  # SAEs train on a GPU where there is one
        results = {r["layer"]: r for r in map_remote(sae_layer, jobs, "SAE per layer", conf.ray, num_gpus=gpus)}

        for l, r in results.items():
            s = r["sae"]
            tracking.log_metrics(run, {"multilingual.sae.fve": s["fve"], "multilingual.sae.l0": s["l0"],
                                       "multilingual.sae.dead": s["dead"],
                                       **{f"multilingual.sae.fve.{lang}": v for lang, v in r["fve_lang"].items()}}, step=l)
        tracking.set_tags(run, {f"multilingual.sae.layer_{l:02d}": r["sae"]["run_id"] for l, r in results.items()})
        gaps = _log_overlaps(run, "multilingual.overlap", results)
        ngaps = _log_overlaps(run, "multilingual.neurons.overlap", neurons) if neurons else {}
        tracking.log_figure(run, _overlap_figure(results, f"{info['name']}: SAE features (resid layer)"),
                            "plots/multilingual_overlap_sae.png")
        if neurons:
            tracking.log_figure(run, _overlap_figure(neurons, f"{info['name']}: MLP neurons (block)"),
                                "plots/multilingual_overlap_neurons.png")
        fve = {"held-out general text": {l: r["sae"]["fve"] for l, r in results.items()},
               **{lang: {l: r["fve_lang"][lang] for l, r in results.items()} for lang in corpus}}
        tracking.log_figure(run, layer_curves({"SAE reconstruction": fve}, "fraction of variance explained",
                                              f"{info['name']}: SAE quality"), "plots/multilingual_sae_fve.png")
        tracking.log_text(run, _table(layers, results, gaps, ngaps), "multilingual.md")
        peak = max(gaps, key=gaps.get)
        npeak = max(ngaps, key=ngaps.get) if ngaps else None
        wall = time.perf_counter() - t0
        tracking.log_metrics(run, {"multilingual.peak_layer": peak, "multilingual.neurons.peak_block": npeak,
                                   "multilingual.paragraphs": n_par, "multilingual.wall_s": wall})
    print(_table(layers, results, gaps, ngaps))
    print(f"largest translated-unrelated gap: SAE resid layer {peak} ({gaps[peak]:+.3f})"
          + (f", neurons block {npeak} ({ngaps[npeak]:+.3f})" if npeak is not None else ""))
    print(f"MLflow run: {run.run_id} at {run.tracking_uri} (experiment '{conf.tracking.experiment}'); {wall:.0f} s")
    return {"run_id": run.run_id, "layers": layers, "paragraphs": n_par, "peak_layer": peak, "neurons_peak_block": npeak,
            "gap": gaps, "neurons_gap": ngaps, "fve": fve["held-out general text"],
            "l0": {l: r["sae"]["l0"] for l, r in results.items()}, "wall_s": wall}
