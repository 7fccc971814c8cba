"""Multilingual feature overlap: SAE math and training, Jaccard overlap, neuron sets, the parallel loader, the flow.

Every number is checked against a direct computation written here (Python sets, numpy sums, a hand-registered
torch hook on an unpadded single-text forward), never against the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensflow.tasks import store
from lensflow.tasks.config import ConfigError
from lensflow.tasks.data.parallel import load_parallel
from lensflow.tasks.models import load_model
from lensflow.tasks.config import ModelConf
from lensflow.tasks.overlap import NeuronJob, active_sets, derangement, jaccard, neuron_active_sets, pair_overlaps, sae_active_sets
from lensflow.tasks.sae import SparseAutoencoder, TrainSpec, evaluate, loss_terms, token_blocks, train


# ---------------------------------------------------------------- overlap math

def test_jaccard_matches_python_sets():
    rng = np.random.default_rng(0)
    a, b = rng.random((50, 40)) < 0.2, rng.random((50, 40)) < 0.3
    a[3] = b[3] = False  # both empty -> nan, skipped by the mean
    got = jaccard(a, b)
    for i in range(50):
        sa, sb = set(np.flatnonzero(a[i])), set(np.flatnonzero(b[i]))
        if not sa | sb:
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(len(sa & sb) / len(sa | sb))


def test_pair_overlaps_translated_vs_unrelated():
    rng = np.random.default_rng(1)
    n = 12
    base = rng.random((n, 30)) < 0.3
    noise = rng.random((n, 30)) < 0.05
    sets = {"en": base, "fr": base ^ noise}
    perm = derangement(n, seed=3)
    assert not np.any(perm == np.arange(n)) and sorted(perm) == list(range(n))
    got = pair_overlaps(sets, [("en", "fr")], perm)["en-fr"]

    def direct(i: int, j: int) -> float:
        sa, sb = set(np.flatnonzero(sets["en"][i])), set(np.flatnonzero(sets["fr"][j]))
        return len(sa & sb) / len(sa | sb)

    assert got["translated"] == pytest.approx(np.mean([direct(i, i) for i in range(n)]))
    assert got["unrelated"] == pytest.approx(np.mean([direct(i, perm[i]) for i in range(n)]))
    diffs = [direct(i, i) - direct(i, perm[i]) for i in range(n)]
    assert got["gap_se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(n))
    assert got["translated"] > got["unrelated"]


def test_active_sets_ignore_masked_tokens():
    codes = np.zeros((2, 3, 4), dtype=np.float32)
    codes[0, 0, 0] = 1.0  # first token: masked out
    codes[0, 1, 1] = 0.5
    codes[1, 2, 3] = 2.0  # padding: masked out
    codes[1, 1, 2] = 0.05  # below the threshold
    mask = np.array([[False, True, True], [True, True, False]])
    got = active_sets(codes, mask, threshold=0.1)
    assert got.tolist() == [[False, True, False, False], [False, False, False, False]]


# ---------------------------------------------------------------- SAE

def _sparse_data(n: int, d: int = 16, atoms: int = 32, active: int = 3, seed: int = 0) -> np.ndarray:
    """Tokens that really are sparse sums of dictionary atoms, so an SAE can learn them."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    codes = np.zeros((n, atoms))
    for i in range(n):
        codes[i, rng.choice(atoms, active, replace=False)] = rng.exponential(1.0, active)
    return (codes @ dictionary + 0.5).astype(np.float32)


def test_topk_gives_exactly_k_active_features_which_are_the_top_pre_activations():
    sae = SparseAutoencoder(16, 128, "topk", k=5, seed=1)
    x = torch.from_numpy(_sparse_data(64))
    sae.fit_input(x)
    z = sae.encode(x)
    assert ((z > 0).sum(-1) == 5).all()
    pre = sae.pre_acts(x)
    top = pre.topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal((z > 0).nonzero()[:, 1].view(64, 5).sort(-1).values, top)
    x_hat, z_fwd = sae(x)  # the training path decodes with a gather; it must equal the dense decode
    assert torch.equal(z_fwd, z)
    dense = (z @ sae.W_dec + sae.b_dec) * sae.scale
    assert torch.allclose(x_hat, dense, atol=1e-5)


