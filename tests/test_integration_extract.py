"""SmolLM2 end to end: store parity with a plain forward pass, and a run killed halfway then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from lensflow.tasks.core import extraction, store
from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.prompts import builtin_texts

pytestmark = pytest.mark.integration


def test_smollm2_store_matches_plain_forward(ray_session, make_conf, smollm2):
    conf = make_conf("data.max_tokens=32", "data.max_prompts=12", model="smollm2-135m")
    texts = builtin_texts(12)
    with ModelPool(conf) as pool:
        url = extraction.extract(conf, texts, pool).url
    acts = store.Activations(url)
    assert acts.resid.shape == (12, 31, 576) and acts.attrs["model"] == "smollm2-135m"
    lm = smollm2
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=32)["input_ids"]
        with torch.no_grad():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        ref = torch.stack([h[0, -1] for h in hs[:-1]]).numpy()  # layers 0..29: identical definitions
        assert np.abs(acts.resid[i, :30] - ref).max() <= 1e-4
        # layer 30 is stored before the final norm; HF's last entry is after it
        normed = lm.final_norm(torch.from_numpy(acts.resid[i, 30]))
        assert (normed - hs[-1][0, -1]).abs().max() <= 1e-4


def test_killed_run_resumes_without_recomputing(ray_session, make_conf, tmp_path):
    args = ["data.max_prompts=96", "store.chunk_size=8", "data.max_tokens=48", f"store.root={tmp_path / 'store'}"]
    conf = make_conf(*args, model="smollm2-135m")
    cmd = [sys.executable, "-m", "lensflow.flows.cli", "run", "extract", "--set", "model.name=smollm2-135m",
           "--set", f"tracking.uri={conf.tracking.uri}", "--set", "ray.actors=1"]
    for a in args:
        cmd += ["--set", a]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    done_at_kill, deadline = 0, time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        groups = list(Path(conf.store.root, "activations").glob("*"))
        if groups:
            try:
                done_at_kill = int(zarr.open_group(str(groups[0]), mode="r")["done"][:].sum())
            except (KeyError, FileNotFoundError):
                done_at_kill = 0
            if done_at_kill >= 4:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    url = str(groups[0])
    # the actor may finish the chunk it holds before Ray reaps it (its owner is gone): wait until writes stop
    settled, last = 0, -1
    while settled < 3:
        now = int(zarr.open_group(url, mode="r")["done"][:].sum())
        settled, last = (settled + 1, now) if now == last else (0, now)
        time.sleep(1.0)
    g = zarr.open_group(url, mode="r")
    assert g.attrs["complete"] is False
    finished = {c for c in range(12) if g["done"][c]}
    assert 4 <= done_at_kill <= len(finished) < 12, (done_at_kill, finished)
    before = {p: p.stat().st_mtime_ns for p in Path(url, "resid", "c").rglob("*") if p.is_file()}

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["chunks_resumed"] == len(finished) and summary["chunks_computed"] == 12 - len(finished)
    for p, t in before.items():
        if int(p.parts[-3]) in finished:
            assert p.stat().st_mtime_ns == t, f"finished chunk {p} was rewritten"

    # a clean run of the same config in a fresh store gives the same arrays
    clean_conf = make_conf(*args[:-1], f"store.root={tmp_path / 'clean'}", model="smollm2-135m")
    with ModelPool(clean_conf) as pool:
        clean_url = extraction.extract(clean_conf, builtin_texts(96), pool).url
    resumed, clean = zarr.open_group(url, mode="r"), zarr.open_group(clean_url, mode="r")
    assert resumed.attrs["complete"] is True
    for k in ("resid", "token_ids", "lengths", "done"):
        assert np.array_equal(resumed[k][:], clean[k][:]), k


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_within_seconds_and_the_rerun_resumes(make_conf, tmp_path, sig):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM (to the process, as `kill` and
    Kubernetes send it) mid-extraction: exit 130 / 143 within seconds, one line saying so, the MLflow run KILLED,
    the chunks already published kept, and the same command resumes from them."""
    from mlflow.tracking import MlflowClient

    from lensflow.tasks.core.tracking import local_uri

    args = ["data.max_prompts=96", "store.chunk_size=8", "data.max_tokens=48", f"store.root={tmp_path / 'store'}"]
    conf = make_conf(*args, model="smollm2-135m")
    cmd = [sys.executable, "-m", "lensflow.flows.cli", "run", "extract", "--set", "model.name=smollm2-135m",
           "--set", f"tracking.uri={conf.tracking.uri}", "--set", "ray.actors=1",
           "--set", f"tracking.experiment=stop-{sig.name}", *[x for a in args for x in ("--set", a)]]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    done = 0
    while proc.poll() is None and done < 2:
        groups = list(Path(conf.store.root, "activations").glob("*"))
        try:
            done = int(zarr.open_group(str(groups[0]), mode="r")["done"][:].sum()) if groups else 0
        except (KeyError, FileNotFoundError):
            done = 0
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    t0 = time.monotonic()
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    stopped_s = time.monotonic() - t0
    print(f"{sig.name}: exit {proc.returncode} after {stopped_s:.1f} s")
    assert proc.returncode == 128 + sig, err[-3000:]
    assert stopped_s < 10, f"{sig.name} took {stopped_s:.1f} s to stop the run"
    assert [l for l in err.splitlines() if l.startswith("lensflow: stopped by")] != []
    client = MlflowClient(local_uri(conf.tracking.uri))
    (run,) = client.search_runs([client.get_experiment_by_name(f"stop-{sig.name}").experiment_id])
    assert run.info.status == "KILLED"

    url = str(groups[0])
    finished = int(zarr.open_group(url, mode="r")["done"][:].sum())
    assert 2 <= finished < 12 and zarr.open_group(url, mode="r").attrs["complete"] is False
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["chunks_resumed"] == finished and summary["chunks_computed"] == 12 - finished
