"""Issue #10: infra/prefect.yaml deployed to a real Prefect server and run by a real process worker, on loopback.

What the README's "Scheduled runs" steps do, in order: `prefect server start` (own PREFECT_HOME), a `process` work
pool, `prefect deploy --all` of infra/prefect.yaml (only its working directory changed to this checkout), a run of
the nightly deployment with a tiny model's parameters picked up by `prefect worker start --run-once`. Then: the run
COMPLETED, its MLflow run holds the parameters that were passed, the cron schedule made scheduled runs, the Prefect
UI got a progress artifact at 100, and a second run of the one-at-a-time deployment waited for the first."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import requests
from loopback import BIN, answers, free_port, kill_tree, wait_until
from mlflow.tracking import MlflowClient

from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.registry import EXPERIMENTS

REPO = Path(__file__).resolve().parents[1]
POOL, NIGHTLY = "lensflow-gpu", "extract/lensflow-extract"
pytestmark = pytest.mark.timeout(600)


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; `cli()` runs prefect commands against it."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(folder / "home"), "PREFECT_API_URL": self.api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",  # cron runs appear in seconds
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "WARNING"}
        log = (folder / "server.log").open("w")
        self.proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        wait_until(lambda: self.proc.poll() is not None or answers(self.api + "/health"), 180, "prefect server")
        assert self.proc.poll() is None, (folder / "server.log").read_text()[-2000:]

    def cli(self, *args: str, timeout: float = 240) -> str:
        out = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        return out.stdout

    def post(self, path: str, body: dict | None = None) -> list | dict:
        r = requests.post(self.api + path, json=body or {}, timeout=30)
        r.raise_for_status()
        return r.json()

    def get(self, path: str) -> dict:
        r = requests.get(self.api + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        kill_tree(self.proc.pid, signal.SIGTERM)


def tiny_params(tmp: Path, prompts: int) -> dict:
    """The nightly deployment's parameters, pointed at a tiny random model and this test's store and MLflow."""
    return {"config": "conf/default.yaml",
            "overrides": ["model.name=tiny-llama", f"store.root={tmp / 'store'}", f"tracking.uri=sqlite:///"
                          f"{tmp / 'mlflow.db'}", "ray.actors=1", f"data.max_prompts={prompts}",
                          "data.max_tokens=16", "store.chunk_size=8"]}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployments")
    server = PrefectServer(tmp)
    try:
        server.cli("work-pool", "create", POOL, "--type", "process")
        # infra/prefect.yaml as shipped, but for the directory a worker changes into (the file's CHANGE line)
        spec = (REPO / "infra" / "prefect.yaml").read_text()
        assert "directory: /home/ray/lensflow" in spec
        (tmp / "prefect.yaml").write_text(spec.replace("directory: /home/ray/lensflow", f"directory: {REPO}"))
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(tmp / "prefect.yaml"))
        # two runs of the one-at-a-time nightly deployment, different parameters, then one worker pass
        runs = {}
        for prompts in (24, 16):
            out = server.cli("deployment", "run", NIGHTLY, "--params", json.dumps(tiny_params(tmp, prompts)))
            runs[prompts] = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        worker_pass(server, tmp / "worker1.log")
        # the worker takes both; the one that got the slot ran, the other is held: which one is up to the worker
        done = [n for n, r in runs.items() if flow_run(server, r)["state"]["type"] == "COMPLETED"]
        assert len(done) == 1, [(tmp / "worker1.log").read_text()[-3000:]]
        held = next(n for n in runs if n not in done)
        yield server, tmp, (done[0], runs[done[0]]), (held, runs[held])
    finally:
        server.stop()


def worker_pass(server: PrefectServer, log: Path) -> None:
    """One `prefect worker start --run-once`: it submits the runs that are due and returns when they end."""
    worker = subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"], cwd=REPO,
                            env=server.env, capture_output=True, text=True, timeout=420)
    log.write_text(worker.stdout + worker.stderr)


def flow_run(server: PrefectServer, run_id: str) -> dict:
    return server.get(f"/flow_runs/{run_id}")


def state_names(server: PrefectServer, run_id: str) -> list[str]:
    r = requests.get(f"{server.api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=30)
    r.raise_for_status()
    return [s["name"] for s in r.json()]


def test_every_registered_flow_deploys_with_the_nightly_schedule(deployed):
    server, *_ = deployed
    deployments = {d["name"]: d for d in server.post("/deployments/filter")}
    assert set(deployments) == {f"lensflow-{name}" for name in EXPERIMENTS}
    for name, exp in EXPERIMENTS.items():  # each deployment runs the flow the registry names
        module, fn = exp.flow.split(":")
        assert deployments[f"lensflow-{name}"]["entrypoint"] == f"{module.replace('lensflow.', '').replace('.', '/')}.py:{fn}"
    assert all(d["global_concurrency_limit"]["limit"] == 1 for d in deployments.values())
    assert all(d["concurrency_options"]["collision_strategy"] == "ENQUEUE" for d in deployments.values())
    nightly = deployments["lensflow-extract"]
    query = {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
    scheduled = wait_until(lambda: [r for r in server.post("/flow_runs/filter", query) if r["auto_scheduled"]], 60,
                           "the cron schedule's runs")
    starts = [datetime.fromisoformat(r["expected_start_time"]) for r in scheduled]
    assert all((t.hour, t.minute) == (2, 0) for t in starts), starts  # "0 2 * * *" UTC
    assert len({t.date() for t in starts}) == len(starts) >= 3


def test_worker_runs_the_deployment_with_its_parameters(deployed):
    server, tmp, (prompts, run_id), _ = deployed
    assert flow_run(server, run_id)["parameters"]["overrides"] == tiny_params(tmp, prompts)["overrides"]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (mlrun,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{run_id}'")
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["model.name"] == "tiny-llama" and mlrun.data.params["data.max_prompts"] == str(prompts)
    assert mlrun.data.metrics[metric_key("extract.prompts.n_prompts")] == prompts


def test_progress_artifact_reaches_100(deployed):
    server, _, (_, run_id), _ = deployed
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                                "type": {"any_": ["progress"]}}})
    assert artifacts, "no progress artifact on the run"
    assert all(a["data"] == 100 for a in artifacts), [(a["key"], a["data"]) for a in artifacts]


def test_second_run_waits_for_the_first(deployed):
    """ENQUEUE: the second run is held (AwaitingConcurrencySlot) while the first runs, then runs after it."""
    server, tmp, (_, first_id), (_, held_id) = deployed
    assert "AwaitingConcurrencySlot" in state_names(server, held_id)
    for attempt in range(3):  # the held run is rescheduled a few seconds ahead; a worker pass picks it up when due
        if flow_run(server, held_id)["state"]["type"] == "COMPLETED":
            break
        worker_pass(server, tmp / f"worker{attempt + 2}.log")
    first, second = flow_run(server, first_id), flow_run(server, held_id)
    assert second["state"]["type"] == "COMPLETED", second["state"]
    assert datetime.fromisoformat(second["start_time"]) >= datetime.fromisoformat(first["end_time"])


def test_sweep_runs_its_points_as_deployment_runs(deployed):
    """`lensflow sweep --deployment`: each point is a run of the deployment, executed by the pool's worker, and
    its MLflow run is nested under the sweep's run."""
    server, tmp, *_ = deployed
    log = (tmp / "worker-sweep.log").open("w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=REPO, env=server.env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        sets = [a for o in tiny_params(tmp, 8)["overrides"] for a in ("--set", o)]
        cmd = [str(BIN / "lensflow"), "sweep", "extract", "--grid", "store.chunk_size=4,8", "--deployment", NIGHTLY,
               *sets]
        done = subprocess.run(cmd, cwd=REPO, env=server.env, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        kill_tree(worker.pid, signal.SIGTERM)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.flow = 'sweep'")
    points = client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(p.data.params["store.chunk_size"] for p in points) == ["4", "8"]
    nightly = next(d for d in server.post("/deployments/filter") if d["name"] == "lensflow-extract")
    for p in points:
        assert p.info.status == "FINISHED"
        assert flow_run(server, p.data.tags["prefect.flow_run_id"])["deployment_id"] == nightly["id"]