def test_evaluate_matches_direct_fve_and_l0():
    sae = SparseAutoencoder(16, 64, "relu", seed=2)
    data = _sparse_data(300, seed=4)
    sae.fit_input(torch.from_numpy(data[:50]))
    blocks = [data[:120], data[120:121], data[121:]]
    got = evaluate(sae, iter(blocks))
    with torch.no_grad():
        x_hat, z = sae(torch.from_numpy(data))
    x_hat, z = x_hat.double().numpy(), z.numpy()
    fve = 1 - ((data - x_hat) ** 2).sum() / ((data - data.mean(0)) ** 2).sum()
    assert got["fve"] == pytest.approx(fve, rel=1e-5)
    assert got["l0"] == pytest.approx((z > 0).sum(1).mean())
    assert got["dead"] == pytest.approx(1 - (z > 0).any(0).mean())


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_training_reduces_reconstruction_loss(activation):
    data = _sparse_data(2560, seed=5)
    data, held = data[:2048], data[2048:]
    sae = SparseAutoencoder(16, 64, activation, k=4, seed=0)
    sae.fit_input(torch.from_numpy(data))
    before = evaluate(sae, iter([held]))
    losses = train(sae, lambda: iter([data[:1000], data[1000:]]), TrainSpec(steps=300, batch_tokens=128, lr=3e-3, l1=1e-3))
    after = evaluate(sae, iter([held]))
    assert len(losses) == 300
    assert after["mse"] < 0.3 * before["mse"]
    assert after["fve"] > 0.8
    assert np.allclose(sae.W_dec.detach().norm(dim=1).numpy(), 1.0, atol=1e-5)  # unit decoder rows
    if activation == "topk":
        assert after["l0"] <= 4
    with torch.no_grad():
        _, mse = loss_terms(sae, torch.from_numpy(held), 0.0)
    assert float(mse) == pytest.approx(after["mse"] / 16 / float(sae.scale) ** 2, rel=1e-4)


def test_state_round_trip():
    sae = SparseAutoencoder(8, 24, "topk", k=3, seed=3)
    sae.fit_input(torch.randn(10, 8) * 5)
    again = SparseAutoencoder.from_state(sae.state())
    x = torch.randn(6, 8)
    assert (again.activation, again.k) == ("topk", 3)
    assert torch.allclose(again(x)[0], sae(x)[0])


# ---------------------------------------------------------------- store-streamed SAE sets

def _tiny_store(tmp_path, acts: np.ndarray, lengths: list[int], chunk: int = 2) -> store.Activations:
    n, t, d = acts.shape
    spec = store.StoreSpec(n=n, max_tokens=t, d_model=d, n_heads=1, head_dim=d, layers=[5], blocks=[], positions="all",
                           sites=["resid"], dtype="float32", chunk_size=chunk, compression_level=1, attrs={"fingerprint": "x"})
    url = str(tmp_path / "g")
    store.create(url, spec, [f"t{i}" for i in range(n)])
    for c in range(spec.n_chunks):
        rows = spec.rows(c)
        ids = np.full((rows.stop - rows.start, t), -1, dtype=np.int32)
        for r in range(rows.start, rows.stop):
            ids[r - rows.start, : lengths[r]] = 7
        store.write_chunk(url, c, rows, {"resid": acts[rows][:, :, None, :], "token_ids": ids,
                                         "lengths": np.array(lengths[rows], dtype=np.int32)})
    store.mark_complete(url)
    return store.Activations(url)


