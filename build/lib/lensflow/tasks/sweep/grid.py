"""Parameter sweeps: a grid of config overrides over one flow, each point a nested MLflow run under one sweep run.

A sweep is identified by what it asks for (flow, base config, fixed overrides, grid), so running the same sweep
again finds its MLflow run and runs only the points without a FINISHED child. Points share stage outputs through
store.root like any two runs do: a grid over an evaluation setting trains nothing twice."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lensflow.tasks.core.config import ConfigError, parse_override, resolve_path
from lensflow.tasks.registry import EXPERIMENTS, experiment, load_config

POINT = "lensflow.sweep_point"  # on a point's run: its grid values, as JSON


class Sweep(BaseModel):
    """A sweep file (conf/sweeps/*.yaml) or the `lensflow sweep` command line."""

    model_config = ConfigDict(extra="forbid")
    flow: str
    config: str = "conf/default.yaml"
    set: list[str] = Field(default_factory=list)  # overrides every point shares
    grid: dict[str, list[Any]] = Field(min_length=1)  # config key -> values; the points are their product
    max_parallel: int = Field(default=1, ge=1)  # points running at once
    deployment: str | None = None  # "<flow>/<deployment>": run points on a Prefect work pool instead of here

    @field_validator("flow")
    @classmethod
    def _known_flow(cls, v: str) -> str:
        if v not in EXPERIMENTS:
            raise ValueError(f"expected one of {', '.join(sorted(EXPERIMENTS))}")
        return v

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid key '{key}' has no values")
            if len({json.dumps(x) for x in values}) != len(values):
                raise ValueError(f"grid key '{key}' repeats a value")
        return v

    @property
    def id(self) -> str:
        """Stable over reruns: the flow, the base config's content, the fixed overrides and the grid."""
        base = resolve_path(self.config).read_text()
        blob = json.dumps([self.flow, base, self.set, self.grid], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]


def point_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in point.items()]


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def load_sweep(path: str | Path) -> Sweep:
    p = resolve_path(path)
    try:
        tree = yaml.safe_load(p.read_text()) or {}
        return Sweep.model_validate(tree)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"])
        raise ConfigError(f"{p}: sweep key '{where}': {e['msg']}") from None


def from_command_line(flow: str, config: str, sets: list[str], grids: list[str], max_parallel: int,
                      deployment: str | None) -> Sweep:
    """`--grid KEY=a,b,c` axes (values parsed like --set values) into a Sweep."""
    grid: dict[str, list[Any]] = {}
    for g in grids:
        key, _, values = g.partition("=")
        if not key or not values:
            raise ConfigError(f"--grid '{g}': expected KEY=value1,value2,...")
        grid[key.strip()] = [parse_override(f"{key}={v}")[1] for v in values.split(",")]
    try:
        return Sweep(flow=flow, config=config, set=sets, grid=grid, max_parallel=max_parallel, deployment=deployment)
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"sweep: '{'.'.join(str(x) for x in e['loc'])}': {e['msg']}") from None


def validate_points(sweep: Sweep) -> None:
    """Every point's config, before anything starts: the first bad one fails in one line naming the point."""
    for point in sweep.points():
        try:
            conf = load_config(sweep.config, [*sweep.set, *point_overrides(point)])
            experiment(sweep.flow).check_inputs(conf)
        except ConfigError as err:
            raise ConfigError(f"sweep point ({point_label(point)}): {err}") from None
