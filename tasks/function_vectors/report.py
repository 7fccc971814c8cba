"""What the function-vectors experiment shows people: the results table, and everything logged to MLflow
(metric and artifact names are documented in the README; keep them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import numpy as np

from lensflow.tasks.core import tracking
from lensflow.tasks.core.plots import heatmap, layer_curves
from lensflow.tasks.function_vectors.choices import LayerChoice
from lensflow.tasks.function_vectors.evaluation import (
    KINDS,
    Accuracies,
    IclTaskEval,
    LayerCurve,
    TransferResult,
    nanmean,
)
from lensflow.tasks.function_vectors.heads import Head
from lensflow.tasks.function_vectors.patching import Patchings


def mean_accuracies(evals: list[IclTaskEval]) -> Accuracies:
    """Mean over ICL tasks of each accuracy (those with no query kept do not count); n_eval is the total."""
    means = {f.name: nanmean([getattr(e.acc, f.name) for e in evals]) for f in fields(Accuracies)}
    return Accuracies(**{**means, "n_eval": float(sum(e.acc.n_eval for e in evals))})


def table(evals: list[IclTaskEval], transfers: list[TransferResult]) -> str:
    rows = ["| ICL task | icl | n | zero-shot | +FV | shuffled | +FV | natural | +FV |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, a in [*((e.name, e.acc) for e in evals), ("**mean**", mean_accuracies(evals))]:
        cells = " | ".join(f"{getattr(a, k):.2f}" for k in KINDS)
        rows.append(f"| {name} | {a.icl:.2f} | {a.n_eval:.0f} | {cells} |")
    return "\n".join(rows) + "\n" + (f"\n{transfer_table(transfers)}" if transfers else "")


def transfer_table(transfers: list[TransferResult]) -> str:
    """Per directed transfer, on the target's test queries: its n-shot accuracy, then zero-shot accuracy (on the n
    queries kept) with no vector, with the target's own vector (the reference) and with the source's."""
    rows = ["| source -> target | target icl | n | zero-shot | + target's FV | + source's FV |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {t.source} -> {t.target} | {t.icl:.2f} | {t.n_eval} | {t.zero_shot:.2f} | {t.zero_shot_own_fv:.2f} "
             f"| {t.zero_shot_fv:.2f} |" for t in transfers]
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class FvRun:
    """Everything one function-vectors run found or computed, as the flow hands it to the log."""

    model: str
    patchings: Patchings  # every swept ICL task: the evaluated ones, then those only a transfer names
    heads: list[Head]
    choice: LayerChoice
    curves: list[LayerCurve]  # validation layer patchings (empty for a configured layer)
    evals: list[IclTaskEval]
    transfers: list[TransferResult]
    scan_layers: list[int]

    def heads_sweeps(self) -> Patchings:
        """The evaluated ICL tasks' patchings, whose average indirect effect chose the heads."""
        return self.patchings.only([e.name for e in self.evals])

    def computed(self) -> dict[str, int]:
        """Stage items this run computed (the rest were found under store.root)."""
        return {"patchings": self.patchings.computed, "valid": sum(c.computed for c in self.curves),
                "evals": sum(e.computed for e in self.evals), "transfers": sum(t.computed for t in self.transfers)}


MEASURES = ("which attention heads carry an in-context task, and where in depth adding their function vector makes "
            "the model do the task zero-shot: accuracy per layer, average indirect effect per layer")


def per_task_figure(evals: list[IclTaskEval], model: str):
    """One heatmap of every ICL task's accuracies (rows: tasks, columns: icl, zero-shot, +FV, ...)."""
    import matplotlib.pyplot as plt

    cols = ["icl", *KINDS]
    m = np.array([[getattr(e.acc, k) for k in cols] for e in evals], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 3, 0.22 * len(evals) + 1.6))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), [c.replace("_", " ") for c in cols], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(evals)), [e.name for e in evals], fontsize=7 if len(evals) > 20 else 9)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(f"{model}: accuracy per ICL task ({len(evals)} tasks)", fontsize=10)
    fig.tight_layout()
    return fig


def _log_per_task(run: tracking.RunRef, r: FvRun) -> None:
    """Per-ICL-task results as one MLflow table (`fv/per_task.json`) and one heatmap: a table, not 6 charts per ICL task."""
    rows = {"icl_task": [e.name for e in r.evals]}
    for k in r.evals[0].acc.metrics():
        rows[k] = [e.acc.metrics()[k] for e in r.evals]
    run.client.log_table(run.run_id, data=rows, artifact_file="fv/per_task.json")
    tracking.log_figure(run, per_task_figure(r.evals, r.model), "plots/fv_per_task.png")


