"""Causal tracing results for people: indirect effects averaged over facts at the paper's token groups, per-layer
curves (step = layer), heatmaps (PNG artifacts and MLflow image charts) and a markdown summary."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from lensflow.tasks.causal_trace.facts import Known
from lensflow.tasks.causal_trace.tracing import SITES, FactTrace, Traced
from lensflow.tasks.core import tracking
from lensflow.tasks.core.plots import labelled_heatmap

GROUPS = ("first_subject_token", "middle_subject_tokens", "last_subject_token", "first_subsequent_token",
          "further_tokens", "last_token")
SITE_TITLES = {"resid": "residual stream, one layer", "mlp": "MLP outputs, window", "attn": "attention outputs, window"}
CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}  # the paper's colours


def token_groups(start: int, end: int, n_tokens: int) -> dict[str, list[int]]:
    """Positions of each token group for a subject at [start, end) in a prompt of n_tokens. A one-token subject is
    both the first and the last subject token; the last token is never a subsequent token; tokens before the subject
    belong to no group (restoring them changes nothing)."""
    last = n_tokens - 1
    return {"first_subject_token": [start], "middle_subject_tokens": list(range(start + 1, end - 1)),
            "last_subject_token": [end - 1], "first_subsequent_token": [end] if end < last else [],
            "further_tokens": list(range(end + 1, last)), "last_token": [last]}


@dataclass(frozen=True)
class AverageEffects:
    """aie[site]: [groups, layers] average indirect effect; a fact contributes the mean over its tokens in a group,
    and a group averages the facts that have it (NaN when none has)."""

    aie: dict[str, np.ndarray]
    counts: dict[str, int]  # facts contributing to each group
    n_facts: int
    clean: float  # mean P(answer) on clean prompts
    corrupted: float  # mean P(answer) with the subject corrupted

    def curve(self, site: str, group: str) -> np.ndarray:
        return self.aie[site][GROUPS.index(group)]


def average_effects(traces: list[FactTrace]) -> AverageEffects:
    sums = {s: np.zeros((len(GROUPS), traces[0].probs[s].shape[0])) for s in SITES}  # the paper's site order
    counts = np.zeros(len(GROUPS))
    for t in traces:
        groups = token_groups(t.start, t.end, len(t.tokens))
        for g, name in enumerate(GROUPS):
            if groups[name]:
                counts[g] += 1
                for site in sums:
                    sums[site][g] += t.effects(site)[:, groups[name]].double().mean(1).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        aie = {site: s / counts[:, None] for site, s in sums.items()}
    return AverageEffects(aie, {g: int(c) for g, c in zip(GROUPS, counts)}, len(traces),
                          float(np.mean([t.clean for t in traces])), float(np.mean([t.corrupted for t in traces])))


@dataclass(frozen=True)
class Peak:
    site: str
    group: str
    layer: int
    aie: float


def peaks(ae: AverageEffects) -> list[Peak]:
    """Where each (site, token group) curve is highest."""
    return [Peak(site, g, int(np.nanargmax(m[i])), float(np.nanmax(m[i])))
            for site, m in ae.aie.items() for i, g in enumerate(GROUPS) if np.isfinite(m[i]).any()]


def summary(model: str, ae: AverageEffects, known: Known) -> str:
    """Markdown: what was traced, and each curve's peak (layer, AIE) per site and token group."""
    lines = [f"# Causal tracing: {model}", "",
             f"{known.n_correct} of {known.n_facts} facts answered right; {ae.n_facts} traced. Mean P(answer): "
             f"clean {ae.clean:.3f}, subject corrupted {ae.corrupted:.3f}.", "",
             "| relation | right | total |", "|---|---|---|"]
    lines += [f"| {r} | {ok} | {n} |" for r, (ok, n) in known.per_relation.items()]
    lines += ["", "Peak average indirect effect (layer: resid = hidden_states index, 0 = embeddings; mlp / attn = "
              "centre block of the restored window)", "",
              "| token group | facts | " + " | ".join(f"{s} peak layer | {s} peak AIE" for s in ae.aie) + " |",
              "|---|---|" + "---|---|" * len(ae.aie)]
    found = {(p.site, p.group): p for p in peaks(ae)}
    for g in GROUPS:
        cells = [f"{found[s, g].layer} | {found[s, g].aie:.4f}" if (s, g) in found else "- | -" for s in ae.aie]
        lines.append(f"| {g} | {ae.counts[g]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MEASURES = ("which hidden states carry a fact from subject to answer: average indirect effect of restoring the "
            "residual stream, MLP and attention outputs, per layer and token group")


def log_results(run: tracking.RunRef, model: str, known: Known, traced: Traced, ae: AverageEffects) -> str:
    """Curves, heatmaps (artifact + image chart), one example fact's per-token heatmaps, JSON and the summary."""
    tracking.measures(run, MEASURES)
    for site, m in ae.aie.items():
        for i, g in enumerate(GROUPS):
            tracking.log_series(run, f"causal_trace.{site}.aie.{g}", list(m[i]))
    tracking.log_metrics(run, {"causal_trace.n_facts": known.n_facts, "causal_trace.n_correct": known.n_correct,
                               "causal_trace.clean_prob": ae.clean, "causal_trace.corrupted_prob": ae.corrupted,
                               **{f"causal_trace.{k}": v for k, v in traced.metrics().items()}})
    for site, m in ae.aie.items():
        fig = labelled_heatmap(m, GROUPS, f"{model}: AIE, {SITE_TITLES[site]} ({ae.n_facts} facts)", cmap=CMAPS[site],
                               colorbar="average indirect effect")
        tracking.log_figure(run, fig, f"plots/causal_trace_{site}.png")  # also the image chart causal_trace_<site>
    example = traced.traces[0]
    labels = [tok + ("*" if example.start <= i < example.end else "") for i, tok in enumerate(example.tokens)]
    for site, p in example.probs.items():
        fig = labelled_heatmap(p.numpy().T, labels, f"{example.fact.prompt!r} -> {example.fact.target!r}: "
                               f"{SITE_TITLES[site]}", cmap=CMAPS[site], colorbar="P(answer)", vmin=example.corrupted)
        tracking.log_figure(run, fig, f"plots/causal_trace_example_{site}.png")
    tracking.log_text(run, json.dumps({"groups": list(GROUPS), "counts": ae.counts, "aie": {
        s: [[None if not np.isfinite(v) else float(v) for v in row] for row in m] for s, m in ae.aie.items()}}),
        "causal_trace/aie.json")
    text = summary(model, ae, known)
    tracking.log_text(run, text, "causal_trace/summary.md")
    return text
