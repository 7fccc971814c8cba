"""Fact editing: a ROME edit against plain HF forwards (the edited prompt's top token moves, an unrelated prompt's
logits stay), bit-for-bit removal, MEMIT's closed form at one layer, the fluency score, request files, and the
flow end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from loopback import cli
from mlflow.tracking import MlflowClient

from lensflow.tasks.core.config import ConfigError, ModelConf
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.editing.pipeline import context_prefixes
from lensflow.tasks.editing.requests import REQUESTS_FILE, Request, load_requests
from lensflow.tasks.editing.rome import (
    ValueSettings,
    applied,
    key_covariance,
    memit_deltas,
    optimise_value,
    rome_delta,
)
from lensflow.tasks.editing.scores import ngram_entropy

# the subject ends the prompt: in a random model the edited state then reaches the prediction by the residual path
REQ = Request("The home town of Bob", "Bob", " Rome", "Q", ("Where lives Bob",), ("The home town of Ann",))
UNRELATED = "Zed ate the cake"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    """A private tiny model (edits are applied to it in place) with a sharpened output, so a random model's
    logits move a lot."""
    lm = load_model(ModelConf(name="tiny-llama"))
    lm.final_norm.weight.data.mul_(5.0)
    return lm


def _logits(lm, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**lm.tokenizer(text, return_tensors="pt")).logits[0, -1]


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def test_rome_edit_moves_the_edited_prompt_only(lm):
    layer = 1
    prefixes = context_prefixes(3, 0)
    cov = key_covariance(lm, layer, builtin_texts(24), 32)
    value = optimise_value(lm, REQ, "mlp_out", layer, prefixes, ValueSettings(30, 0.5, 0.0625, 0.01, 20.0))
    assert value.nll_after < value.nll_before
    delta = rome_delta(lm, layer, REQ, value, prefixes, cov)
    sv = torch.linalg.svdvals(delta.double())
    assert sv[1] < 1e-5 * sv[0]  # rank one
    new = lm.tokenizer("Q")["input_ids"][0]
    before, other_before = _logits(lm, REQ.prompt), _logits(lm, UNRELATED)
    assert before.argmax() != new
    with applied(lm, {layer: delta}):
        after, other_after = _logits(lm, REQ.prompt), _logits(lm, UNRELATED)
    assert after.argmax() == new
    moved = (after - before).abs().max()
    assert (other_after - other_before).abs().max() < 0.1 * moved  # unrelated prompt within tolerance
    assert other_after.argmax() == other_before.argmax()


def test_removing_deltas_restores_the_model_bit_for_bit(lm):
    original = _state(lm)
    g = torch.Generator().manual_seed(0)
    deltas = {l: torch.randn(lm.d_model, lm.mlp_down(l).in_features, generator=g) for l in (0, 2)}
    with applied(lm, deltas):
        assert not torch.equal(lm.mlp_down(0).weight, original["model.layers.0.mlp.down_proj.weight"])
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())
    with pytest.raises(RuntimeError), applied(lm, deltas):
        raise RuntimeError("a failed evaluation")
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())


def test_gpt2_conv1d_layout(tiny_lms):
    lm = load_model(ModelConf(name="tiny-gpt2"))
    w = lm.mlp_down(1).weight.clone()  # Conv1D: [in, out]
    delta = torch.ones(lm.d_model, w.shape[0])  # [out, in]
    with applied(lm, {1: delta}):
        assert torch.equal(lm.mlp_down(1).weight, w + delta.T)
    assert torch.equal(lm.mlp_down(1).weight, w)


def test_memit_one_layer_writes_the_targets(lm):
    """With no covariance term and fewer edits than key dimensions, one layer's update writes each wanted state
    exactly: hidden_states[layer + 1] of a plain HF forward on each prompt equals its target."""
    reqs = [REQ, Request("Ann owns a red", "Ann", " car", "X", (), ()), Request("The dog of Sue is", "Sue", " Rex", "Y", (), ())]
    layer = 2
    plain = []
    for r in reqs:
        ids = lm.tokenizer(r.prompt, return_tensors="pt")
        with torch.no_grad():
            h = lm.model(**ids, output_hidden_states=True).hidden_states[layer + 1][0]
        plain.append((ids, r.prompt.index(r.subject) + len(r.subject) - 1, h))  # byte tokens: char index = token
    g = torch.Generator().manual_seed(1)
    targets = torch.stack([h[pos] for _, pos, h in plain]) + torch.randn(len(reqs), lm.d_model, generator=g)
    cov = {layer: torch.eye(lm.mlp_down(layer).in_features)}
    deltas = memit_deltas(lm, [layer], reqs, targets, [""], cov, cov_weight=0.0)
    with applied(lm, deltas), torch.no_grad():
        for (ids, pos, _), want in zip(plain, targets):
            got = lm.model(**ids, output_hidden_states=True).hidden_states[layer + 1][0, pos]
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_fluency_entropy():
    assert ngram_entropy("a b c d e f") == pytest.approx(1.0)
    assert ngram_entropy("a a a a a a a a") == pytest.approx(0.0)
    assert 0 < ngram_entropy("a b a b a b c") < 1


def test_requests(tmp_path):
    shipped = load_requests()
    assert len(shipped) >= 100 and all(r.subject in r.prompt and r.paraphrases and r.neighborhood for r in shipped)
    assert len(REQUESTS_FILE.read_text().splitlines()) == len(shipped)
    bad = tmp_path / "bad.jsonl"
    row = {"prompt": "Bob is in", "subject": "Bob", "target_true": " Rome", "target_new": " Oslo"}
    bad.write_text(json.dumps(row) + "\n" + json.dumps({**row, "subject": "Ann"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl: line 2: subject 'Ann' does not occur in the prompt"):
        load_requests(str(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl: line 1 is not a JSON object"):
        load_requests(str(bad))


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):

    bad = tmp_path / "req.jsonl"
    bad.write_text(json.dumps({"prompt": "Bob is in", "subject": "Ann", "target_true": " a", "target_new": " b"}) + "\n")
    store, db = tmp_path / "store", tmp_path / "mlflow.db"
    base = ["run", "edit", "--set", "model.name=tiny-llama", "--set", f"store.root={store}",
            "--set", f"tracking.uri=sqlite:///{db}"]
    code, err = cli(*base, "--set", f"edit.requests={bad}")
    assert code == 2
    assert len(err) == 1 and "req.jsonl: line 1" in err[0]
    code, err = cli(*base, "--set", "edit.memit_layers=[1,4]")
    assert code == 2
    assert len(err) == 1 and "edit.memit_layers" in err[0] and "[4]" in err[0]
    assert not store.exists() and not db.exists()


def test_flow_end_to_end(ray_session, prefect_harness, tmp_path, tracking_uri):
    from lensflow.flows.edit import edit_flow

    reqs = [REQ, Request("Ann owns a red", "Ann", " car", " X", ("The red thing Ann owns is a",), ("Sue owns a red",)),
            Request("The dog of Sue is", "Sue", " Rex", " Y", ("Sue has a dog called",), ("The dog of Tom is",))]
    path = tmp_path / "req.jsonl"
    path.write_text("".join(json.dumps({"prompt": r.prompt, "subject": r.subject, "target_true": r.target_true,
                                        "target_new": r.target_new, "paraphrases": list(r.paraphrases),
                                        "neighborhood": list(r.neighborhood)}) + "\n" for r in reqs))
    overrides = [f"store.root={tmp_path / 'store'}", f"tracking.uri={tracking_uri}", "ray.actors=1",
                 "model.name=tiny-llama", f"edit.requests={path}", "edit.rome_edits=2", "edit.memit_layers=[1,2]",
                 "edit.memit_sizes=[1,3]", "edit.steps=5", "edit.cov_texts=8", "edit.cov_tokens=16",
                 "edit.prefixes=2", "edit.fluency_tokens=8", "edit.layer=1"]
    out = edit_flow(config="conf/default.yaml", overrides=overrides)
    assert out["rome_layer"] == 1 and out["layer_source"] == "edit.layer"
    assert [(r["method"], r["n_edits"]) for r in out["runs"]] == [("rome", 2), ("memit", 1), ("memit", 3)]
    for r in out["runs"]:
        assert all(0 <= v <= 1 for part in ("edited", "unedited") for v in r[part].values())
    client = MlflowClient(tracking_uri)
    assert client.get_run(out["run_id"]).info.status == "FINISHED"
    hist = client.get_metric_history(out["run_id"], metric_key("edit.memit.efficacy"))
    assert sorted(m.step for m in hist) == [1, 3]  # step = number of edits
    deltas = list((tmp_path / "store" / "edit" / "memit").glob("*/n3.safetensors"))
    assert len(deltas) == 1  # the weight deltas are a stage
    from safetensors.torch import load_file

    assert set(load_file(deltas[0])) == {"layer1", "layer2"}
