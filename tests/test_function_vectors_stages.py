"""Function-vector stages on a tiny model, in-process (no Prefect, no Ray): what a rerun finds, what a changed
input recomputes, that a failed run keeps the ICL tasks it finished, that `layer=auto` reads only validation
pairs, and what a directed transfer computes; plus the experiment's decisions (top-k, layer, transfer list) on
hand-made inputs and the transfer config."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from local_pool import LocalPool

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.models import ModelInfo
from lensflow.tasks.core.stages import ModelId
from lensflow.tasks.function_vectors import evaluation as fv_evaluation
from lensflow.tasks.function_vectors import patching as fv_patching
from lensflow.tasks.function_vectors.choices import (
    FvPlan,
    choose_layer,
    default_top_k,
    plan,
    top_heads,
    transfer_jobs,
)
from lensflow.tasks.function_vectors.config import FunctionVectorsConf
from lensflow.tasks.function_vectors.evaluation import LayerCurve
from lensflow.tasks.function_vectors.icl import load_pairs, split
from lensflow.tasks.function_vectors.patching import (
    IclTaskJob,
    IclTaskPatching,
    IclTasks,
    Patchings,
    load_icl_tasks,
)
from lensflow.tasks.registry import load_config

SMALL = ["function_vectors.n_shots=3", "function_vectors.n_clean=2", "function_vectors.n_shuffled=1",
         "function_vectors.n_test=4", "function_vectors.n_valid=4", "function_vectors.demo_sets=2",
         "function_vectors.filter_correct=false", "function_vectors.layer_scan_stride=2"]




@pytest.fixture
def pool(tiny_lms):
    return LocalPool(tiny_lms["llama"])


@pytest.fixture
def calls(monkeypatch):
    """How often each stage's compute function really ran (counted outside the stage machinery)."""
    counts = {"patching": 0, "valid": 0, "eval": 0, "transfer": 0}
    for key, mod, name in [("patching", fv_patching, "compute_patching"), ("valid", fv_evaluation, "compute_validation"),
                           ("eval", fv_evaluation, "compute_eval"), ("transfer", fv_evaluation, "compute_transfer")]:
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
    patchings = fv_patching.patch_icl_tasks(conf, icl.swept, pool)
    heads = top_heads(patchings.only(icl.names).aie, p.top_k)
    curves = fv_evaluation.validation_layer_scans(conf, icl.selected, patchings, heads, p.candidate_layers, pool) \
        if p.layer is None else []
    choice = choose_layer(p, curves, pool.describe().n_layers)
    evals = fv_evaluation.evaluate_icl_tasks(conf, icl.selected, patchings, heads, choice.layer, p.scan_layers, pool)
    transfers = fv_evaluation.evaluate_transfers(conf, transfer_jobs(fc, icl, patchings, heads, choice.layer), pool)
    return patchings, heads, curves, choice, evals, transfers


def test_rerun_finds_everything_and_top_k_recomputes_only_evaluation(make_conf, pool, calls):
    conf = make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital]", "function_vectors.top_k=3",
                     "function_vectors.transfer=[antonym->antonym_french]")
    patchings, heads, curves, choice, evals, transfers = run_stages(conf, pool)
    assert calls == {"patching": 3, "valid": 2, "eval": 2, "transfer": 1}  # antonym_french: swept for the transfer
    assert patchings.computed == 3 and all(c.computed for c in curves) and all(e.computed for e in evals)
    # the heads come from the two evaluated ICL tasks only, not from the transfer-only one
    mean_ie = (patchings["antonym"].ie + patchings["country_capital"].ie) / 2
    assert heads == [divmod(int(i), mean_ie.shape[1]) for i in torch.argsort(mean_ie.flatten(), descending=True,
                                                                             stable=True)[:3]]

    again = run_stages(conf, pool)
    assert calls == {"patching": 3, "valid": 2, "eval": 2, "transfer": 1}  # nothing ran again
    assert again[0].computed == 0 and not any(e.computed for e in again[4]) and not again[5][0].computed
    # what the rerun read back from the store is what the first run computed
    for name in ("antonym", "country_capital"):
        torch.testing.assert_close(again[0][name].ie, patchings[name].ie, rtol=0, atol=0)
        torch.testing.assert_close(again[0][name].means, patchings[name].means, rtol=0, atol=0)
    assert again[1] == heads and again[3] == choice
    assert [e.acc for e in again[4]] == [e.acc for e in evals] and again[5][0].zero_shot == transfers[0].zero_shot
    torch.testing.assert_close(again[4][0].fv, evals[0].fv, rtol=0, atol=0)

    fewer = run_stages(make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital]",
                                 "function_vectors.top_k=2", "function_vectors.transfer=[antonym->antonym_french]"),
                       pool)
    assert calls == {"patching": 3, "valid": 4, "eval": 4, "transfer": 2}  # the patchings were found, the rest re-ran
    assert fewer[0].computed == 0 and fewer[1] == heads[:2]


