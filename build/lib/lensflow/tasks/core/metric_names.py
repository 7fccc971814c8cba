"""Where each metric appears on an MLflow dashboard. MLflow's chart view makes one section per prefix before a '/',
so every metric is logged as `<section>/<name>`: the experiment's headline curves in a section named after it,
per-ICL-task details, transfer and per-language SAE quality in sections of their own, and bookkeeping (extraction
counters, timings, what was computed) in `run`, which sorts after the experiments. The names after the '/' are
those of schema 1; the schema version is a tag on every run."""

from __future__ import annotations

SCHEMA = "2"  # 1: bare dotted names (before the dashboard sections); 2: `<section>/<name>`
SCHEMA_TAG = "lensflow.metrics_schema"

# (prefix of the name, section), first match wins; the fallback is the name's first dotted part. Each experiment
# adds its own rules when its package is imported (lensflow.tasks.core.experiment).
_SECTIONS: list[tuple[str, str]] = [("extract.", "run"), ("sweep.", "sweep")]
_BOOKKEEPING = ("_computed", "wall_s", "cpu_s", "_cached", "samples_per_s", "n_train", "n_test", "keep_rate",
                "paragraphs", "targets")


def section(name: str) -> str:
    if name.endswith(_BOOKKEEPING):
        return "run"
    for prefix, sec in _SECTIONS:
        if name.startswith(prefix):
            return sec
    return name.split(".", 1)[0]


def metric_key(name: str) -> str:
    """The logged key of a schema-1 name: `future_lens.soft_prompt.p_at_1.n1` ->
    `future_lens/future_lens.soft_prompt.p_at_1.n1`."""
    return name if "/" in name else f"{section(name)}/{name}"


def lower_is_better(name: str) -> bool:
    return "kl" in name.split("/")[-1] or name.endswith(("loss", "dead"))


def add_sections(rules: tuple[tuple[str, str], ...]) -> None:
    """An experiment's (prefix, section) rules, checked before the fallback; adding the same rules twice is a no-op."""
    _SECTIONS.extend(r for r in rules if r not in _SECTIONS)
