"""LRE: the batched Jacobian against torch.autograd's per-dimension one on an independent forward (plain torch
hooks, no lensflow), the LRE's first-order claim, the low-rank inverse, choices blind to test subjects, relation
files (shipped and bad), and the flow end to end on a tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from loopback import cli
from mlflow.tracking import MlflowClient

from lensflow.tasks.core.config import ConfigError, ModelConf
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.core.models import load_model
from lensflow.tasks.relations import lre
from lensflow.tasks.relations.data import KINDS, Relation, Sample, Split, load_relations, select_relations, split
from lensflow.tasks.relations.jacobian import encode_prompt, jacobian
from lensflow.tasks.relations.lre import Settings, demos, evaluate, fit_layers, low_rank_pinv

SAMPLES = [Sample(s, o) for s, o in [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
                                      ("rich", "poor"), ("old", "new"), ("wet", "dry"), ("loud", "quiet"),
                                      ("light", "dark"), ("hard", "soft"), ("early", "late"), ("long", "short")]]
REL = Relation("antonym", "linguistic", "The opposite of {} is", tuple(SAMPLES), "test")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _plain_F(lm, ids: list[int], pos: int, layer: int):
    """F(h) by a plain HF forward of the whole prompt: a torch hook puts h at (resid layer, pos), another reads the
    last block's output at the last token (before the final norm)."""
    blocks = lm.blocks
    out = {}

    def f(h: torch.Tensor) -> torch.Tensor:
        def put(module, args, output):
            hs = output[0] if isinstance(output, tuple) else output
            hs = hs.clone()
            hs[0, pos] = h
            return (hs, *output[1:]) if isinstance(output, tuple) else hs

        def get(module, args, output):
            out["z"] = (output[0] if isinstance(output, tuple) else output)[0, -1]

        handles = [blocks[layer - 1].register_forward_hook(put), blocks[-1].register_forward_hook(get)]
        try:
            lm.model(input_ids=torch.tensor([ids]))
        finally:
            for hd in handles:
                hd.remove()
        return out["z"]

    return f


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_jacobian_equals_autograd(tiny_lms, family):
    lm = tiny_lms[family]
    prompt = encode_prompt(lm.tokenizer, demos(REL, SAMPLES[1:3]), REL.template, SAMPLES[0].subject)
    layer = 2
    f = _plain_F(lm, list(prompt.ids), prompt.subject_last, layer)
    lin = jacobian(lm, prompt, layer)  # one batched backward of d cotangents
    with torch.no_grad():
        hs = lm.model(input_ids=torch.tensor([prompt.ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(lin.s, hs[layer][0, prompt.subject_last], atol=1e-6, rtol=0)
    torch.testing.assert_close(lin.z, f(lin.s).detach(), atol=1e-5, rtol=0)
    reference = torch.autograd.functional.jacobian(f, lin.s.clone())  # one backward per output dimension
    assert (lin.jacobian - reference).abs().max() < 1e-5
    chunked = jacobian(lm, prompt, layer, rows=24)  # cotangent chunks bound memory, not results
    assert (chunked.jacobian - reference).abs().max() < 1e-5


def test_lre_reproduces_first_order_change(tiny_lms):
    """One training sample, beta = 1: W is the exact Jacobian there and b = F(s) - W s, so F(s + e v) - LRE(s + e v)
    shrinks as e^2 while F's own change shrinks as e."""
    lm = tiny_lms["llama"]
    layer = 2
    fit = fit_layers(lm, REL, SAMPLES[:1], [layer], rows=64)[layer]
    prompt = encode_prompt(lm.tokenizer, "", REL.template, SAMPLES[0].subject)
    f = _plain_F(lm, list(prompt.ids), prompt.subject_last, layer)
    with torch.no_grad():
        s0 = lm.model(input_ids=torch.tensor([prompt.ids]), output_hidden_states=True).hidden_states[layer][
            0, prompt.subject_last]
        z0 = f(s0)
        torch.testing.assert_close(fit.lre(s0, 1.0), z0, atol=1e-4, rtol=0)
        v = torch.randn(s0.shape, generator=torch.Generator().manual_seed(0))
        v = v / v.norm() * s0.norm()
        errors, changes = [], []
        for eps in (1e-2, 5e-3):
            z = f(s0 + eps * v)
            errors.append((z - fit.lre(s0 + eps * v, 1.0)).norm().item())
            changes.append((z - z0).norm().item())
    assert errors[0] < 0.05 * changes[0]  # first order captured
    assert 2.5 < errors[0] / errors[1] < 6  # the rest is second order (ratio 4 for a halved step)
    assert 1.6 < changes[0] / changes[1] < 2.4


def test_low_rank_pinv():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64).float()
    torch.testing.assert_close(low_rank_pinv(M, 12), torch.linalg.pinv(M), atol=1e-4, rtol=1e-4)
    U, S, Vh = torch.linalg.svd(M.double())
    want = Vh[:3].T @ torch.diag(1 / S[:3]) @ U[:, :3].T
    torch.testing.assert_close(low_rank_pinv(M, 3), want.float(), atol=1e-5, rtol=1e-5)


def test_choices_never_see_test_subjects(tiny_lms, monkeypatch):
    """beta, rank and layer are chosen from the dev subjects alone: the choice sees exactly the dev states, and two
    splits that differ only in their test subjects choose alike and score their dev subjects alike. The tiny model
    answers nothing right, so its own top-1 token stands in as every subject's object: the dev scores are then
    numbers, not NaN defaults."""
    lm = tiny_lms["llama"]
    real_states, real_choose, seen = lre.run_states, lre.choose, []
    monkeypatch.setattr(lre, "run_states", lambda *a, **k: replace(st := real_states(*a, **k), target=st.top1))

    def choose(lm, rel, prefix, dev, *rest):
        seen.append({x.subject for x in dev.samples})
        return real_choose(lm, rel, prefix, dev, *rest)

    monkeypatch.setattr(lre, "choose", choose)
    sp = split(REL, 3, 4, None, 0)
    assert not {*sp.train} & {*sp.dev} and not ({*sp.train} | {*sp.dev}) & {*sp.test}
    st = Settings((1, 3), (0.25, 4.0), (4, 16), 4)
    fits = fit_layers(lm, REL, sp.train, st.layers, rows=64)
    other = Split(sp.train, sp.dev, (Sample("tall", "short"), Sample("good", "bad"), Sample("sweet", "sour")))
    a, b = evaluate(lm, REL, sp, fits, st), evaluate(lm, REL, other, fits, st)
    evaluate(lm, REL, Split(sp.train, sp.test, sp.dev), fits, st)
    dev, test = {x.subject for x in sp.dev}, {x.subject for x in sp.test}
    assert seen == [dev, dev, test]  # the swapped split's choice saw its dev, i.e. the others' test subjects
    assert all(math.isfinite(x) for x in a.dev_faithfulness)
    assert (a.beta, a.rank, a.layer) == (b.beta, b.rank, b.layer)
    assert a.dev_faithfulness == b.dev_faithfulness
    assert a.n_test == len(sp.test) and b.n_test == 3


def test_shipped_relations():
    rels = load_relations()
    assert len(rels) >= 25 and {r.kind for r in rels} == set(KINDS)
    assert all(len(r.samples) >= 24 and "{}" in r.template for r in rels)
    picked = select_relations(rels, None, 8)
    assert len(picked) == 8 and {r.kind for r in picked} == set(KINDS)


@pytest.mark.parametrize("content, key", [
    ({"name": "x", "samples": [{"subject": "a", "object": "b"}]}, '"prompt_templates"'),
    ({"name": "x", "prompt_templates": ["{} is"], "samples": []}, '"samples"'),
    ({"name": "x", "prompt_templates": ["no subject here"], "samples": [{"subject": "a", "object": "b"}]},
     '"prompt_templates"[0]'),
    ({"name": "x", "prompt_templates": ["{} is"], "samples": [{"subject": "a"}]}, '"samples"[0]'),
])
def test_bad_relation_files(tmp_path, content, key):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=r"bad\.json: key " + key.replace("[", r"\[").replace("]", r"\]")):
        load_relations(str(tmp_path))
    (tmp_path / "bad.json").write_text('{"name": \n oops}')
    with pytest.raises(ConfigError, match="bad.json: line 2"):
        load_relations(str(path))


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):

    (tmp_path / "rels").mkdir()
    (tmp_path / "rels" / "r.json").write_text(json.dumps({"name": "r", "prompt_templates": ["{} is"]}))
    store, db = tmp_path / "store", tmp_path / "mlflow.db"
    base = ["run", "lre", "--set", "model.name=tiny-llama", "--set", f"store.root={store}",
            "--set", f"tracking.uri=sqlite:///{db}", "--set", "lre.layers=[1,2]"]
    code, err = cli(*base, "--set", f"lre.relations={tmp_path / 'rels'}")
    assert code == 2
    assert len(err) == 1 and "r.json" in err[0] and '"samples"' in err[0]
    code, err = cli(*base, "--set", "lre.layers=[1,4]")  # resid 4 exists, but no block follows it
    assert code == 2
    assert len(err) == 1 and "lre.layers" in err[0] and "[4]" in err[0]
    assert not store.exists() and not db.exists()


