"""Where each metric appears on an MLflow dashboard. MLflow's chart view makes one section per prefix before a '/',
so every metric is logged as `<section>/<name>`. Each experiment's first section (named after it) holds its
headline per-layer curves only (step = layer, at most about a dozen charts, what a run page opens on); everything
else goes to sections that sort after it: `<experiment>.details` (one number per run, secondary curves),
`<experiment>.training` (per-layer training, step = layer), per-ICL-task, transfer and per-language sections, and
bookkeeping (extraction counters, timings, what was computed) in `run`, which sorts after the experiments. Best
value, best layer and mean of each curve are a table (tracking._summarize), not metrics. The names after the '/' are
those of schema 1; the schema version is a tag on every run."""

from __future__ import annotations

# 1: bare dotted names (before the dashboard sections); 2: `<section>/<name>`; 3: headline sections of per-layer
# curves only (scalars and secondary curves moved to `<section>.details`), no `<section>.summary` metrics
SCHEMA = "3"
SCHEMA_TAG = "lensflow.metrics_schema"

# (prefix of the name, section), first match wins; the fallback is the name's first dotted part. Each experiment
# adds its own rules when its package is imported (lensflow.tasks.core.experiment).
_SECTIONS: list[tuple[str, str]] = [("extract.", "run"), ("sweep.", "sweep")]
_BOOKKEEPING = ("_computed", "wall_s", "cpu_s", "_cached", "samples_per_s", "n_train", "n_test", "keep_rate",
                "paragraphs", "targets")
# one number per run (a mean or a peak over layers, a count): never a headline chart
_SCALARS = ("_mean", "better_layers", "peak_layer", "peak_block")
DETAILS = ".details"


def section(name: str) -> str:
    if name.endswith(_BOOKKEEPING):
        return "run"
    sec = next((s for prefix, s in _SECTIONS if name.startswith(prefix)), name.split(".", 1)[0])
    if name.endswith(_SCALARS) and "." not in sec and sec not in ("run", "sweep"):
        return sec + DETAILS
    return sec


def metric_key(name: str) -> str:
    """The logged key of a schema-1 name: its section, then the name without the experiment's prefix when the section
    already says it (a chart's title is the part after the '/', and must fit a chart's width):
    `future_lens.soft_prompt.p_at_1.n1` -> `future_lens/soft_prompt.p_at_1.n1`, `tuned_lens.kl_to_final` ->
    `lenses/tuned_lens.kl_to_final`, `fv.antonym.zero_shot.acc` -> `fv.per_task/antonym.zero_shot.acc`."""
    if "/" in name:
        return name
    sec = section(name)
    head = sec.split(".", 1)[0] + "."
    short = name.removeprefix(head) if sec not in ("run", "sweep") and name.startswith(head) else name
    return f"{sec}/{short}"


def is_headline(key: str) -> bool:
    """A logged key in an experiment's headline section (no dot in the section name, not bookkeeping)."""
    sec = key.split("/", 1)[0]
    return "/" in key and "." not in sec and sec not in ("run", "sweep")


def lower_is_better(name: str) -> bool:
    last = name.split("/")[-1]
    return "kl" in last or "mse" in last or last.endswith(("loss", "dead")) or ".loss." in last


def add_sections(rules: tuple[tuple[str, str], ...]) -> None:
    """An experiment's (prefix, section) rules, checked before the fallback; adding the same rules twice is a no-op."""
    _SECTIONS.extend(r for r in rules if r not in _SECTIONS)
