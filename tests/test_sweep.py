"""Issue #10: `lensflow sweep` runs a grid of one flow as nested MLflow runs under one sweep run, shares stage outputs
between points, logs a summary and a comparison figure, skips finished points on a rerun, and refuses a bad point
before anything starts."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lensflow.flows import cli
from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.sweep import grid as sweeps


def tiny(tmp_path: Path, tracking_uri: str) -> list[str]:
    sets = ["model.name=tiny-llama", f"store.root={tmp_path / 'store'}", f"tracking.uri={tracking_uri}",
            "tracking.experiment=sweep-test", "ray.actors=1", "data.max_prompts=12", "data.max_tokens=16",
            "store.chunk_size=8", "lenses.max_prompts=12", "lenses.epochs=1"]
    return [a for s in sets for a in ("--set", s)]


def test_every_shipped_sweep_file_validates_every_point():
    files = sorted(glob.glob(str(Path(cli.__file__).parents[1] / "conf" / "sweeps" / "*.yaml")))
    assert len(files) >= 5
    for f in files:
        spec = sweeps.load_sweep(f)
        sweeps.validate_points(spec)
        assert len(spec.points()) >= 3 and spec.id == sweeps.load_sweep(f).id


def test_bad_point_fails_in_one_line_before_anything_starts(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'never.db'}"
    code = cli.main(["sweep", "logit-lens", "--grid", "lenses.lr=0.001,-1", *tiny(tmp_path, uri)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "sweep point (lenses.lr=-1)" in err and "lenses.lr" in err
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="grid key 'x.y' repeats a value"):
        sweeps.from_command_line("extract", "conf/default.yaml", [], ["x.y=1,1"], 1, None)


def test_sweep_nests_points_shares_stages_and_resumes(ray_session, prefect_harness, tmp_path, tracking_uri, capsys):
    args = ["sweep", "logit-lens", "--grid", "lenses.lr=0.001,0.003", "--grid", "lenses.seed=0,1",
            *tiny(tmp_path, tracking_uri)]
    assert cli.main(args) == 0
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("sweep-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = client.search_runs([exp.experiment_id], "tags.flow = 'sweep'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    points = {(c.data.params["lenses.lr"], c.data.params["lenses.seed"]) for c in children}
    assert points == {("0.001", "0"), ("0.001", "1"), ("0.003", "0"), ("0.003", "1")}
    # one activation store and one set of lens targets for all four points; translators per point
    store = tmp_path / "store"
    assert len(list((store / "lenses" / "targets").iterdir())) == 1
    assert len(list((store / "lenses" / "translators").iterdir())) == 4
    # the summary: a row per point, the best point by the headline (tuned-lens KL, lower is better), a figure
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"sweep_summary.md", "sweep_summary.json", "plots/sweep_comparison.png"} <= artifacts
    kl = {c.info.run_id: [m.value for m in client.get_metric_history(c.info.run_id, metric_key("tuned_lens.kl_to_final"))]
          for c in children}
    assert all(len(v) == 5 for v in kl.values())  # tiny-llama: resid layers 0-4
    best_kl = {rid: sum(v) / len(v) for rid, v in kl.items()}  # the mean over layers (layer 4 is 0 for every point)
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["lensflow.sweep.best_run"] == min(best_kl, key=best_kl.get)
    assert parent.data.metrics[metric_key("sweep.best.tuned_lens.kl_to_final")] == pytest.approx(min(best_kl.values()))
    assert parent.info.status == "FINISHED"
    # the same sweep again: found by its id, nothing left to run, no new runs
    capsys.readouterr()
    before = len(client.search_runs([exp.experiment_id], ""))  # the sweep, its points and their per-layer jobs
    assert cli.main(args) == 0
    result, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)
    assert (result["points"], result["ran"], result["run_id"]) == (4, 0, parent.info.run_id)
    assert len(client.search_runs([exp.experiment_id], "")) == before
