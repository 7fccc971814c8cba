"""Where each metric appears on an MLflow dashboard. MLflow's chart view makes one section per prefix before a '/',
so every metric is logged as `<section>/<name>`: the experiment's headline curves in a section named after it,
per-ICL-task details, transfer and per-language SAE quality in sections of their own, and bookkeeping (extraction
counters, timings, what was computed) in `run`, which sorts after the experiments. The names after the '/' are
those of schema 1; the schema version is a tag on every run."""

from __future__ import annotations

SCHEMA = "2"  # 1: bare dotted names (before the dashboard sections); 2: `<section>/<name>`
SCHEMA_TAG = "lensflow.metrics_schema"

# (prefix of the name, section), first match wins; the fallback is the name's first dotted part
_SECTIONS = (
    ("extract.", "run"),
    ("future_lens.time.", "run"),
    ("future_lens.computed.", "run"),
    ("lenses.", "run"),  # per-layer wall and CPU seconds, translator bookkeeping
    ("fv.transfer.", "fv.transfer"),
    ("fv.mean.", "fv"),
    ("fv.layer", "fv"),
    ("fv.top_k", "fv"),
    ("fv.tasks", "fv"),
    ("logit_lens.", "lenses"),
    ("heldout.", "lenses"),
    ("tuned_lens.", "lenses"),
    ("multilingual.sae.", "multilingual.sae"),
    ("multilingual.neurons.", "multilingual.neurons"),
    ("multilingual.overlap.size.", "multilingual.sizes"),
    ("sweep.", "sweep"),
)
_BOOKKEEPING = ("_computed", "wall_s", "cpu_s", "_cached", "samples_per_s", "n_train", "n_test", "keep_rate",
                "paragraphs", "targets")


def section(name: str) -> str:
    if name.endswith(_BOOKKEEPING):
        return "run"
    for prefix, sec in _SECTIONS:
        if name.startswith(prefix):
            return sec
    if name.startswith("fv."):  # fv.<ICL task>.<metric>: 61 tasks x 6, out of the headline section
        return "fv.per_task"
    return name.split(".", 1)[0]


def metric_key(name: str) -> str:
    """The logged key of a schema-1 name: `future_lens.soft_prompt.p_at_1.n1` ->
    `future_lens/future_lens.soft_prompt.p_at_1.n1`."""
    return name if "/" in name else f"{section(name)}/{name}"


def lower_is_better(name: str) -> bool:
    return "kl" in name.split("/")[-1] or name.endswith(("loss", "dead"))
