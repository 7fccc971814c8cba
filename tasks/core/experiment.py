"""What an experiment declares about itself, once: the name users type, its flow, its config section, how its
inputs are checked, what a sweep ranks it by, and where its metrics go on a dashboard.

Each experiment package builds one `Experiment` in its `__init__.py`; lensflow.tasks.registry lists them. The core
never imports an experiment: it learns an experiment's metric sections when that package is imported (in the
driver and in every Ray worker that runs its code)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lensflow.tasks.core import metric_names
from lensflow.tasks.core.config import Config, Section


@dataclass(frozen=True)
class Headline:
    """What a sweep ranks its points by: a metric (per layer when logged with step = layer) and how to reduce it."""

    metric: str
    direction: Literal["max", "min"]
    reduce: Literal["best", "mean"]  # its best step, or its mean over steps (where the best layer is trivial)

    def score(self, curve: Mapping[int, float]) -> tuple[int | None, float]:
        """(step, value) a point is ranked by; step None for a mean."""
        if not curve:
            return None, float("nan")
        if self.reduce == "mean":
            return None, float(np.mean(list(curve.values())))
        step = (max if self.direction == "max" else min)(curve, key=curve.get)
        return step, curve[step]


def _entry(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Experiment:
    name: str  # what users type: `lensflow run NAME`
    flow: str  # "module:function" of its Prefect flow, imported only when run
    headline: Headline
    check_inputs: Callable[[Config], object]  # reads and validates its input files before Prefect or Ray start
    section: str | None = None  # its config section: `--set <section>.<key>=...`
    config: type[Section] | None = None
    metric_sections: tuple[tuple[str, str], ...] = ()  # (metric name prefix, dashboard section), first match wins
    lens_grids: Mapping[str, str] = field(default_factory=dict)  # `lensflow lens --lens KIND` -> "module:function"
    feature_pages: str = "features"  # the artifact folder of its feature pages: `lensflow feature --flow NAME`
    # the run config as its flow will run it, when the flow changes it (multilingual runs its own default model):
    # preflight checks layer keys against that model's depth, not model.name's
    resolve: Callable[[Config], Config] | None = None

    def __post_init__(self) -> None:
        metric_names.add_sections(self.metric_sections)

    def resolved(self, conf: Config) -> Config:
        return self.resolve(conf) if self.resolve is not None else conf

    def flow_function(self) -> Callable[..., Any]:
        return _entry(self.flow)

    def grid_renderer(self, kind: str) -> Callable[..., Any]:
        return _entry(self.lens_grids[kind])
