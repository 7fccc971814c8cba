"""Every experiment lensflow runs, in one table: the CLI, sweeps, preflight, dashboards and the deployment file's
test read it. Adding an experiment is one package in tasks/ (its `EXPERIMENT`), one flow module, one line here.

The run config is the core's sections plus one section per experiment, built here from the table."""

from __future__ import annotations

from pathlib import Path

from pydantic import create_model

from lensflow.tasks import (
    causal_trace,
    circuits,
    editing,
    function_vectors,
    future_lens,
    lenses,
    multilingual,
    relations,
)
from lensflow.tasks.core import config as core_config
from lensflow.tasks.core.config import Config, ConfigError
from lensflow.tasks.core.experiment import Experiment, Headline
from lensflow.tasks.core.prompts import check_prompts

EXTRACT = Experiment(  # the core's own flow: prompts -> activation store
    name="extract",
    flow="lensflow.flows.extract:extract_flow",
    headline=Headline("extract.prompts.tokens_per_s", "max", "best"),
    check_inputs=check_prompts,
)

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    EXTRACT,
    future_lens.EXPERIMENT,
    lenses.EXPERIMENT,
    function_vectors.EXPERIMENT,
    multilingual.EXPERIMENT,
    causal_trace.EXPERIMENT,
    relations.EXPERIMENT,
    editing.EXPERIMENT,
    circuits.EXPERIMENT,
)}

LensflowConfig = create_model(
    "LensflowConfig", __base__=Config, __module__=__name__,
    **{e.section: (e.config, e.config()) for e in EXPERIMENTS.values() if e.section})
LensflowConfig.__doc__ = "The core's sections plus each experiment's (see EXPERIMENTS)."


def experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise ConfigError(f"unknown flow '{name}' (expected one of {', '.join(sorted(EXPERIMENTS))})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LensflowConfig:
    """The run config of every flow: a YAML file (a path, or a name in the shipped conf/) with `--set` on top."""
    return core_config.load(LensflowConfig, path, overrides)