def log_run(run: tracking.RunRef, r: FvRun, wall_s: float) -> dict:
    """Log the run to MLflow; returns the flow's summary."""
    n_tasks, n_swept, n_layers = len(r.evals), len(r.patchings.icl_tasks), r.patchings.aie.shape[0]
    tracking.measures(run, MEASURES)
    _log_heads(run, r)
    if r.evals:
        _log_per_task(run, r)
    means = {k: v for k, v in mean_accuracies(r.evals).metrics().items() if k != "n_eval"}
    metrics = {f"fv.mean.{m}": v for m, v in means.items()}
    metrics |= {f"fv.transfer.{t.metric_name}.{m}": v for t in r.transfers for m, v in t.metrics().items()}
    computed = r.computed()
    metrics |= {"fv.layer": r.choice.layer, "fv.top_k": len(r.heads), "fv.tasks": n_tasks, "fv.wall_s": wall_s,
                "fv.patchings_cached": n_swept - computed["patchings"]}
    metrics |= {f"fv.{k}_computed": v for k, v in computed.items()}
    tracking.log_metrics(run, metrics)
    tracking.set_tags(run, {"fv.layer_choice": r.choice.how})
    curve = {layer: nanmean([e.layer_scan.get(layer, float("nan")) for e in r.evals]) for layer in r.scan_layers}
    if r.choice.curve:
        tracking.log_series(run, "fv.layer_valid.zero_shot_fv.acc", r.choice.curve)
    if curve:
        tracking.log_series(run, "fv.layer_scan.zero_shot_fv.acc", curve)
        series = {"FV added at layer": curve, "no FV": {layer: means["zero_shot.acc"] for layer in curve}}
        if r.choice.curve:
            series["FV, validation queries"] = r.choice.curve
        fig = layer_curves({"zero-shot": series}, "accuracy (mean over ICL tasks)",
                           f"{r.model}: where to add the function vector")
        tracking.log_figure(run, fig, "plots/fv_layer_scan.png")
    tracking.log_tensors(run, {e.name: e.fv for e in r.evals}, "fv/function_vectors.safetensors")
    tracking.log_text(run, table(r.evals, r.transfers), "fv/results.md")
    if r.transfers:
        tracking.log_text(run, transfer_table(r.transfers), "fv/transfer.md")
    return {"run_id": run.run_id, "tasks": n_tasks, "layer": r.choice.layer, "layer_choice": r.choice.how,
            "layer_valid": r.choice.curve, "top_k": len(r.heads), "heads": r.heads,
            "heads_per_layer": np.bincount([layer for layer, _ in r.heads], minlength=n_layers).tolist(),
            "mean": means, "layer_scan": curve, "patchings_cached": n_swept - computed["patchings"], "computed": computed,
            "transfer": {f"{t.source}->{t.target}": t.metrics() for t in r.transfers},
            "wall_s": wall_s}


def _log_heads(run: tracking.RunRef, r: FvRun) -> None:
    patchings = r.heads_sweeps()
    aie, names = patchings.aie, patchings.names
    tracking.log_array(run, aie, "aie.npy")
    # where the heads are, per layer (step = layer): the strongest head's AIE, and how many of the chosen top-k
    tracking.log_series(run, "fv.aie.max_head", {layer: float(np.nanmax(row)) for layer, row in enumerate(aie)})
    chosen = np.bincount([layer for layer, _ in r.heads], minlength=aie.shape[0])
    tracking.log_series(run, "fv.heads.chosen", {layer: int(n) for layer, n in enumerate(chosen)})
    tracking.log_figure(run, heatmap(aie, f"{r.model}: average indirect effect ({len(names)} ICL tasks)"),
                        "plots/fv_aie.png")
    tracking.log_array(run, patchings.ie, "fv/indirect_effects.npy")
    tracking.log_text(run, json.dumps({"axes": ["icl_task", "layer", "head"], "icl_tasks": names}, indent=1),
                      "fv/indirect_effects.json")
    tracking.log_text(run, json.dumps({"layer": r.choice.layer, "layer_choice": r.choice.how, "k": len(r.heads),
                                       "heads": [{"layer": l, "head": h, "aie": float(aie[l, h])} for l, h in r.heads]},
                                      indent=1), "fv/heads.json")