def test_failed_run_keeps_finished_icl_tasks(make_conf, pool, monkeypatch):
    conf = make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital, synonym]",
                     "function_vectors.transfer=[]")
    jobs = load_icl_tasks(conf.function_vectors).selected
    real = fv_patching.compute_patching

    def dies_on_second(lm, job):
        if job.name == "country_capital":
            raise RuntimeError("killed")
        return real(lm, job)

    monkeypatch.setattr(fv_patching, "compute_patching", dies_on_second)
    with pytest.raises(RuntimeError):
        fv_patching.patch_icl_tasks(conf, jobs, pool)
    monkeypatch.setattr(fv_patching, "compute_patching", real)
    resumed = fv_patching.patch_icl_tasks(conf, jobs, pool)
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
    real = fv_evaluation.zero_shot_layer_scan

    def recording(lm, job, queries, fv, layers):
        seen.append((layers, list(queries)))
        return real(lm, job, queries, fv, layers)

    monkeypatch.setattr(fv_evaluation, "zero_shot_layer_scan", recording)
    base = [*SMALL, "function_vectors.icl_tasks=[mine, antonym]", "function_vectors.top_k=2",
            "function_vectors.transfer=[]", "function_vectors.layer=auto"]
    conf = make_conf(*base, f"function_vectors.icl_task_paths=[{a}]")
    _, _, curves, choice, evals, _ = run_stages(conf, pool)
    assert choice.how == "auto" and choice.layer in [0, 2]
    # the validation stage runs first, on each ICL task's validation pairs (filter_correct=false: all n_valid of
    # them), then the evaluation's patching on test pairs
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
                     "function_vectors.top_k=2", "function_vectors.transfer=[]")
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
    p = plan(FunctionVectorsConf(layer_scan_stride=3), _info(n_layers=10))
    assert (p.layer, p.scan_layers, p.candidate_layers) == (None, [0, 3, 6, 9], [0, 3, 6, 9])
    p = plan(FunctionVectorsConf(layer_scan_stride=0), _info(n_layers=3))
    assert (p.scan_layers, p.candidate_layers) == ([], [0, 1, 2])
    p = plan(FunctionVectorsConf(layer=4), _info(n_layers=4))
    assert (p.layer, p.candidate_layers) == (4, [])
    with pytest.raises(ConfigError, match="layer"):
        plan(FunctionVectorsConf(layer=5), _info(n_layers=4))


def test_choose_layer():
    auto = FvPlan(top_k=2, layer=None, scan_layers=[], candidate_layers=[0, 2, 4])
    curves = [LayerCurve("a", {0: 0.2, 2: 0.6, 4: 0.5}, 5, True), LayerCurve("b", {0: 0.4, 2: 0.2, 4: 0.5}, 5, True),
              LayerCurve("none kept", {}, 0, True)]
    c = choose_layer(auto, curves, n_layers=6)
    assert (c.layer, c.how) == (4, "auto") and c.curve == pytest.approx({0: 0.3, 2: 0.4, 4: 0.5})
    tie = [LayerCurve("a", {0: 0.1, 2: 0.7, 4: 0.7}, 5, True)]
    assert choose_layer(auto, tie, n_layers=6).layer == 2  # the earliest of equals
    fallback = choose_layer(auto, [LayerCurve("a", {}, 0, True)], n_layers=6)
    assert (fallback.layer, fallback.how) == (2, "auto-fallback") and all(math.isnan(v) for v in fallback.curve.values())
    fixed = FvPlan(top_k=2, layer=1, scan_layers=[], candidate_layers=[])
    assert (choose_layer(fixed, curves, n_layers=6).layer, choose_layer(fixed, curves, n_layers=6).how) == (1, "config")


def test_transfer_jobs():
    fc = FunctionVectorsConf(transfer=["src->t1", "t1->src"])
    sp = split([(str(i), str(i)) for i in range(8)], 0)
    means = torch.arange(2 * 2 * 3, dtype=torch.float32).view(2, 2, 3)
    patchings = Patchings([IclTaskPatching("src", "k1", means, torch.zeros(2, 2), False),
                     IclTaskPatching("t1", "k2", -means, torch.zeros(2, 2), False)])
    icl = IclTasks([IclTaskJob("src", sp, fc)], [IclTaskJob("t1", sp, fc)])
    jobs = transfer_jobs(fc, icl, patchings, [(1, 0), (0, 1)], layer=1)
    assert [(j.source, j.own.task.name, j.name) for j in jobs] == [("src", "t1", "src->t1"), ("t1", "src", "t1->src")]
    assert [(j.source_key, j.own.patching_key, j.own.layer) for j in jobs] == [("k1", "k2", 1), ("k2", "k1", 1)]
    torch.testing.assert_close(jobs[0].source_means, torch.stack([means[1, 0], means[0, 1]]))
    torch.testing.assert_close(jobs[0].own.head_means, -torch.stack([means[1, 0], means[0, 1]]))
    assert transfer_jobs(FunctionVectorsConf(transfer=[]), icl, patchings, [(0, 0)], 1) == []


