"""Function-vector stages on a tiny model, in-process (no Prefect, no Ray): what a rerun finds, what a changed
input recomputes, that a failed run keeps the ICL tasks it finished, and that `layer=auto` reads only validation
pairs; plus the experiment's decisions (top-k, layer, transfer list) on hand-made inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lensflow.tasks import fv_eval, fv_sweep
from lensflow.tasks.config import ConfigError, FunctionVectorsConf
from lensflow.tasks.fv_choices import FvPlan, choose_layer, default_top_k, plan, top_heads, transfer_jobs
from lensflow.tasks.fv_eval import LayerCurve
from lensflow.tasks.fv_sweep import IclTaskJob, IclTaskSweep, Sweeps, load_icl_tasks
from lensflow.tasks.icl import load_pairs, split
from lensflow.tasks.models import ModelInfo, describe
from lensflow.tasks.stages import ModelId

SMALL = ["function_vectors.n_shots=3", "function_vectors.n_clean=2", "function_vectors.n_shuffled=1",
         "function_vectors.n_test=4", "function_vectors.n_valid=4", "function_vectors.demo_sets=2",
         "function_vectors.filter_correct=false", "function_vectors.layer_sweep_stride=2"]


class LocalPool:
    """ModelPool's interface, run in this process on one model."""

    def __init__(self, lm):
        self.lm = lm

    def describe(self) -> ModelInfo:
        return describe(self.lm)

    def map(self, fn, items, desc=""):
        return [fn(self.lm, item) for item in items]


@pytest.fixture
def pool(tiny_lms):
    return LocalPool(tiny_lms["llama"])


@pytest.fixture
def calls(monkeypatch):
    """How often each stage's compute function really ran (counted outside the stage machinery)."""
    counts = {"sweep": 0, "valid": 0, "eval": 0, "transfer": 0}
    for key, mod, name in [("sweep", fv_sweep, "compute_sweep"), ("valid", fv_eval, "compute_validation"),
                           ("eval", fv_eval, "compute_eval"), ("transfer", fv_eval, "compute_transfer")]:
        real = getattr(mod, name)

        def counted(lm, job, real=real, key=key):
            counts[key] += 1
            return real(lm, job)

        monkeypatch.setattr(mod, name, counted)
    return counts


def run_stages(conf, pool):
    """The flow's stage sequence, without Prefect or Ray."""
    fc = conf.function_vectors
    icl = load_icl_tasks(fc)
    p = plan(fc, pool.describe())
    sweeps = fv_sweep.sweep_icl_tasks(conf, icl.selected, pool)
    heads = top_heads(sweeps.aie, p.top_k)
    curves = fv_eval.validation_layer_sweeps(conf, icl.selected, sweeps, heads, p.candidate_layers, pool) \
        if p.layer is None else []
    choice = choose_layer(p, curves, pool.describe().n_layers)
    evals = fv_eval.evaluate_icl_tasks(conf, icl.selected, sweeps, heads, choice.layer, p.sweep_layers, pool)
    transfers = fv_eval.evaluate_transfers(conf, transfer_jobs(fc, icl.targets, sweeps, heads, choice.layer), pool)
    return sweeps, heads, curves, choice, evals, transfers


def test_rerun_finds_everything_and_top_k_recomputes_only_evaluation(make_conf, pool, calls):
    conf = make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital]", "function_vectors.top_k=3",
                     "function_vectors.transfer_targets=[antonym_french]")
    sweeps, heads, curves, choice, evals, transfers = run_stages(conf, pool)
    assert calls == {"sweep": 2, "valid": 2, "eval": 2, "transfer": 1}
    assert sweeps.computed == 2 and all(c.computed for c in curves) and all(e.computed for e in evals)

    again = run_stages(conf, pool)
    assert calls == {"sweep": 2, "valid": 2, "eval": 2, "transfer": 1}  # nothing ran again
    assert again[0].computed == 0 and not any(e.computed for e in again[4]) and not again[5][0].computed
    # what the rerun read back from the store is what the first run computed
    for name in ("antonym", "country_capital"):
        torch.testing.assert_close(again[0][name].ie, sweeps[name].ie, rtol=0, atol=0)
        torch.testing.assert_close(again[0][name].means, sweeps[name].means, rtol=0, atol=0)
    assert again[1] == heads and again[3] == choice
    assert [e.acc for e in again[4]] == [e.acc for e in evals] and again[5][0].zero_shot == transfers[0].zero_shot
    torch.testing.assert_close(again[4][0].fv, evals[0].fv, rtol=0, atol=0)

    fewer = run_stages(make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital]",
                                 "function_vectors.top_k=2", "function_vectors.transfer_targets=[antonym_french]"), pool)
    assert calls == {"sweep": 2, "valid": 4, "eval": 4, "transfer": 2}  # the sweeps were found, the rest re-ran
    assert fewer[0].computed == 0 and fewer[1] == heads[:2]