def test_sae_sets_and_token_stream_from_store_skip_padding_and_first_token(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [5, 3, 6, 2, 4]
    acts = rng.normal(size=(5, 6, 8)).astype(np.float32)
    for i, n in enumerate(lengths):
        acts[i, n:] = 100.0  # garbage at padding positions must never count
    st = _tiny_store(tmp_path, acts, lengths)
    sae = SparseAutoencoder(8, 40, "topk", k=2, seed=0)
    got = sae_active_sets(sae, st, 5, skip_first=True, batch_rows=2)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            z = sae.encode(torch.from_numpy(acts[i, 1:n]))
            assert set(np.flatnonzero(got[i])) == set(torch.nonzero(z > 0)[:, 1].tolist())
    tokens = np.concatenate(list(token_blocks(st, 5, slice(1, 4), 2, skip_first=False)))
    assert np.array_equal(tokens, np.concatenate([acts[i, : lengths[i]] for i in (1, 2, 3)]))


# ---------------------------------------------------------------- MLP-neuron sets on the model

def test_neuron_sets_match_unpadded_single_text_forward():
    lm = load_model(ModelConf(name="tiny-llama"))
    texts = ["the cat sat on the mat", "le chat", "un gato grande y negro en la casa"]
    blocks = [1, 3]
    thresholds = {1: np.float32(0.02), 3: np.linspace(-0.01, 0.03, 128).astype(np.float32)}
    got = neuron_active_sets(lm, NeuronJob(texts, blocks, 64, skip_first=True, thresholds=thresholds))
    for i, text in enumerate(texts):  # reference: one text, no padding, our own hook on the down projection
        seen = {}
        hooks = [lm.mlp_down(b).register_forward_pre_hook(lambda m, a, b=b: seen.__setitem__(b, a[0][0].clone()))
                 for b in blocks]
        with torch.no_grad():
            lm.model(**lm.tokenizer([text], return_tensors="pt"))
        for h in hooks:
            h.remove()
        for b in blocks:
            ref = (seen[b][1:] > torch.as_tensor(thresholds[b])).any(0).numpy()
            assert np.array_equal(got[b][i], ref), (i, b)


# ---------------------------------------------------------------- parallel loader

def _write(tmp_path, name: str, lines: list[str]) -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


def test_parallel_loader_reads_aligned_files(tmp_path):
    files = {"en": _write(tmp_path, "en.txt", ["One.", "Two.", "Three."]),
             "fr": _write(tmp_path, "fr.txt", ["Un.", "Deux.", "Trois."])}
    got = load_parallel(["en", "fr"], files, max_paragraphs=2)
    assert got == {"en": ["One.", "Two."], "fr": ["Un.", "Deux."]}


def test_parallel_loader_rejects_misaligned_files_naming_the_file(tmp_path):
    files = {"en": _write(tmp_path, "en.txt", ["One.", "Two.", "Three."]),
             "fr": _write(tmp_path, "fr_short.txt", ["Un.", "Deux."])}
    with pytest.raises(ConfigError) as err:
        load_parallel(["en", "fr"], files)
    msg = str(err.value)
    assert "\n" not in msg and "fr_short.txt" in msg and "2" in msg and "3" in msg
    files["fr"] = _write(tmp_path, "fr_blank.txt", ["Un.", "", "Trois."])
    with pytest.raises(ConfigError, match=r"fr_blank\.txt line 2 is empty"):
        load_parallel(["en", "fr"], files)
    with pytest.raises(ConfigError, match="no file for language 'de'"):
        load_parallel(["en", "fr", "de"], files)


def test_shipped_corpus_is_aligned():
    corpus = load_parallel(["en", "fr", "es", "de"])
    assert len({len(v) for v in corpus.values()}) == 1 and len(corpus["en"]) >= 50


# ---------------------------------------------------------------- the flow, end to end on a tiny model

EN = ["The cat sleeps on the warm mat.", "We walked to the market in the rain.", "Bread needs flour, water and salt.",
      "The train leaves at seven tomorrow.", "My sister plays the violin well.", "Snow covered the quiet village."]
FR = ["Le chat dort sur le tapis chaud.", "Nous sommes allés au marché sous la pluie.", "Le pain demande farine, eau et sel.",
      "Le train part à sept heures demain.", "Ma soeur joue bien du violon.", "La neige couvrait le village calme."]


def test_flow_end_to_end_and_resume(ray_session, prefect_harness, tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from lensflow.flows.multilingual import multilingual_flow
    from lensflow.tasks.tracking import load_tensors, local_uri

    files = {"en": _write(tmp_path, "en.txt", EN), "fr": _write(tmp_path, "fr.txt", FR)}
    overrides = [
        "model.name=tiny-llama", f"store.root={tmp_path / 'store'}", f"tracking.uri={tracking_uri}", "ray.actors=1",
        "data.max_tokens=16", "store.chunk_size=4", "multilingual.languages=[en, fr]",
        f"multilingual.files={{en: {files['en']}, fr: {files['fr']}}}", "multilingual.paragraph_tokens=48",
        "multilingual.sae.train_prompts=16", "multilingual.sae.steps=20", "multilingual.sae.batch_tokens=64",
        "multilingual.sae.k=4", "multilingual.neurons.calibration_prompts=8",
    ]
    out = multilingual_flow(config="conf/default.yaml", overrides=overrides)
    assert out["layers"] == [0, 3, 4] and out["paragraphs"] == 6
    client = MlflowClient(local_uri(tracking_uri))
    run = client.get_run(out["run_id"])
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "multilingual.overlap.translated.en-fr")}
    assert sorted(hist) == [0, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "multilingual.neurons.overlap.unrelated.en-fr")) == [2, 3]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "multilingual.sae.fve")} == {0, 3, 4}
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 3
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "sae.loss")) == 20
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/multilingual_overlap_sae.png", "plots/multilingual_overlap_neurons.png"} <= arts

    # independent check at resid layer 3: the saved SAE on a plain HF forward of each paragraph (no padding, no store)
    child3 = run.data.tags["multilingual.sae.layer_03"]
    sae = SparseAutoencoder.from_state(load_tensors(tracking_uri, child3, "sae/layer_03.safetensors"))
    lm = load_model(ModelConf(name="tiny-llama"))
    feats = {}
    for lang, paras in (("en", EN), ("fr", FR)):
        feats[lang] = []
        for text in paras:
            ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=48)["input_ids"]
            with torch.no_grad():
                h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[3][0, 1:]
                feats[lang].append(set(torch.nonzero(sae.encode(h) > 0)[:, 1].tolist()))
    ref = np.mean([len(a & b) / len(a | b) for a, b in zip(feats["en"], feats["fr"])])
    assert hist[3] == pytest.approx(ref, abs=1e-6)

    again = multilingual_flow(config="conf/default.yaml", overrides=overrides)  # resume: SAEs reused, not retrained
    run2 = client.get_run(again["run_id"])
    assert run2.data.tags["multilingual.sae.layer_03"] == child3
    assert client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run2.info.run_id}'") == []
    assert again["gap"] == pytest.approx(out["gap"])
