"""What a Future Lens run logs to MLflow: metrics per (method, layer, N) with step = source layer, the paper's
Figure 4 (Precision@1 against layer, one panel per N), a best-layer table, each trained layer's curves in the flow's
own run (tracking.log_layer_training), and the trained tensors as artifacts (what `lensflow lens` reads back by run
id)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from lensflow.tasks.core import tracking
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.plots import layer_curves
from lensflow.tasks.core.stages import Item

if TYPE_CHECKING:
    from lensflow.tasks.core.extraction import Extraction
    from lensflow.tasks.future_lens.methods import (
        FutureLensPlan,
        FutureLensResults,
        LayerResult,
    )
    from lensflow.tasks.future_lens.samples import SampleTargets

METHODS = ("ngram", "linear_vocab", "linear_hidden", "fixed_prompt", "soft_prompt")  # the figure's curves
MEASURES = ("how much one hidden state tells about the tokens after the next: Precision@1 of N=0..3 tokens ahead, "
            "per source layer, for n-gram, linear and learned-prompt readouts")


SOFT_PROMPTS = "soft_prompts"  # artifact folder of the learned prompts, one layer_LL.safetensors each


def artifact(method: str, layer: int) -> str:
    folder = SOFT_PROMPTS if method == "soft_prompt" else f"probes/{method}"
    return f"{folder}/layer_{layer:02d}.safetensors"


def prefixed(method: str, metrics: dict[str, float], n: int) -> dict[str, float]:
    """MLflow names the dashboards read: future_lens.<method>.<metric>.n<N> (step = source layer)."""
    return {f"future_lens.{method}.{k}.n{n}": v for k, v in metrics.items()}


def log_layers(run: tracking.RunRef, plan: FutureLensPlan) -> None:
    """Every trained layer, read back from its stage (found or trained by this run, so each run is complete), into the
    flow's run (no run per layer): per method, the training curves, their final values per layer (step = layer) and
    a table of settings and stage keys; the tensors as artifacts (the grid loads them)."""
    for method, jobs in plan.jobs.items():
        trained = [log_layer(run, job.method, job.layer, job.trained.load(job.item), job.trained.key)
                   for job in jobs if job.trained is not None]
        tracking.log_layer_training(run, f"future_lens_{method}", f"future_lens.training.{method}", trained)


def log_layer(run: tracking.RunRef, method: str, layer: int, state: Item, stage_key: str) -> tracking.LayerTraining:
    """The layer's tensors as an artifact of the flow's run; its settings and curves for log_layer_training."""
    tracking.log_tensors(run, state.tensors, artifact(method, layer))
    params = {"method": method, **state.meta.get("params", {}), "stage": stage_key}
    return tracking.LayerTraining(layer, params, {k: list(v) for k, v in state.meta.get("curves", {}).items()})


class Clock:
    """Wall time of each phase of the flow, logged as future_lens.time.<phase>."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[phase] = time.perf_counter() - t0

    def timings(self) -> dict[str, float]:
        return {**self.times, "total_s": time.perf_counter() - self.start}


def log_inputs(run: tracking.RunRef, targets: SampleTargets, ex: Extraction, plan: FutureLensPlan) -> None:
    tracking.log_extraction(run, ex, "future_lens")
    tracking.log_metrics(run, {"future_lens.n_train": targets.n_train, "future_lens.n_test": targets.n_test,
                               "future_lens.keep_rate": targets.keep_rate})
    tracking.set_tags(run, {"future_lens.targets": targets.url,
                            "future_lens.soft_prompt_layers": json.dumps(plan.causal_layers)})


def best_layers(methods: dict[str, list[LayerResult]], n_future: int) -> dict[str, dict[str, dict]]:
    """Per method and offset N: the layer with the highest Precision@1 (the first on ties) and its metrics."""
    best: dict[str, dict[str, dict]] = {}
    for method, rs in methods.items():
        best[method] = {}
        for n in range(n_future):
            top = max(rs, key=lambda r: r.metrics[n].p_at_1)
            best[method][f"n{n}"] = {"layer": top.layer, **top.metrics[n].as_dict()}
    return best


def summary_table(best: dict[str, dict[str, dict]], n_future: int) -> str:
    lines = ["| method | " + " | ".join(f"N={n} P@1 (layer)" for n in range(n_future)) + " |",
             "|---" * (n_future + 1) + "|"]
    for method, b in best.items():
        lines.append(f"| {method} | " + " | ".join(f"{b[f'n{n}']['p_at_1']:.3f} ({b[f'n{n}']['layer']})"
                                                   for n in range(n_future)) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Summary:
    """What the flow returns (and the CLI prints as JSON)."""

    run_id: str
    store: str
    targets: str
    n_train: int
    n_test: int
    keep_rate: float
    best_fixed_prompt: str
    best: dict[str, dict[str, dict]]
    table: str
    computed: dict[str, int]  # what this run computed; all 0 on a rerun that found everything
    timings: dict[str, float]


def log_run(run: tracking.RunRef, conf: Config, targets: SampleTargets, ex: Extraction, results: FutureLensResults,
            clock: Clock) -> Summary:
    """Every metric with step = source layer, the figure, the summary table, counters and timings."""
    fc, methods = conf.future_lens, results.methods
    tracking.measures(run, MEASURES)
    per_layer: dict[int, dict[str, float]] = {}
    for method, rs in methods.items():
        for r in rs:
            for n, m in enumerate(r.metrics):
                per_layer.setdefault(r.layer, {}).update(prefixed(method, m.as_dict(), n))
    for layer, metrics in sorted(per_layer.items()):
        tracking.log_metrics(run, metrics, step=layer)
    panels = {f"N={n}": {m: {r.layer: r.metrics[n].p_at_1 for r in rs} for m, rs in methods.items() if m in METHODS}
              for n in range(fc.n_future)}
    title = f"Future Lens, {conf.model.name}: Precision@1 vs source layer"
    tracking.log_figure(run, layer_curves(panels, "Precision@1", title), "plots/future_lens_p_at_1.png")
    best = best_layers(methods, fc.n_future)
    table = summary_table(best, fc.n_future)
    tracking.log_text(run, table + "\n", "future_lens_summary.md")
    tracking.log_text(run, json.dumps({m: [asdict(r) for r in rs] for m, rs in methods.items()}, indent=1, default=float),
                      "future_lens_results.json")
    tracking.set_tags(run, {"future_lens.best_fixed_prompt": results.best_fixed_prompt})
    computed = {"targets": int(targets.computed), "extract_chunks": ex.chunks_computed, **results.computed()}
    timings = clock.timings()
    sps = [fc.soft_prompt_steps * fc.soft_prompt_batch / r.train_s for r in methods["soft_prompt"] if r.trained and r.train_s]
    tracking.log_metrics(run, {f"future_lens.time.{k}": v for k, v in timings.items()}
                         | {f"future_lens.computed.{k}": v for k, v in computed.items()}
                         | ({"future_lens.soft_prompt.samples_per_s": float(np.mean(sps))} if sps else {}))
    return Summary(run.run_id, ex.url, targets.url, targets.n_train, targets.n_test, targets.keep_rate,
                   results.best_fixed_prompt, best, table, computed, timings)