def test_failed_run_keeps_finished_icl_tasks(make_conf, pool, monkeypatch):
    conf = make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital, synonym]")
    jobs = load_icl_tasks(conf.function_vectors).selected
    real = fv_sweep.compute_sweep

    def dies_on_second(lm, job):
        if job.name == "country_capital":
            raise RuntimeError("killed")
        return real(lm, job)

    monkeypatch.setattr(fv_sweep, "compute_sweep", dies_on_second)
    with pytest.raises(RuntimeError):
        fv_sweep.sweep_icl_tasks(conf, jobs, pool)
    monkeypatch.setattr(fv_sweep, "compute_sweep", real)
    resumed = fv_sweep.sweep_icl_tasks(conf, jobs, pool)
    assert [t.computed for t in resumed.icl_tasks] == [False, True, True]


def _task_files(tmp_path, n=40):
    """An ICL task 'mine' twice: the second copy has different test pairs, the same train and valid pairs."""
    pairs = [(f"in{i}", f"out{i}") for i in range(n)]
    sp = split(pairs, seed=0)
    changed = [(f"new{i}", f"other{i}") if p in sp.test else p for i, p in enumerate(pairs)]
    folders = []
    for name, rows in [("a", pairs), ("b", changed)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.json").write_text(json.dumps([{"input": x, "output": y} for x, y in rows]))
        folders.append(str(tmp_path / name))
    new = split(changed, seed=0)
    assert new.train == sp.train and new.valid == sp.valid and not set(new.test) & set(sp.test)
    return folders, sp


def test_auto_layer_reads_only_validation_pairs(make_conf, pool, calls, monkeypatch, tmp_path):
    (a, b), sp = _task_files(tmp_path)
    seen: list[tuple[str, list]] = []
    real = fv_eval.zero_shot_layer_sweep

    def recording(lm, job, queries, fv, layers):
        seen.append((layers, list(queries)))
        return real(lm, job, queries, fv, layers)

    monkeypatch.setattr(fv_eval, "zero_shot_layer_sweep", recording)
    base = [*SMALL, "function_vectors.icl_tasks=[mine, antonym]", "function_vectors.top_k=2",
            "function_vectors.transfer_source=null", "function_vectors.layer=auto"]
    conf = make_conf(*base, f"function_vectors.icl_task_paths=[{a}]")
    _, _, curves, choice, evals, _ = run_stages(conf, pool)
    assert choice.how == "auto" and choice.layer in [0, 2]
    # the validation stage runs first, on each ICL task's validation pairs (filter_correct=false: all n_valid of
    # them), then the evaluation's sweep on test pairs
    assert seen[0] == ([0, 2], sp.valid[:4]) and seen[1] == ([0, 2], split(load_pairs("antonym"), 0).valid[:4])
    assert not set(seen[0][1]) & set(sp.test) and not set(seen[0][1]) & set(sp.train)
    assert seen[2] == ([0, 2], sp.test[:4])
    # the choice is the best mean over ICL tasks of the per-layer validation accuracies
    mean = {layer: np.mean([c.acc[layer] for c in curves]) for layer in (0, 2)}
    assert choice.layer == min(layer for layer in mean if mean[layer] == max(mean.values()))

    # other test pairs and another n_test: the validation stage is found, the evaluation is not
    changed = make_conf(*base, f"function_vectors.icl_task_paths=[{b}]", "function_vectors.n_test=3")
    n_valid, n_eval = calls["valid"], calls["eval"]
    _, _, curves2, choice2, evals2, _ = run_stages(changed, pool)
    assert choice2 == choice and [c.acc for c in curves2] == [c.acc for c in curves]
    assert calls["valid"] == n_valid and not any(c.computed for c in curves2)
    assert calls["eval"] == n_eval + 2 and evals2[0].acc.n_eval == 3


def test_explicit_layer_skips_validation(make_conf, pool, calls):
    conf = make_conf(*SMALL, "function_vectors.icl_tasks=[antonym]", "function_vectors.layer=3",
                     "function_vectors.top_k=2", "function_vectors.transfer_source=null")
    _, _, curves, choice, _, _ = run_stages(conf, pool)
    assert (choice.layer, choice.how, curves, calls["valid"]) == (3, "config", [], 0)


# ---------------------------------------------------------------- decisions on hand-made inputs


def _info(n_layers=4, n_heads=4) -> ModelInfo:
    return ModelInfo(ModelId("m", None, "float32", "w", "t"), n_layers, 16, n_heads, 4, 10)


def test_top_k_default_and_heads():
    assert default_top_k(28, 16) == 10 and default_top_k(4, 4) == 4 and default_top_k(1, 2) == 1
    assert top_heads(np.array([[0.1, 0.5], [0.9, -1.0]]), 2) == [(1, 0), (0, 1)]
    assert plan(FunctionVectorsConf(), _info()).top_k == 4
    assert plan(FunctionVectorsConf(top_k=16), _info()).top_k == 16
    with pytest.raises(ConfigError, match="top_k"):
        plan(FunctionVectorsConf(top_k=17), _info())


def test_plan_layers():
    p = plan(FunctionVectorsConf(layer_sweep_stride=3), _info(n_layers=10))
    assert (p.layer, p.sweep_layers, p.candidate_layers) == (None, [0, 3, 6, 9], [0, 3, 6, 9])
    p = plan(FunctionVectorsConf(layer_sweep_stride=0), _info(n_layers=3))
    assert (p.sweep_layers, p.candidate_layers) == ([], [0, 1, 2])
    p = plan(FunctionVectorsConf(layer=4), _info(n_layers=4))
    assert (p.layer, p.candidate_layers) == (4, [])
    with pytest.raises(ConfigError, match="layer"):
        plan(FunctionVectorsConf(layer=5), _info(n_layers=4))


def test_choose_layer():
    auto = FvPlan(top_k=2, layer=None, sweep_layers=[], candidate_layers=[0, 2, 4])
    curves = [LayerCurve("a", {0: 0.2, 2: 0.6, 4: 0.5}, 5, True), LayerCurve("b", {0: 0.4, 2: 0.2, 4: 0.5}, 5, True),
              LayerCurve("none kept", {}, 0, True)]
    c = choose_layer(auto, curves, n_layers=6)
    assert (c.layer, c.how) == (4, "auto") and c.curve == pytest.approx({0: 0.3, 2: 0.4, 4: 0.5})
    tie = [LayerCurve("a", {0: 0.1, 2: 0.7, 4: 0.7}, 5, True)]
    assert choose_layer(auto, tie, n_layers=6).layer == 2  # the earliest of equals
    fallback = choose_layer(auto, [LayerCurve("a", {}, 0, True)], n_layers=6)
    assert (fallback.layer, fallback.how) == (2, "auto-fallback") and all(math.isnan(v) for v in fallback.curve.values())
    fixed = FvPlan(top_k=2, layer=1, sweep_layers=[], candidate_layers=[])
    assert (choose_layer(fixed, curves, n_layers=6).layer, choose_layer(fixed, curves, n_layers=6).how) == (1, "config")


def test_transfer_jobs():
    fc = FunctionVectorsConf(transfer_source="src")
    sp = split([(str(i), str(i)) for i in range(8)], 0)
    means = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    sweeps = Sweeps([IclTaskSweep("src", "k1", means, torch.zeros(2, 2), False)])
    targets = [IclTaskJob("t1", sp, fc), IclTaskJob("t2", sp, fc)]
    jobs = transfer_jobs(fc, targets, sweeps, [(1, 0), (0, 1)], layer=1)
    assert [j.task.name for j in jobs] == ["t1", "t2"] and all(j.sweep_key == "k1" and j.layer == 1 for j in jobs)
    torch.testing.assert_close(jobs[0].head_means, torch.stack([means[1, 0], means[0, 1]]))
    assert transfer_jobs(FunctionVectorsConf(transfer_source="other"), targets, sweeps, [(0, 0)], 1) == []
    assert transfer_jobs(FunctionVectorsConf(transfer_source=None), targets, sweeps, [(0, 0)], 1) == []
