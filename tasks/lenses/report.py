"""What the logit-lens flow shows people: per-layer metrics (step = layer), curves, the summary table, the
translators as one artifact (what `lensflow lens --lens tuned` reads by run id) and layer x token grids.

Nothing here is found again by a later run: the stages under store.root are (tasks/lenses/tuned_lens.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lensflow.tasks.core import tracking
from lensflow.tasks.core.config import Config, ConfigError
from lensflow.tasks.core.plots import layer_curves, lens_grid, save_grid
from lensflow.tasks.lenses.readouts import (
    PromptStates,
    Readout,
    Translator,
    grid_cells,
    prompt_states,
)
from lensflow.tasks.lenses.tuned_lens import (
    TRAINING_KEYS,
    LayerLenses,
    LayersResult,
    LensStages,
    TargetsResult,
    layer_item,
)

FLOW = "logit-lens"


MEASURES = ("how close each layer, read through the logit lens and the tuned lens, is to the model's output: KL to "
            "the final layer and top-1 agreement, per layer")
LENSES = {"logit": "logit_lens", "tuned": "tuned_lens"}  # lens -> metric prefix
TRANSLATORS_FILE = "tuned_lens/translators.safetensors"


@dataclass(frozen=True)
class LensSummary:
    """Per-layer metrics of both lenses ({metric: {layer: value}}), their means, and where the tuned lens wins."""

    per_layer: dict[str, dict[int, float]]
    means: dict[str, float]  # "<metric>_mean"
    better_layers: int  # layers below the last where the tuned lens has the lower KL
    inner_layers: int  # layers below the last

    @property
    def tuned_beats_logit_below_last(self) -> bool:
        return self.better_layers == self.inner_layers

    def table(self) -> str:
        s = self.per_layer
        lines = ["| layer | logit KL | tuned KL | logit top-1 | tuned top-1 |", "|---|---|---|---|---|"]
        lines += [f"| {l} | {s['logit_lens.kl_to_final'][l]:.3f} | {s['tuned_lens.kl_to_final'][l]:.3f} | "
                  f"{s['logit_lens.top1_agree'][l]:.3f} | {s['tuned_lens.top1_agree'][l]:.3f} |"
                  for l in sorted(s["logit_lens.kl_to_final"])]
        return "\n".join(lines)


def summarize(layers: list[LayerLenses]) -> LensSummary:
    series: dict[str, dict[int, float]] = {}
    for r in layers:
        for lens, prefix in LENSES.items():
            for k, v in getattr(r, lens).items():
                series.setdefault(f"{prefix}.{k}", {})[r.layer] = v
    last = max(r.layer for r in layers)
    kl_logit, kl_tuned = series["logit_lens.kl_to_final"], series["tuned_lens.kl_to_final"]
    better = [l for l in kl_logit if l != last and kl_tuned[l] < kl_logit[l]]
    means = {f"{k}_mean": float(np.mean(list(v.values()))) for k, v in series.items()}
    return LensSummary(series, means, len(better), len(layers) - 1)


def translators_to_tensors(translators: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One flat dict for one safetensors file: tensors layer_03.weight, layer_03.bias, ..."""
    return {f"layer_{layer:02d}.{name}": v for layer, tr in translators.items() for name, v in tr.items()}


def translators_from_tensors(flat: dict[str, torch.Tensor]) -> dict[int, Translator]:
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        layer, name = key.split(".", 1)
        by_layer.setdefault(int(layer.removeprefix("layer_")), {})[name] = value
    return {l: Translator.from_tensors(t) for l, t in sorted(by_layer.items())}


def save_translators(run: tracking.RunRef, translators: dict[int, dict[str, torch.Tensor]]) -> None:
    tracking.log_tensors(run, translators_to_tensors(translators), TRANSLATORS_FILE)


def load_translators(tracking_uri: str, run_id: str) -> dict[int, Translator]:
    """A logit-lens run's tuned lens, by run id."""
    return translators_from_tensors(tracking.load_tensors(tracking_uri, run_id, TRANSLATORS_FILE))


@dataclass(frozen=True)
class LensReport:
    """What one run of the flow found, computed and measured."""

    stages: LensStages
    summary: LensSummary
    trained_layers: int
    evaluated_layers: int
    targets_chunks_computed: int
    eval_tokens: int
    timings: dict[str, float]

    def text(self, run_id: str) -> str:
        s, n = self.summary, self.summary.inner_layers
        return "\n".join([
            s.table(),
            f"mean KL: logit {s.means['logit_lens.kl_to_final_mean']:.3f}, "
            f"tuned {s.means['tuned_lens.kl_to_final_mean']:.3f}; "
            f"tuned better at {s.better_layers}/{n} layers below the last",
            f"MLflow run: {run_id}; timings: " + ", ".join(f"{k}={v:.0f}s" for k, v in self.timings.items())])

    def result(self, run_id: str, store: str) -> dict:
        """The flow's return value."""
        s, rows = self.summary, self.stages.split
        return {"run_id": run_id, "store": store, "trained_layers": self.trained_layers,
                "evaluated_layers": self.evaluated_layers, "targets_chunks_computed": self.targets_chunks_computed,
                "timings": self.timings, "train_prompts": len(rows.train), "eval_prompts": len(rows.heldout),
                "eval_tokens": self.eval_tokens, **s.means, "tuned_lens.better_layers": s.better_layers,
                "tuned_beats_logit_below_last": s.tuned_beats_logit_below_last, "per_layer": s.per_layer}