def test_transfer_config():
    fc = load_config(None, ["function_vectors.transfer=[a -> b, b->a, a->b]"]).function_vectors
    assert fc.transfer == ["a->b", "b->a"] and fc.transfer_pairs() == [("a", "b"), ("b", "a")]
    assert FunctionVectorsConf().transfer_pairs()[0][::-1] == FunctionVectorsConf().transfer_pairs()[1]
    for bad in ["a", "a->", "->b", "a->b->c", "a->a", "a-b", "a>b"]:
        with pytest.raises(ConfigError, match=r"^config key 'function_vectors.transfer': expected") as err:
            load_config(None, [f"function_vectors.transfer=[{bad}]"])
        assert "\n" not in str(err.value)
    # an ICL task no file holds fails where the flow (and the preflight) loads the ICL tasks, before any work
    with pytest.raises(ConfigError, match=r"'function_vectors.transfer': unknown ICL task 'nope'"):
        load_icl_tasks(FunctionVectorsConf(icl_tasks=["antonym"], transfer=["antonym->nope"]))
    icl = load_icl_tasks(FunctionVectorsConf(icl_tasks=["antonym", "synonym"],
                                             transfer=["antonym_french->antonym", "synonym->antonym_spanish"]))
    assert icl.names == ["antonym", "synonym"] and [j.name for j in icl.transfer_only] == ["antonym_french",
                                                                                           "antonym_spanish"]
    assert icl["antonym_spanish"].split == split(load_pairs("antonym_spanish"), 0)


def _manual_logits(lm, queries: list, fv: torch.Tensor | None, layer: int) -> torch.Tensor:
    """Plain HF forwards of "Q: x\nA: " (the byte-level tokenizer's answers start with the space byte, which ends
    the scored prompt), fv added to resid `layer` (the input of block `layer`) at the last token."""

    def pre(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        h[0, -1] += fv
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = lm.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True) if fv is not None else None
    try:
        with torch.no_grad():
            return torch.stack([lm.model(input_ids=lm.tokenizer(f"Q: {x}\nA: ", return_tensors="pt")["input_ids"])
                                .logits[0, -1] for x, _ in queries])
    finally:
        if handle:
            handle.remove()


def test_transfer_against_evaluation_and_plain_forwards(make_conf, pool, calls, monkeypatch):
    """Source -> target: the target's n-shot and no-vector accuracies and its own vector's are the evaluation's
    numbers for that ICL task; the logits the transfer scores are plain forwards with the source's (and the
    target's) vector added by a torch hook."""
    seen: list[torch.Tensor] = []
    real = fv_evaluation.last_token_logits
    monkeypatch.setattr(fv_evaluation, "last_token_logits", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    conf = make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital]", "function_vectors.top_k=3",
                     "function_vectors.layer=2", "function_vectors.scale=8", "function_vectors.n_test=6",
                     "function_vectors.transfer=[antonym->country_capital]")
    patchings, heads, _, choice, evals, transfers = run_stages(conf, pool)
    (t,), target = transfers, next(e for e in evals if e.name == "country_capital")
    assert (t.source, t.target, t.n_eval, t.metric_name) == ("antonym", "country_capital", 6,
                                                               "antonym__to__country_capital")
    assert (t.icl, t.zero_shot, t.zero_shot_own_fv) == (target.acc.icl, target.acc.zero_shot, target.acc.zero_shot_fv)
    # the transfer's last two scoring passes: [plain; + own vector] and [+ source vector] on the 6 kept test queries
    # (filter_correct=false keeps them all)
    queries = split(load_pairs("country_capital"), 0).test[:6]
    fv = sum(pool.lm.head_output_to_resid(layer, head, patchings["antonym"].means[layer, head]) for layer, head in heads)
    plain, own, source = (_manual_logits(pool.lm, queries, v, layer=2) for v in (None, target.fv, 8 * fv))
    assert (source - plain).abs().max() > 1e-3 and (own - plain).abs().max() > 1e-3  # the vectors matter
    torch.testing.assert_close(seen[-2], torch.cat([plain, own]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen[-1], source, atol=1e-4, rtol=1e-4)
    answers = [pool.lm.tokenizer(y[0], add_special_tokens=False)["input_ids"][0] for _, y in queries]  # 1st byte
    assert t.zero_shot_fv == pytest.approx((source.argmax(-1) == torch.tensor(answers)).float().mean().item())

    # the reverse direction is a new item; the first one is found, not recomputed
    more = make_conf(*SMALL, "function_vectors.icl_tasks=[antonym, country_capital]", "function_vectors.top_k=3",
                     "function_vectors.layer=2", "function_vectors.scale=8", "function_vectors.n_test=6",
                     "function_vectors.transfer=[antonym->country_capital, country_capital->antonym]")
    n = calls["transfer"]
    again = run_stages(more, pool)[5]
    assert calls["transfer"] == n + 1 and [r.computed for r in again] == [False, True]
    assert again[0] == replace(t, computed=False)
