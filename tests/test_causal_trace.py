"""Causal tracing: the batched trace against the naive one-forward-per-state loop, its endpoints against plain
forward passes, seeded noise, facts and their selection, token-group averages by hand, and the flow end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from lensflow.tasks.causal_trace.facts import (
    FACTS_FILE,
    Fact,
    encode_fact,
    load_facts,
    select_known,
)
from lensflow.tasks.causal_trace.report import GROUPS, average_effects, token_groups
from lensflow.tasks.causal_trace.tracing import (
    FactTrace,
    TraceSettings,
    clean_run,
    draw_noise,
    noise_std,
    restored_prob,
    trace_fact,
    trace_fast,
)
from lensflow.tasks.core.config import ConfigError, ModelConf
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.core.models import load_model

SETTINGS = TraceSettings(samples=3, noise_scale=3.0, window=3, seed=0, batch_tokens=4096)
SHARPEN = {"llama": 5.0, "gpt2": 10.0}  # final-norm gain: a random tiny model's answer probability then moves a lot


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Hundreds of tiny forward passes: on a loaded 2-core machine two torch threads each ran 25x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def sharp(request):
    """A tiny random model with a sharpened output, and facts whose answer is its own greedy token."""
    lm = load_model(ModelConf(name=f"tiny-{request.param}"))
    lm.final_norm.weight.data.mul_(SHARPEN[request.param])
    facts = []
    for prompt, subject in [("Ann met Bob in", "Bob"), ("Bob is in", "Bob")]:
        with torch.no_grad():
            greedy = lm.model(**lm.tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax().item()
        facts.append(Fact(prompt, subject, lm.tokenizer.decode([greedy])))
    return lm, facts


def _plain_probs(lm, enc, noise=None) -> float:
    """P(answer) by a plain HF forward (no lensflow hooks): noise added to the token embeddings of the subject."""
    ids = torch.tensor([enc.ids])
    emb = lm.model.get_input_embeddings()(ids)
    if noise is not None:
        emb = emb.repeat(noise.shape[0], 1, 1)
        emb[:, enc.start:enc.end] += noise
    with torch.no_grad():
        return lm.model(inputs_embeds=emb).logits[:, -1].softmax(-1)[:, enc.target].mean().item()


def test_fast_matches_naive(sharp):
    lm, facts = sharp
    for fact in facts:
        fast = trace_fact(lm, fact, SETTINGS)
        naive = trace_fact(lm, fact, SETTINGS, naive=True)
        assert fast.clean == pytest.approx(naive.clean, abs=1e-6)
        assert fast.corrupted == pytest.approx(naive.corrupted, abs=1e-5)
        for site in ("resid", "mlp", "attn"):
            assert fast.probs[site].shape == naive.probs[site].shape == (lm.n_layers + (site == "resid"), len(fast.tokens))
            assert (fast.probs[site] - naive.probs[site]).abs().max() < 1e-5
        assert naive.probs["resid"].max() - naive.probs["resid"].min() > 1e-3  # the comparison is not vacuous


def test_endpoints_equal_clean_and_corrupted_runs(sharp):
    lm, facts = sharp
    fact = facts[0]
    enc = encode_fact(lm.tokenizer, fact)
    noise = draw_noise(fact, enc.end - enc.start, lm.d_model, SETTINGS, noise_std(lm))
    clean, states = clean_run(lm, enc)
    plain_clean, plain_corrupted = _plain_probs(lm, enc), _plain_probs(lm, enc, noise)
    assert abs(plain_clean - plain_corrupted) > 1e-3
    assert clean == pytest.approx(plain_clean, abs=1e-5)
    n, T = lm.n_layers, len(enc.ids)
    everything = [(s, l, p) for s, ls in (("resid", n + 1), ("mlp_out", n), ("attn_out", n)) for l in range(ls) for p in range(T)]
    assert restored_prob(lm, enc, noise, states, everything) == pytest.approx(plain_clean, abs=1e-5)
    assert restored_prob(lm, enc, noise, states, []) == pytest.approx(plain_corrupted, abs=1e-5)
    clean_f, corrupted_f, probs = trace_fast(lm, enc, noise, SETTINGS.window, batch_tokens=64)  # small: several passes
    assert corrupted_f == pytest.approx(plain_corrupted, abs=1e-5)
    assert probs["resid"][n, T - 1] == pytest.approx(plain_clean, abs=1e-5)  # the state the answer is read from
    assert torch.allclose(probs["resid"][:, :enc.start], torch.tensor(plain_corrupted), atol=1e-5)  # before the subject
    if enc.end - enc.start == 1:  # restoring the one corrupted embedding undoes the corruption
        assert probs["resid"][0, enc.start] == pytest.approx(plain_clean, abs=1e-5)


def test_noise_is_seeded_per_fact(tiny_lms):
    lm = tiny_lms["llama"]
    a, b = Fact("Ann met Bob in", "Bob", " x"), Fact("Ann met Cid in", "Cid", " x")
    n1 = draw_noise(a, 3, 8, SETTINGS, 2.0)
    assert torch.equal(n1, draw_noise(a, 3, 8, SETTINGS, 2.0))
    assert not torch.equal(n1, draw_noise(b, 3, 8, SETTINGS, 2.0))
    assert not torch.equal(n1, draw_noise(a, 3, 8, TraceSettings(3, 3.0, 3, 1, 4096), 2.0))
    assert n1.std().item() == pytest.approx(6.0, rel=0.25)  # noise_scale x std
    first, again = trace_fact(lm, a, SETTINGS), trace_fact(lm, a, SETTINGS)
    assert all(torch.equal(first.probs[s], again.probs[s]) for s in first.probs) and first.corrupted == again.corrupted


def test_token_groups_and_average_by_hand():
    assert token_groups(1, 4, 9) == {"first_subject_token": [1], "middle_subject_tokens": [2], "last_subject_token": [3],
                                     "first_subsequent_token": [4], "further_tokens": [5, 6, 7], "last_token": [8]}
    g = token_groups(0, 1, 2)  # one-token subject, one token after it, which is the last
    assert g["first_subject_token"] == g["last_subject_token"] == [0] and g["middle_subject_tokens"] == []
    assert g["first_subsequent_token"] == [] and g["further_tokens"] == [] and g["last_token"] == [1]

    def fact_trace(start, end, probs, corrupted):
        p = torch.tensor(probs, dtype=torch.float32)  # [layers, tokens]
        return FactTrace(Fact("p", "s", " t"), ["x"] * p.shape[1], start, end, 0.9, corrupted,
                         {"resid": p, "mlp": p * 0, "attn": p * 0})

    t1 = fact_trace(1, 4, [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]], 0.1)  # tokens 0..5
    t2 = fact_trace(0, 1, [[0.2, 0.4, 0.8], [0.3, 0.3, 0.3]], 0.2)
    ae = average_effects([t1, t2])
    m = ae.aie["resid"]
    row = {g: m[GROUPS.index(g)] for g in GROUPS}
    # t1: first subject = token 1, middle = 2, last subject = 3, first subsequent = 4, further = none, last = 5;
    # t2: first = last subject = token 0, first subsequent = 1, last = 2
    np.testing.assert_allclose(row["first_subject_token"], [((0.2 - 0.1) + (0.2 - 0.2)) / 2, ((0.1 - 0.1) + (0.3 - 0.2)) / 2], atol=1e-7)
    np.testing.assert_allclose(row["middle_subject_tokens"], [0.3 - 0.1, 0.2 - 0.1], atol=1e-7)
    np.testing.assert_allclose(row["last_subject_token"], [((0.4 - 0.1) + (0.2 - 0.2)) / 2, ((0.3 - 0.1) + 0.1) / 2], atol=1e-7)
    np.testing.assert_allclose(row["first_subsequent_token"], [((0.5 - 0.1) + (0.4 - 0.2)) / 2, ((0.4 - 0.1) + 0.1) / 2], atol=1e-7)
    assert np.isnan(row["further_tokens"]).all()
    np.testing.assert_allclose(row["last_token"], [((0.6 - 0.1) + (0.8 - 0.2)) / 2, ((0.5 - 0.1) + 0.1) / 2], atol=1e-7)
    assert ae.counts == {"first_subject_token": 2, "middle_subject_tokens": 1, "last_subject_token": 2,
                         "first_subsequent_token": 2, "further_tokens": 0, "last_token": 2}
    assert ae.clean == pytest.approx(0.9) and ae.corrupted == pytest.approx(0.15)


def test_shipped_facts_and_selection(tmp_path):
    facts = load_facts()
    assert len(facts) >= 150 and len({f.relation for f in facts}) >= 6
    assert all(f.subject in f.prompt and f.target.startswith(" ") and not f.prompt.endswith(" ") for f in facts)
    assert len(facts) == sum(1 for line in FACTS_FILE.read_text().splitlines() if line.strip())

    f = [Fact(f"p{i}", "p", " t", rel) for i, rel in enumerate("aaabbc")]
    right = [True, False, True, True, True, False]
    known = select_known(f, right, filter_correct=True, max_facts=3)
    assert [x.prompt for x in known.facts] == ["p0", "p3", "p2"]  # round-robin a, b, a (c has none right)
    assert known.n_correct == 4 and known.per_relation == {"a": (2, 3), "b": (2, 2), "c": (0, 1)}
    assert [x.prompt for x in select_known(f, right, False, None).facts] == ["p0", "p3", "p5", "p1", "p4", "p2"]
    with pytest.raises(ConfigError, match="answers none"):
        select_known(f, [False] * 6, True, None)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "The Louvre is in", "subject": "Eiffel", "target": " Paris"}) + "\n")
    with pytest.raises(ConfigError, match="line 1: subject 'Eiffel' does not occur"):
        load_facts(str(bad))
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="line 1 is not a JSON object"):
        load_facts(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_facts(str(tmp_path / "missing.jsonl"))


def test_flow_end_to_end(ray_session, prefect_harness, make_conf, tmp_path, tracking_uri):
    from lensflow.flows.causal_trace import causal_trace_flow

    facts = [{"prompt": "Ann met Bob in", "subject": "Bob", "target": " Rome", "relation": "met"},
             {"prompt": "Bob is in", "subject": "Bob", "target": " Oslo", "relation": "in"},
             {"prompt": "The cat sat on", "subject": "cat", "target": " mats", "relation": "in"}]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    overrides = [f"store.root={tmp_path / 'store'}", f"tracking.uri={tracking_uri}", "ray.actors=1",
                 "model.name=tiny-llama", f"causal_trace.facts_file={path}", "causal_trace.filter_correct=false",
                 "causal_trace.samples=2", "causal_trace.window=2"]
    out = causal_trace_flow(config="conf/default.yaml", overrides=overrides)
    assert out["n_facts"] == 3 and out["n_traced"] == 3 and out["computed"] == 3

    lm = load_model(ModelConf(name="tiny-llama"))  # the same seeded weights the actor holds
    direct = [trace_fact(lm, Fact(**f), TraceSettings(2, 3.0, 2, 0, 4096)) for f in facts]
    expected = average_effects(direct)
    for site in ("resid", "mlp", "attn"):
        np.testing.assert_allclose(np.array(out["aie"][site], dtype=float), expected.aie[site], atol=1e-6)

    client = MlflowClient(tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics[metric_key("causal_trace.n_traced")] == 3
    for site, n in (("resid", lm.n_layers + 1), ("mlp", lm.n_layers), ("attn", lm.n_layers)):
        for group in ("last_subject_token", "last_token"):
            hist = client.get_metric_history(out["run_id"], metric_key(f"causal_trace.{site}.aie.{group}"))
            curve = expected.curve(site, group)
            assert sorted((m.step, round(m.value, 5)) for m in hist) == [(l, round(float(curve[l]), 5)) for l in range(n)]
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    assert {f"plots/causal_trace_{s}.png" for s in ("resid", "mlp", "attn")} <= artifacts
    assert client.list_artifacts(out["run_id"], "images")  # the image charts
    summary = Path(client.download_artifacts(out["run_id"], "causal_trace/summary.md", str(tmp_path))).read_text()
    assert "| last_token | 3 |" in summary and "0 of 3 facts answered right; 3 traced" in summary

    again = causal_trace_flow(config="conf/default.yaml", overrides=overrides)  # same inputs: every trace found under the stage
    assert again["computed"] == 0 and again["resumed"] == 3 and again["aie"] == out["aie"]
