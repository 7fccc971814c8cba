"""Logit and tuned lens against independent computations: plain transformers forward passes, a direct
softmax KL, a hand-built token layout; the tuned lens must beat the identity on held-out tokens."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lensflow.tasks.core import tracking
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.metric_names import metric_key
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.lenses.readouts import (
    LensTargets,
    Readout,
    Translator,
    evaluate,
    final_targets,
    grid_cells,
    kl_and_top1,
    prompt_states,
    token_batches,
    train_translator,
)
from lensflow.tasks.lenses.report import load_translators, save_translators

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "1 2 3 4 5 6"]


def _states(lm, texts, layers, max_tokens=32):
    """Residual states of real tokens only, [n_tokens, d] per layer, one prompt at a time (no padding)."""
    out = {l: [] for l in layers}
    for text in texts:
        enc = lm.encode([text], max_tokens)
        with trace(lm, reads=[Read("resid", l) for l in layers]) as t:
            lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        for l in layers:
            out[l].append(t["resid", l][0])
    return {l: torch.cat(v) for l, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gptj", "gpt_neox"])
def test_logit_lens_at_last_layer_is_the_model(tiny_lms, family):
    lm = tiny_lms[family]
    readout = Readout.from_lm(lm)
    for text in TEXTS:
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0]  # plain HF forward, no hooks
        states = prompt_states(lm, text).states
        assert states.shape[0] == lm.n_layers + 1
        torch.testing.assert_close(lm.decode(states[-1]), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(readout(states[-1]), logits, atol=1e-5, rtol=1e-5)
        _, cells, probs = grid_cells(readout, states, lm.tokenizer)
        top = torch.softmax(logits, -1).max(-1)
        assert cells[-1] == [lm.tokenizer.decode([int(i)]) for i in top.indices]
        np.testing.assert_allclose(probs[-1], top.values.numpy(), atol=1e-5)


@pytest.mark.integration
def test_logit_lens_at_last_layer_is_smollm2(smollm2):
    ids = smollm2.tokenizer(TEXTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = smollm2.model(input_ids=ids).logits[0]
    states = prompt_states(smollm2, TEXTS[1]).states
    torch.testing.assert_close(Readout.from_lm(smollm2)(states[-1]), logits, atol=1e-4, rtol=1e-4)
    tgt = final_targets(Readout.from_lm(smollm2), states[-1])
    kl, hit = kl_and_top1(Readout.from_lm(smollm2), states[-1], tgt)
    assert kl.abs().max() < 1e-3 and hit.all()


def _direct_kl(readout, h, h_last):
    """KL(final || lens) straight from the definition, float64."""
    with torch.no_grad():
        logp = torch.log_softmax(readout(h_last).double(), -1)
        logq = torch.log_softmax(readout(h).double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1), logp.argmax(-1) == logq.argmax(-1)


@pytest.mark.parametrize("family", ["llama", "gptj"])  # GPT-J's unembedding has a bias: the c term must carry it
def test_kl_and_top1_match_direct_computation(tiny_lms, family):
    lm = tiny_lms[family]
    readout = Readout.from_lm(lm)
    states = _states(lm, TEXTS, [1, lm.n_layers])
    h, h_last = states[1], states[lm.n_layers]
    tgt = final_targets(readout, h_last, chunk=7)  # chunking must not matter
    kl, hit = kl_and_top1(readout, h, tgt)
    ref_kl, ref_hit = _direct_kl(readout, h, h_last)
    assert ref_kl.min() > 1e-3  # a layer whose lens really differs from the output
    torch.testing.assert_close(kl.double(), ref_kl, atol=2e-5, rtol=1e-4)
    assert torch.equal(hit, ref_hit)
    kl_last, hit_last = kl_and_top1(readout, h_last, tgt)
    assert kl_last.abs().max() < 1e-5 and hit_last.all()
    got = evaluate(readout, [(h[:10], tgt[:10]), (h[10:], tgt[10:])])
    assert got["kl_to_final"] == pytest.approx(ref_kl.mean().item(), rel=1e-4, abs=1e-6)
    assert got["top1_agree"] == pytest.approx(ref_hit.double().mean().item())


def test_kl_gradient_matches_direct_computation(tiny_lms):
    lm = tiny_lms["llama"]
    readout = Readout.from_lm(lm)
    states = _states(lm, TEXTS[:2], [2, lm.n_layers])
    h_last = states[lm.n_layers]
    tgt = final_targets(readout, h_last)
    h1 = states[2].clone().requires_grad_(True)
    kl_and_top1(readout, h1, tgt, top1=False)[0].sum().backward()
    h2 = states[2].clone().requires_grad_(True)
    p = torch.softmax(readout(h_last), -1).detach()
    (p * (torch.log(p) - torch.log_softmax(readout(h2), -1))).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)


def test_token_batches_align_states_with_targets():
    """Prompts of different lengths, right-padded blocks of 2 rows: every streamed state meets its own target."""
    lengths = np.array([3, 1, 4, 2, 4])
    n_rows, T, d = len(lengths), 4, 3
    block = np.zeros((n_rows, T, d), dtype=np.float32)
    flat_index = 0
    for r, n in enumerate(lengths):
        for p in range(n):
            block[r, p] = [r, p, flat_index]  # a state that names its own token
            flat_index += 1
    tgt = LensTargets(torch.zeros(flat_index, d), torch.arange(flat_index, dtype=torch.float32), torch.arange(flat_index))
    blocks = [(s, block[s:s + 2]) for s in range(0, n_rows, 2)]
    rows = range(1, 4)
    seen = []
    for h, t in token_batches(blocks, lengths, tgt, batch_tokens=2, rows=rows, shuffle_seed=3):
        assert torch.equal(h[:, 2], t.c) and torch.equal(t.top1.float(), t.c)
        seen += [(int(r), int(p)) for r, p in h[:, :2]]
    assert sorted(seen) == [(r, p) for r in rows for p in range(lengths[r])]


def test_tuned_lens_beats_identity_on_heldout(tiny_lms):
    lm = tiny_lms["llama"]
    readout = Readout.from_lm(lm)
    texts = builtin_texts(40, seed=1)
    layer = 1
    train = _states(lm, texts[:30], [layer, lm.n_layers], max_tokens=24)
    held = _states(lm, texts[30:], [layer, lm.n_layers], max_tokens=24)
    t_train, t_held = final_targets(readout, train[lm.n_layers]), final_targets(readout, held[lm.n_layers])
    h = train[layer]

    def batches(epoch):
        perm = torch.randperm(len(h), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(h), 64):
            j = perm[i:i + 64]
            yield h[j], t_train[j]

    tr, losses = train_translator(readout, batches, lm.d_model, epochs=3, lr=3e-3, steps_per_epoch=-(-len(h) // 64),
                                  compute_dtype=torch.float32)
    logit = evaluate(readout, [(held[layer], t_held)])
    tuned = evaluate(readout, [(held[layer], t_held)], tr)
    # the reference KL of the identity comes from the direct definition, not from the code under test
    ref_logit = _direct_kl(readout, held[layer], held[lm.n_layers])[0].mean().item()
    assert logit["kl_to_final"] == pytest.approx(ref_logit, rel=1e-4)
    assert tuned["kl_to_final"] < 0.8 * ref_logit
    assert losses[-1] < losses[0]
    ref_tuned = _direct_kl(readout, tr(held[layer]), held[lm.n_layers])[0].mean().item()
    assert tuned["kl_to_final"] == pytest.approx(ref_tuned, rel=1e-4)


def test_translator_starts_at_identity():
    h = torch.randn(5, 8)
    assert torch.equal(Translator(8)(h), h)


def test_translators_round_trip_by_run_id(make_conf):
    from lensflow.tasks.core import tracking

    conf = make_conf()
    translators = {}
    for layer in (0, 2):
        tr = Translator(16)
        torch.nn.init.normal_(tr.linear.weight)
        torch.nn.init.normal_(tr.linear.bias)
        translators[layer] = tr
    with tracking.flow_run(conf, "logit-lens-test") as ref:
        save_translators(ref, {l: tr.tensors() for l, tr in translators.items()})
    loaded = load_translators(conf.tracking.uri, ref.run_id)
    assert sorted(loaded) == [0, 2]
    h = torch.randn(4, 16)
    for layer, tr in translators.items():
        torch.testing.assert_close(loaded[layer](h), tr(h), atol=0, rtol=0)



def _published(root, stage: str) -> dict[str, list[str]]:
    """{stage key: item names} as they lie under the store root: what the counters must agree with."""
    from pathlib import Path

    return {d.name: sorted(f.stem for f in d.glob("*.safetensors")) for d in Path(root, stage).glob("*")}


def test_flow_end_to_end_rerun_and_grid(ray_session, prefect_harness, tmp_path, tracking_uri, monkeypatch):
    """One run checked against plain HF forward passes; the same run again computes nothing; a new lenses.lr
    retrains the translators only (store and targets found)."""
    from mlflow.tracking import MlflowClient

    from lensflow.flows.logit_lens import logit_lens_flow
    from lensflow.tasks.core.models import load_model
    from lensflow.tasks.core.prompts import load_prompts
    from lensflow.tasks.core.tracking import local_uri
    from lensflow.tasks.lenses.report import render_grid
    from lensflow.tasks.registry import load_config

    root = tmp_path / "store"
    overrides = ["model.name=tiny-llama", f"store.root={root}", f"tracking.uri={tracking_uri}",
                 "ray.actors=1", "data.max_tokens=16", "store.chunk_size=4", "lenses.max_prompts=12",
                 "lenses.heldout=0.25", "lenses.epochs=2", "lenses.batch_tokens=32", "lenses.lr=3e-3"]
    out = logit_lens_flow(config="conf/default.yaml", overrides=overrides)
    assert out["trained_layers"] == 4 and out["train_prompts"] == 9 and out["eval_prompts"] == 3
    assert out["evaluated_layers"] == 5 and out["targets_chunks_computed"] == 3
    layer_items = [f"layer_{l:02d}" for l in range(5)]
    assert list(_published(root, "lenses/translators").values()) == [layer_items[:4]]  # the last layer: identity
    assert list(_published(root, "lenses/evaluations").values()) == [layer_items]
    assert list(_published(root, "lenses/targets").values()) == [["chunk_0000", "chunk_0001", "chunk_0002"]]
    client = MlflowClient(local_uri(tracking_uri))
    run_id = out["run_id"]

    def history(name, run=run_id):
        return {m.step: m.value for m in client.get_metric_history(run, metric_key(name))}

    kl = {lens: history(f"{lens}_lens.kl_to_final") for lens in ("logit", "tuned")}
    top1 = {lens: history(f"{lens}_lens.top1_agree") for lens in ("logit", "tuned")}
    assert sorted(kl["logit"]) == sorted(top1["tuned"]) == [0, 1, 2, 3, 4]
    assert abs(kl["logit"][4]) < 1e-5 and top1["logit"][4] == 1.0 and kl["tuned"][4] == kl["logit"][4]

    # independent check: plain HF forward passes of the held-out texts (no store, no padding), KL by definition
    conf = load_config("conf/default.yaml", overrides)
    texts = load_prompts(conf.data.model_copy(update={"max_prompts": 12}))[9:]
    lm = load_model(conf.model)
    readout = Readout.from_lm(lm)
    translators = load_translators(tracking_uri, run_id)
    assert sorted(translators) == [0, 1, 2, 3, 4]
    hs = []
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=16)["input_ids"]
        with torch.no_grad():
            hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        hs.append((hidden[2][0], lm.model(input_ids=ids).logits[0]))
    h2 = torch.cat([h for h, _ in hs])
    logp = torch.log_softmax(torch.cat([z for _, z in hs]).double(), -1)
    for lens, h in (("logit", h2), ("tuned", translators[2](h2))):
        with torch.no_grad():
            logq = torch.log_softmax(readout(h).double(), -1)
        ref = (logp.exp() * (logp - logq)).sum(-1).mean().item()
        assert kl[lens][2] == pytest.approx(ref, rel=1e-4, abs=1e-5)
        agree = (logq.argmax(-1) == logp.argmax(-1)).double().mean().item()
        assert top1[lens][2] == pytest.approx(agree)

    # the layers this run trained, in its own run (no run per layer): final KL per layer, loss curves, stage items
    assert not client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    final = history("tuned_lens.training.kl.final")
    assert sorted(final) == [0, 1, 2, 3]  # the last layer is the identity
    curves = tracking.load_json(tracking_uri, run_id, "training/tuned_lens_curves.json")
    assert sorted(int(layer) for layer in curves) == [0, 1, 2, 3]
    for layer, c in curves.items():
        assert len(c["kl"]) >= 2 and final[int(layer)] == pytest.approx(c["kl"][-1])
    rows = tracking.table_rows(tracking_uri, run_id, "training/tuned_lens.json")
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert all(os.path.isfile(r["stage"]) for r in rows)  # each layer's row names the published item
    arts = {a.path for folder in ("plots", "grids", "tuned_lens") for a in client.list_artifacts(run_id, folder)}
    assert {"plots/kl_to_final.png", "plots/top1_agree.png", "grids/logit_lens.png", "grids/tuned_lens.html",
            "tuned_lens/translators.safetensors"} <= arts

    again = logit_lens_flow(config="conf/default.yaml", overrides=overrides)  # every stage found
    assert (again["trained_layers"], again["evaluated_layers"], again["targets_chunks_computed"]) == (0, 0, 0)
    assert client.get_run(again["run_id"]).data.metrics[metric_key("extract.lenses.chunks_computed")] == 0
    assert again["per_layer"] == out["per_layer"]
    assert not client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{again['run_id']}'")
    assert not tracking.artifact_files(tracking_uri, again["run_id"], "training")  # nothing trained: no training log

    new_lr = logit_lens_flow(config="conf/default.yaml", overrides=[*overrides, "lenses.lr=1e-2"])
    assert (new_lr["trained_layers"], new_lr["evaluated_layers"], new_lr["targets_chunks_computed"]) == (4, 5, 0)
    assert client.get_run(new_lr["run_id"]).data.metrics[metric_key("extract.lenses.chunks_computed")] == 0
    assert len(_published(root, "lenses/translators")) == 2 and len(_published(root, "lenses/targets")) == 1
    assert new_lr["per_layer"]["logit_lens.kl_to_final"] == pytest.approx(out["per_layer"]["logit_lens.kl_to_final"])
    assert new_lr["per_layer"]["tuned_lens.kl_to_final"][2] != out["per_layer"]["tuned_lens.kl_to_final"][2]

    monkeypatch.chdir(tmp_path)
    files = render_grid(conf, "Paris is the capital of", "tuned", run_id=run_id)
    assert files["run_id"] == run_id and "<table>" in open(files["html"]).read()
    assert {"grids/tuned_lens_Paris_is_the_capital_of.png"} <= {a.path for a in client.list_artifacts(run_id, "grids")}


def test_layer_tasks_map_one_shared_copy_of_the_targets(ray_session):
    """Every layer's task reads the targets from the object store's one copy per node (a read-only mapping), not an
    unpickled copy of its own, and reads the same values."""
    from lensflow.tasks.lenses.readouts import LensTargets
    from lensflow.tasks.lenses.tuned_lens import _targets, share_targets

    g = torch.Generator().manual_seed(0)
    n = 40_000  # each array over Ray's 100 KB inline limit, as real targets are: small objects are copied inline
    t = LensTargets(torch.randn(n, 8, generator=g), torch.randn(n, generator=g), torch.randint(0, 9, (n,)))

    @ray_session.remote
    def read(ref):
        raw = ray_session.get(ref[0])  # what _targets maps
        got = _targets(ref[0])
        shared = [got.tensors()[k].data_ptr() == a.__array_interface__["data"][0] for k, a in raw.items()]
        return got.tensors(), [a.flags.writeable for a in raw.values()], shared

    values, writeable, shared = ray_session.get(read.remote([share_targets(t)]))
    assert not any(writeable) and all(shared)  # the object store's pages, not a copy
    for k, v in t.tensors().items():
        assert torch.equal(values[k], v)
