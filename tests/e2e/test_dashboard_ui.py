"""`make e2e`: a sweep of a tiny-model flow logged to a real `mlflow server` on 127.0.0.1, then its pages rendered by
headless Chromium. Asserted from the rendered DOM: the experiment opens in the training view, the sweep's point
runs are grouped under the sweep's run, and a point's page shows the headline per-layer section first, its
per-layer charts and the figures as image charts. Screenshots go to $LENSFLOW_E2E_SHOTS (default: the test's
temporary folder); the README's are these."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import MlflowServer
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, out: Path, drawn, height: int = 1100) -> str:
    """The page's DOM once `drawn(dom)` holds (charts load over HTTP: a busy machine needs more virtual time, so
    the budget doubles up to 4 tries), and a screenshot taken with the same budget."""
    assert CHROMIUM, "chromium is not installed: `make e2e` installs it (apt-get install chromium)"
    for budget_ms in (30000, 60000, 120000, 240000):
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size=1500,{height}",
                f"--virtual-time-budget={budget_ms}"]
        dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=600).stdout
        if drawn(dom):
            break
    subprocess.run([*args, f"--screenshot={out}", url], capture_output=True, timeout=600)
    return dom


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    server = MlflowServer(tmp)
    server.start()
    try:
        sets = ["model.name=tiny-llama", f"store.root={tmp / 'store'}", f"tracking.uri={server.url}",
                "tracking.experiment=e2e", "ray.actors=1", "data.max_prompts=12", "data.max_tokens=16",
                "store.chunk_size=8", "lenses.max_prompts=12", "lenses.epochs=1"]
        cmd = [sys.executable, "-m", "lensflow.flows.cli", "sweep", "logit-lens", "--grid", "lenses.lr=0.001,0.003",
               *[a for s in sets for a in ("--set", s)]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        shots = Path(os.environ.get("LENSFLOW_E2E_SHOTS", tmp))
        shots.mkdir(parents=True, exist_ok=True)
        yield server, MlflowClient(server.url), shots
    finally:
        server.stop()


def test_experiment_opens_in_the_training_view_with_points_under_the_sweep(sweep):
    server, client, shots = sweep
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], "")
    (parent,) = [r for r in runs if r.data.tags.get("flow") == "sweep"]
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(points) == 2
    dom = render(f"{server.url}/#/experiments/{exp.experiment_id}/runs?compareRunsMode=CHART",
                 shots / "dashboard_experiment.png", lambda d: "matching runs" in d and 'class="main-svg"' in d)
    assert "Training runs" in dom  # not the GenAI view ("Evaluation runs", traces, judges)
    assert parent.info.run_name in dom
    assert not any(p.info.run_name in dom for p in points)  # collapsed under the sweep's row
    assert re.search(rf">\s*{len(runs)}\s*</?[^>]*>?\s*matching runs|{len(runs)} matching runs", dom)
    sections = re.findall(r">([a-z_.]+)</[^>]+>\s*(?:<[^>]+>\s*)*\((\d+)\)", dom)
    assert ("sweep", "3") in sections, sections  # the sweep run's own metrics: best value and point counts


def test_point_page_shows_headline_curves_first_and_image_charts(sweep):
    server, client, shots = sweep
    exp = client.get_experiment_by_name("e2e")
    point = client.search_runs([exp.experiment_id], "tags.flow = 'logit-lens'")[0]
    dom = render(f"{server.url}/#/experiments/{exp.experiment_id}/runs/{point.info.run_id}/model-metrics",
                 shots / "dashboard_run.png", lambda d: "rc-image-img" in d and 'class="main-svg"' in d, height=9000)
    sections = [name for name, _ in re.findall(r">([a-z_.]+)</[^>]+>\s*(?:<[^>]+>\s*)*\((\d+)\)", dom)]
    assert sections[0] == "lenses" and "lenses.summary" in sections and sections.index("run") > 0, sections
    assert "lenses/tuned_lens.kl_to_final" in dom and dom.count('class="main-svg"') > 0  # a drawn per-layer chart
    images = set(re.findall(r'class="rc-image-img" src="get-artifact\?path=images%2F([a-z_]+)%2B', dom))
    assert {"kl_to_final", "tuned_lens"} <= images, images
