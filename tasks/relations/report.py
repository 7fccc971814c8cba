"""LRE results for people: per-relation faithfulness and causality curves (step = layer), the means with their
baselines, a table of relations sorted by faithfulness, and the paper's figure shape (faithfulness by kind)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from lensflow.tasks.core import tracking
from lensflow.tasks.core.plots import labelled_heatmap, layer_curves
from lensflow.tasks.relations.data import KINDS
from lensflow.tasks.relations.fitting import Fitted
from lensflow.tasks.relations.lre import CAUSAL_METHODS, FAITH_METHODS, RelationResult


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


@dataclass(frozen=True)
class Summary:
    """Means over relations at each relation's dev-chosen layer (and per layer), per method."""

    faithfulness: dict[str, float]
    causality: dict[str, float]
    by_kind: dict[str, dict[str, float]]  # kind -> method -> mean faithfulness at the chosen layer
    per_layer: dict[str, dict[int, float]]  # "faithfulness.lre" ... -> layer -> mean over relations


def summarise(results: list[RelationResult]) -> Summary:
    faith = {m: _mean(r.at_layer(r.faithfulness, m) for r in results) for m in FAITH_METHODS}
    caus = {m: _mean(r.at_layer(r.causality, m) for r in results) for m in CAUSAL_METHODS}
    kinds: dict[str, list[RelationResult]] = defaultdict(list)
    for r in results:
        kinds[r.kind].append(r)
    by_kind = {k: {m: _mean(r.at_layer(r.faithfulness, m) for r in rs) for m in FAITH_METHODS}
               for k, rs in sorted(kinds.items(), key=lambda kv: (KINDS + ("other",)).index(kv[0]))}
    per_layer: dict[str, dict[int, float]] = {}
    for table, methods in (("faithfulness", FAITH_METHODS), ("causality", CAUSAL_METHODS)):
        for m in methods:
            per: dict[int, list[float]] = defaultdict(list)
            for r in results:
                for l, v in zip(r.layers, getattr(r, table)[m]):
                    per[l].append(v)
            per_layer[f"{table}.{m}"] = {l: _mean(v) for l, v in sorted(per.items())}
    return Summary(faith, caus, by_kind, per_layer)


def table(model: str, results: list[RelationResult], s: Summary) -> str:
    """Markdown: relations sorted by faithfulness (LRE, at the dev-chosen layer) with their baselines."""
    f = lambda x: "-" if math.isnan(x) else f"{x:.2f}"
    lines = [f"# Linear relational embeddings: {model}", "",
             (f"{len(results)} relations; beta, rank and layer chosen per relation on dev samples. Faithfulness: "
              "share of test subjects the model answers right whose top-1 token the method reproduces; causality: "
              "share of (subject, other object) pairs flipped by editing the subject state."), "",
             ("| relation | kind | layer | beta | rank | test known | faith LRE | logit lens | translation | regression "
              "| causal LRE | regression | identity |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: -np.nan_to_num(r.at_layer(r.faithfulness), nan=-1)):
        i = r.layers.index(r.layer)
        lines.append(f"| {r.name} | {r.kind} | {r.layer} | {r.beta[i]:g} | {r.rank[i]} | {r.n_test_known}/{r.n_test} | "
                     + " | ".join(f(r.faithfulness[m][i]) for m in FAITH_METHODS) + " | "
                     + " | ".join(f(r.causality[m][i]) for m in CAUSAL_METHODS) + " |")
    lines.append("| **mean** | | | | | | " + " | ".join(f(s.faithfulness[m]) for m in FAITH_METHODS) + " | "
                 + " | ".join(f(s.causality[m]) for m in CAUSAL_METHODS) + " |")
    lines += ["", "| kind | " + " | ".join(FAITH_METHODS) + " |", "|---|" + "---|" * len(FAITH_METHODS)]
    lines += [f"| {k} | " + " | ".join(f(v[m]) for m in FAITH_METHODS) + " |" for k, v in s.by_kind.items()]
    return "\n".join(lines) + "\n"


def log_results(run: tracking.RunRef, model: str, fitted: Fitted) -> str:
    results = fitted.results
    s = summarise(results)
    for r in results:
        for table_name in ("faithfulness", "causality"):
            for m, vals in getattr(r, table_name).items():
                tracking.log_series(run, f"lre.relation.{_slug(r.name)}.{table_name}.{m}", dict(zip(r.layers, vals)))
    for key, curve in s.per_layer.items():
        tracking.log_series(run, f"lre.layer.{key}", curve)
    tracking.log_metrics(run, {**{f"lre.faithfulness.{m}": v for m, v in s.faithfulness.items()},
                               **{f"lre.causality.{m}": v for m, v in s.causality.items()},
                               **{f"lre.kind.{k}.faithfulness.{m}": v for k, d in s.by_kind.items() for m, v in d.items()},
                               **{f"lre.{k}": v for k, v in fitted.metrics().items()}})
    panels = {k: {m: {l: _mean(r.faithfulness[m][r.layers.index(l)] for r in results if r.kind == k)
                      for l in results[0].layers} for m in FAITH_METHODS} for k in s.by_kind}
    tracking.log_figure(run, layer_curves(panels, "faithfulness", f"{model}: LRE faithfulness by relation kind"),
                        "plots/lre_faithfulness_by_kind.png")
    order = sorted(results, key=lambda r: (r.kind, -np.nan_to_num(r.at_layer(r.faithfulness), nan=-1)))
    m = np.array([[r.at_layer(r.faithfulness, x) for x in FAITH_METHODS] for r in order])
    fig = labelled_heatmap(m.T, list(FAITH_METHODS), f"{model}: faithfulness at the chosen layer", xlabel="relation",
                           cmap="Blues", colorbar="faithfulness", vmin=0)
    fig.axes[0].set_xticks(range(len(order)), [f"{r.name} ({r.kind[:4]})" for r in order], rotation=70, fontsize=7,
                           ha="right")
    fig.set_size_inches(3 + 0.35 * len(order), 4.5)
    fig.tight_layout()
    tracking.log_figure(run, fig, "plots/lre_relations.png")
    tracking.log_text(run, json.dumps([asdict(r) for r in results]), "lre/results.json")
    text = table(model, results, s)
    tracking.log_text(run, text, "lre/summary.md")
    return text
