"""A non-editable install runs from any directory: configs, shipped data and every package travel in the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` (no dependencies: they are this venv's) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(REPO)], check=True, capture_output=True, timeout=300)
    return target


def _lensflow(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of this venv's editable install
    return subprocess.run([sys.executable, str(target / "bin" / "lensflow"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_configs_data_and_every_package(installed):
    pkg = installed / "lensflow"
    assert {p.name for p in (pkg / "conf").glob("*.yaml")} == {p.name for p in (REPO / "conf").glob("*.yaml")}
    assert len(list((pkg / "tasks" / "data" / "icl").glob("*.json"))) == len(list((REPO / "tasks/data/icl").glob("*.json")))
    shipped = {p.relative_to(REPO).with_suffix("") for p in REPO.glob("tasks/**/*.py") if "data/icl" not in str(p)}
    assert shipped <= {p.relative_to(pkg).with_suffix("") for p in pkg.glob("tasks/**/*.py")}


def test_installed_lensflow_runs_from_another_directory(installed, tmp_path):
    """`lensflow config --config default` and `lensflow run extract` from a folder with no checkout in sight."""
    shown = _lensflow(installed, tmp_path, "config", "--config", "default")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["model"]["name"] == "smollm2-135m"
    run = _lensflow(installed, tmp_path, "run", "extract", "--set", "model.name=tiny-llama", "--set", "data.max_prompts=4",
                    "--set", "data.max_tokens=8", "--set", "store.chunk_size=2", "--set", "ray.actors=1")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout[run.stdout.index("{\n"):])
    assert result["n_prompts"] == 4 and result["store"].startswith(str(tmp_path / ".lensflow" / "store"))
    where = subprocess.run([sys.executable, "-c", "import lensflow.tasks.core.config as c; print(c.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(installed)}, cwd=tmp_path, capture_output=True, text=True)
    assert where.stdout.startswith(str(installed))  # the installed copy ran, not the checkout