def test_flow_end_to_end(ray_session, prefect_harness, tmp_path, tracking_uri):
    from lensflow.flows.lre import lre_flow

    folder = tmp_path / "rels"
    folder.mkdir()
    for name, kind in (("antonym", "linguistic"), ("antonym again", "bias")):
        (folder / f"{name}.json").write_text(json.dumps({
            "name": name, "prompt_templates": [REL.template], "properties": {"relation_type": kind},
            "samples": [{"subject": s.subject, "object": s.object} for s in SAMPLES], "ignored": 1}))
    overrides = [f"store.root={tmp_path / 'store'}", f"tracking.uri={tracking_uri}", "ray.actors=1",
                 "model.name=tiny-llama", f"lre.relations={folder}", "lre.n_train=2", "lre.n_dev=3",
                 "lre.layers=[1,3]", "lre.betas=[1,2]", "lre.ranks=[4,16]", "lre.max_test=4", "lre.jacobian_rows=64"]
    out = lre_flow(config="conf/default.yaml", overrides=overrides)
    assert out["relations"].keys() == {"antonym", "antonym again"} and out["relations_computed"] == 2

    lm = load_model(ModelConf(name="tiny-llama"))  # the same seeded weights the actor holds
    sp = split(REL, 2, 3, 4, 0)
    st = Settings((1, 3), (1.0, 2.0), (4, 16), 16)
    direct = evaluate(lm, REL, sp, fit_layers(lm, REL, sp.train, st.layers, rows=64), st)
    assert out["relations"]["antonym"]["layer"] == direct.layer

    client = MlflowClient(tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(out["run_id"], metric_key("lre.layer.faithfulness.logit_lens"))
    assert sorted(m.step for m in hist) in ([1, 3], [])  # NaN layers (no known subject) are not logged
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    assert {"plots/lre_faithfulness_by_kind.png", "plots/lre_relations.png"} <= artifacts
    again = lre_flow(config="conf/default.yaml", overrides=overrides)
    assert again["relations_computed"] == 0 and json.dumps(again["relations"]) == json.dumps(out["relations"])