def log_layer_training(run: tracking.RunRef, conf: Config, stages: LensStages, layers: list[LayerLenses]) -> None:
    """The layers this run trained, in the flow's run (no run per layer): final KL per layer (step = layer), a table
    of settings and stage items, the loss curves and their figure (tracking.log_layer_training)."""
    settings = conf.lenses.model_dump(include=set(TRAINING_KEYS))
    tracking.log_layer_training(run, "tuned_lens", "tuned_lens.training", [
        tracking.LayerTraining(r.layer, {**settings, "stage": stages.translators.item_url(layer_item(r.layer))},
                               {"kl": list(r.losses)}) for r in layers if r.trained])


def log_lenses(run: tracking.RunRef, conf: Config, stages: LensStages, targets: TargetsResult, done: LayersResult,
               readout: Readout, grid: PromptStates, t_start: float, extract_s: float) -> LensReport:
    """Everything the flow logs after the stages ran: per-layer metrics and curves, the summary table and means,
    the translators, the grids of lenses.grid_prompt, tags and timings."""
    layers = done.layers
    summary = summarize(layers)
    tracking.measures(run, MEASURES)
    for r in layers:
        tracking.log_metrics(run, {f"{LENSES[lens]}.{k}": v for lens in LENSES for k, v in getattr(r, lens).items()},
                             step=r.layer)
    title = f"{conf.model.name}, held-out tokens"
    for metric, label in (("kl_to_final", "KL(final || lens), nats"), ("top1_agree", "top-1 agreement with the model")):
        curves = {f"{lens} lens": summary.per_layer[f"{prefix}.{metric}"] for lens, prefix in LENSES.items()}
        tracking.log_figure(run, layer_curves({metric: curves}, label, title), f"plots/{metric}.png")
    tracking.log_metrics(run, {**summary.means, "tuned_lens.better_layers": summary.better_layers})
    tracking.log_text(run, summary.table() + "\n", "lenses_summary.md")
    for k in ("wall_s", "cpu_s"):  # cpu: the cost per layer on an idle core, whatever else shares the machine
        tracking.log_series(run, f"lenses.layer_{k}", {r.layer: getattr(r, k) for r in layers})
    log_layer_training(run, conf, stages, layers)
    translators = {r.layer: r.translator for r in layers}
    save_translators(run, translators)
    tracking.set_tags(run, {"lenses.translators": stages.translators.url, "lenses.trained_layers": done.trained,
                            "lenses.split": str(stages.split)})
    trs = {l: Translator.from_tensors(t) for l, t in translators.items()}
    for lens, given in (("logit", None), ("tuned", trs)):
        fig, page = _grid(readout, grid, given, f"{lens} lens: {conf.lenses.grid_prompt!r} ({conf.model.name})")
        tracking.log_figure(run, fig, f"grids/{lens}_lens.png")
        tracking.log_text(run, page, f"grids/{lens}_lens.html")
    timings = {"extract_s": extract_s, "targets_s": targets.wall_s, "layers_s": done.wall_s,
               "layers_cpu_s": sum(r.cpu_s for r in layers), "total_s": time.perf_counter() - t_start}
    tracking.log_metrics(run, {f"lenses.time.{k}": v for k, v in timings.items()})
    return LensReport(stages, summary, done.trained, done.evaluated, targets.chunks_computed, layers[0].eval_tokens,
                      timings)


def _grid(readout: Readout, grid: PromptStates, translators: dict[int, Translator] | None, title: str):
    layers, cells, probs = grid_cells(readout, grid.states, grid.tokenizer, translators)
    return lens_grid(grid.tokens, layers, cells, probs, title)


def render_grid(conf: Config, prompt: str, lens: str = "logit", run_id: str | None = None) -> dict[str, str]:
    """Layer x token grid of `prompt` for the logit or tuned lens (top next token and its probability per cell).
    The tuned lens comes from run_id, else the latest finished logit-lens run. PNG + HTML are written to
    .lensflow/grids and logged to that run (if any) under grids/."""
    from lensflow.tasks.core.models import load_model, prepare

    if lens not in LENSES:
        raise ConfigError(f"--lens {lens}: expected one of {', '.join(LENSES)}")
    uri = conf.tracking.uri
    run_id = run_id or tracking.latest_run(uri, conf.tracking.experiment, FLOW, conf.model.name)
    translators = None
    if lens == "tuned":
        if not run_id:
            raise ConfigError(f"no finished {FLOW} run of {conf.model.name} in experiment "
                              f"'{conf.tracking.experiment}'; run `lensflow run {FLOW}` first or pass --run-id")
        tracking.check_reusable(uri, run_id, conf.model.name)
        translators = load_translators(uri, run_id)
    prepare(conf.model)
    lm = load_model(conf.model)
    if translators is not None:  # same name, other weights: refused
        tracking.check_reusable(uri, run_id, conf.model.name, lm.weights_hash)
    source = f", translators of run {run_id[:8]}" if translators is not None else ""
    fig, page = _grid(Readout.from_lm(lm), prompt_states(lm, prompt, conf.data.max_tokens), translators,
                      f"{lens} lens: {prompt!r} ({conf.model.name}{source})")
    paths = save_grid(fig, page, f"{lens}_lens", prompt)
    out = {k: str(v) for k, v in paths.items()}
    if run_id:
        ref = tracking.RunRef(tracking.local_uri(uri), "", run_id)
        for path in paths.values():
            tracking.log_file(ref, path, "grids")
        out["run_id"] = run_id
    return out
