"""The lens stages: the split and the store variant they train on, stage keys that move with exactly their inputs,
the per-layer summary, and a logit-lens run killed (SIGKILL) mid-training that resumes per layer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.stages import Stage
from lensflow.tasks.lenses.report import summarize
from lensflow.tasks.lenses.tuned_lens import (
    TRAINING_KEYS,
    LayerLenses,
    lens_config,
    lens_stages,
    split,
)


def test_split_holds_out_the_last_prompts():
    s = split(12, 0.25)
    assert (s.train, s.heldout) == (range(0, 9), range(9, 12))
    assert s.params() == {"train": [0, 9], "heldout": [9, 12]} and str(s) == "train prompts 0-8, held-out 9-11"
    assert (split(10, 0.01).heldout, split(2, 0.9).train) == (range(9, 10), range(0, 1))  # at least one each
    with pytest.raises(ConfigError, match="lenses.max_prompts"):
        split(1, 0.2)


def test_lens_config_keeps_every_layer_at_every_position(make_conf):
    conf = lens_config(make_conf("lenses.max_prompts=7", "store.layers=[1]", "store.positions=last"))
    assert (conf.store.positions, conf.store.layers, conf.store.sites) == ("all", None, ["resid"])
    assert conf.data.max_prompts == 7 and conf.store.chunk_size == 8  # the rest as configured
    assert lens_config(make_conf("lenses.max_prompts=null")).data.max_prompts == 24  # None: data.max_prompts


def test_stage_keys_move_with_exactly_their_inputs(make_conf):
    base_conf = make_conf()
    rows = split(12, 0.25)
    base = lens_stages(base_conf, "store-a", rows)

    def keys(stages) -> tuple[str, str, str]:
        return stages.targets.key, stages.translators.key, stages.evaluations.key

    new = {"lr": 0.5, "epochs": 9, "batch_tokens": 7, "weight_decay": 0.1, "compute_dtype": "float32", "seed": 3}
    assert sorted(new) == sorted(TRAINING_KEYS)
    for k, v in new.items():  # training settings: translators and their evaluation, not the targets
        t, tr, ev = keys(lens_stages(make_conf(f"lenses.{k}={v}"), "store-a", rows))
        assert t == base.targets.key and tr != base.translators.key and ev != base.evaluations.key, k
    t, tr, ev = keys(lens_stages(base_conf, "store-a", split(12, 0.5)))  # another split
    assert t == base.targets.key and tr != base.translators.key and ev != base.evaluations.key
    assert len(set(keys(lens_stages(base_conf, "store-b", rows))) & set(keys(base))) == 0  # another store: all move
    for other in ("lenses.gpus_per_task=1", "lenses.grid_prompt=x", f"store.root={base_conf.store.root}/elsewhere"):
        assert keys(lens_stages(make_conf(other), "store-a", rows)) == keys(base), other  # where, not what


def test_summary_counts_layers_where_the_tuned_lens_wins():
    kl = {0: (5.0, 2.0), 1: (1.0, 1.5), 2: (3.0, 0.5), 3: (0.0, 0.0)}  # layer: (logit, tuned); 3 is the last
    layers = [LayerLenses(l, {}, False, False, {"kl_to_final": a, "top1_agree": 0.1 * l},
                          {"kl_to_final": b, "top1_agree": 0.2 * l}, 10, 0.0, 0.0) for l, (a, b) in kl.items()]
    s = summarize(layers)
    assert (s.better_layers, s.inner_layers, s.tuned_beats_logit_below_last) == (2, 3, False)
    assert s.means["logit_lens.kl_to_final_mean"] == pytest.approx(9.0 / 4)
    assert s.means["tuned_lens.top1_agree_mean"] == pytest.approx(0.2 * 6 / 4)
    assert s.per_layer["tuned_lens.kl_to_final"] == {0: 2.0, 1: 1.5, 2: 0.5, 3: 0.0}
    assert s.table().splitlines()[3] == "| 1 | 1.000 | 1.500 | 0.100 | 0.200 |"


# ---- a real kill mid-training ----

N_LAYERS = 8  # two per-layer remote functions run at once on 2 CPUs: a kill after the first wave leaves work


def _model_dir(path: Path) -> str:
    """A tiny random Llama with more layers than tiny-llama, so the kill can land between waves of layers."""
    from transformers import AutoModelForCausalLM

    from lensflow.tasks.core.models import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.num_hidden_layers = N_LAYERS
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _session_alive(sid: int) -> bool:
    """Whether any live process of session `sid` remains (the killed run's Ray processes included)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                return True
    return False


def _items(root: Path, stage: str) -> dict[str, Path]:
    return {p.stem: p for p in Path(root, stage).glob("*/layer_*.safetensors")}


def test_killed_run_trains_only_unfinished_layers(ray_session, prefect_harness, tmp_path, tracking_uri):
    import prefect.settings

    from lensflow.flows.logit_lens import logit_lens_flow

    sets = [f"model.name={_model_dir(tmp_path / 'model')}", f"tracking.uri={tracking_uri}", "ray.actors=1",
            "data.max_tokens=16", "store.chunk_size=4", "lenses.max_prompts=16", "lenses.heldout=0.25",
            "lenses.epochs=100", "lenses.batch_tokens=32", "lenses.lr=3e-3"]
    root = tmp_path / "store"
    cmd = [sys.executable, "-m", "lensflow.flows.cli", "run", "logit-lens",
           *[a for s in [*sets, f"store.root={root}"] for a in ("--set", s)]]
    # the session's Prefect server: the subprocesses skip starting their own
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _items(root, "lenses/translators"):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while _session_alive(proc.pid) and time.time() < deadline:  # a worker may publish the layer it holds
        time.sleep(0.2)
    assert not _session_alive(proc.pid)
    finished = {name: p.stat().st_mtime_ns for name, p in _items(root, "lenses/translators").items()}
    assert 1 <= len(finished) < N_LAYERS, finished

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    resumed = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))  # the CLI's summary
    assert resumed["trained_layers"] == N_LAYERS - len(finished)
    assert {name: p.stat().st_mtime_ns for name, p in _items(root, "lenses/translators").items() if name in finished} \
        == finished  # published layers were found, not rewritten
    assert len(_items(root, "lenses/translators")) == N_LAYERS

    clean = logit_lens_flow(config="conf/default.yaml", overrides=[*sets, f"store.root={tmp_path / 'clean'}"])
    assert clean["trained_layers"] == N_LAYERS
    assert {k: {int(l): v for l, v in s.items()} for k, s in resumed["per_layer"].items()} == clean["per_layer"]
    for stage in ("lenses/translators", "lenses/evaluations"):
        got, want = _items(root, stage), _items(tmp_path / "clean", stage)
        assert got.keys() == want.keys() and all(p.parent.name == want[n].parent.name for n, p in got.items())
        for name in got:
            a, b = (Stage(str(p.parents[stage.count("/") + 2]), stage, p.parent.name).load(name) for p in (got[name], want[name]))
            assert a.meta.keys() == b.meta.keys()
            assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors), (stage, name)
            for k in ("logit", "tuned", "losses"):
                assert a.meta.get(k) == b.meta.get(k), (stage, name, k)
