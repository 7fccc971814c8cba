"""Multilingual feature overlap: SAE math and training, Jaccard overlap, the per-layer SAE and overlap stages, the
parallel loader.

Every number is checked against a direct computation written here (Python sets, numpy sums, a hand-registered
torch hook on an unpadded single-text forward), never against the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensflow.tasks.core import store
from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.stages import digest
from lensflow.tasks.multilingual.config import MultilingualConf
from lensflow.tasks.multilingual.overlap import (
    OverlapJob,
    active_sets,
    derangement,
    jaccard,
    overlap_stage,
    pair_overlaps,
    sae_active_sets,
    sae_layer,
)
from lensflow.tasks.multilingual.parallel import load_parallel
from lensflow.tasks.multilingual.sae import (
    SAEJob,
    SparseAutoencoder,
    TrainSpec,
    evaluate,
    loss_terms,
    mixed_blocks,
    sae_stage,
    token_blocks,
    train,
    train_sae,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Matrices this small train faster on one thread; on a loaded 2-core machine two threads measured 8x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

    assert got.translated == pytest.approx(np.mean([direct(i, i) for i in range(n)]))
    assert got.unrelated == pytest.approx(np.mean([direct(i, perm[i]) for i in range(n)]))
    diffs = [direct(i, i) - direct(i, perm[i]) for i in range(n)]
    assert got.gap_se == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(n))
    assert got.translated > got.unrelated


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
    losses = train(sae, lambda: iter([data[:1000], data[1000:]]), TrainSpec(steps=300, batch_tokens=128, lr=3e-3, l1=1e-3, seed=0))
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


def test_mixed_blocks_give_each_source_its_share_repeating_the_small_one():
    big = np.stack([np.zeros(300), np.arange(300)], 1).astype(np.float32)  # column 0: source, column 1: position
    small = np.stack([np.ones(5), np.arange(5)], 1).astype(np.float32)
    calls = []

    def stream(data, size):
        def make():
            calls.append(int(data[0, 0]))
            return iter([data[i:i + size] for i in range(0, len(data), size)] + [data[:0]])  # an empty block too
        return make

    gen = mixed_blocks([stream(big, 40), stream(small, 2), stream(big, 40)], [0.75, 0.25, 0.0], block_tokens=16)
    blocks = [next(gen) for _ in range(10)]
    assert all(len(b) == 16 for b in blocks)
    rows = np.concatenate(blocks)
    got_big, got_small = rows[rows[:, 0] == 0, 1], rows[rows[:, 0] == 1, 1]
    assert len(got_big) == 120 and len(got_small) == 40  # 3/4 and 1/4 of every block
    assert got_big.tolist() == list(range(120)) and got_small.tolist() == [i % 5 for i in range(40)]
    assert calls == [0, 1, *[1] * 7]  # the zero-share source is never read; the small one restarted every 5 tokens
    with pytest.raises(ValueError, match="has no tokens"):
        next(mixed_blocks([stream(big, 40), lambda: iter([big[:0]])], [0.5, 0.5], 16))


def test_state_round_trip():
    sae = SparseAutoencoder(8, 24, "topk", k=3, seed=3)
    sae.fit_input(torch.randn(10, 8) * 5)
    again = SparseAutoencoder.from_state(sae.state())
    x = torch.randn(6, 8)
    assert (again.activation, again.k) == ("topk", 3)
    assert torch.allclose(again(x)[0], sae(x)[0])


# ---------------------------------------------------------------- store-streamed SAE sets

def _tiny_store(tmp_path, acts: np.ndarray, lengths: list[int], chunk: int = 2, name: str = "g") -> store.Activations:
    n, t, d = acts.shape
    spec = store.StoreSpec(n=n, max_tokens=t, d_model=d, n_heads=1, head_dim=d, layers=[5], blocks=[], positions="all",
                           sites=["resid"], dtype="float32", chunk_size=chunk, compression_level=1, attrs={"fingerprint": "x"})
    url = str(tmp_path / name)
    store.create(url, spec, [f"{name} text {i}" for i in range(n)])
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


# ---------------------------------------------------------------- per-layer stages: SAE, then its overlaps

def _sparse_store(tmp_path, name: str, n: int, seed: int, chunk: int = 2) -> tuple[store.Activations, np.ndarray,
                                                                                  list[int]]:
    """A store (layer 5) of rows that are sparse sums of one shared dictionary, with ragged lengths."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(3, 7, n)]
    acts = _sparse_data(n * 6, d=8, atoms=12, active=2, seed=seed).reshape(n, 6, 8)
    return _tiny_store(tmp_path, acts, lengths, chunk, name), acts, lengths


def _sae_job(tmp_path, url: str, k: int = 2) -> SAEJob:
    sc = MultilingualConf.SAE(k=k, expansion=3, steps=40, batch_tokens=8, lr=1e-2, holdout=0.25)
    stage = sae_stage(str(tmp_path / "stages"), "general-key", sc, skip_first=True, seed=0)
    return SAEJob(stage, url, 5, 24, "topk", k, TrainSpec(40, 8, 1e-2, sc.l1, 0), 0.25, True)


def test_sae_is_published_once_and_found_again_with_its_held_out_metrics(tmp_path):
    acts, data, lengths = _sparse_store(tmp_path, "general", 8, seed=1)
    job = _sae_job(tmp_path, acts.url)
    first = train_sae(job)
    assert first.trained and job.stage.done("layer_05")
    again = train_sae(job)
    assert not again.trained and again.metrics == first.metrics
    assert all(torch.equal(a, b) for a, b in zip(again.sae.state().values(), first.sae.state().values()))
    # held out: the last quarter of the prompts (rows 6, 7), first token dropped, padding never a token
    held = np.concatenate([data[i, 1:lengths[i]] for i in (6, 7)])
    with torch.no_grad():
        x_hat = again.sae(torch.from_numpy(held))[0].double().numpy()
    fve = 1 - ((held - x_hat) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert again.metrics.fve == pytest.approx(fve, rel=1e-6) and again.metrics.tokens == len(held)
    assert again.metrics.l0 <= 2


def test_a_language_mixed_into_training_is_reconstructed_on_its_unseen_rows(tmp_path):
    """General text and 'fr' are sparse codes over two different dictionaries: an SAE trained on general text alone
    explains little of fr's held-out rows, one with fr's training store mixed in explains most of it."""
    general, _, _ = _sparse_store(tmp_path, "general", 24, seed=1, chunk=6)  # few zarr reads per pass
    fr_train, fr_data, fr_len = _sparse_store(tmp_path, "fr_train", 16, seed=7, chunk=8)
    more = _sparse_data(16 * 6 + 48, d=8, atoms=12, active=2, seed=7)  # the same dictionary, 48 further rows
    assert np.array_equal(more[:96], fr_data.reshape(96, 8))
    unseen = more[96:].reshape(8, 6, 8)
    sc = MultilingualConf.SAE(k=2, expansion=6, steps=300, batch_tokens=32, lr=1e-2, holdout=0.25, general_share=0.5)

    def job(languages):
        stage = sae_stage(str(tmp_path / "stages"), "g", sc, True, 0, {l: f"{l}-key" for l in languages})
        return SAEJob(stage, general.url, 5, 48, "topk", 2, TrainSpec(300, 32, 1e-2, sc.l1, 0), 0.25, True,
                      languages, sc.general_share)

    fve = {}
    for name, languages in (("alone", {}), ("mixed", {"fr": fr_train.url})):
        sae = train_sae(job(languages)).sae
        held = unseen[:, 1:].reshape(-1, 8)
        with torch.no_grad():
            x_hat = sae(torch.from_numpy(held))[0].double().numpy()
        fve[name] = 1 - ((held - x_hat) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert fve["mixed"] > 0.8 and fve["alone"] < fve["mixed"] - 0.2, fve
    trained_on = job({"fr": fr_train.url}).stage.load("layer_05").meta["trained_on"]
    assert trained_on["fr"] == {"texts": digest([f"fr_train text {i}" for i in range(16)]),
                                "tokens": sum(fr_len) - 16, "share": 0.5}
    assert trained_on["general"]["tokens"] == sum(general.lengths[:18]) - 18 and trained_on["general"]["share"] == 0.5


def test_sae_layer_measures_overlaps_once_against_python_sets(tmp_path):
    general, _, _ = _sparse_store(tmp_path, "general", 8, seed=1)
    en, en_data, en_len = _sparse_store(tmp_path, "en", 5, seed=2)
    fr, fr_data, fr_len = _sparse_store(tmp_path, "fr", 5, seed=3)
    job = _sae_job(tmp_path, general.url)
    perm = derangement(5, seed=0)
    stage = overlap_stage(job.stage.root, job.stage, {"en": "en-key", "fr": "fr-key"}, [("en", "fr")], seed=0)
    ojob = OverlapJob(job, stage, {"en": en.url, "fr": fr.url}, [("en", "fr")], perm.tolist())
    first = sae_layer(ojob)
    assert (first.trained, first.measured) == (True, True)
    again = sae_layer(ojob)
    assert (again.trained, again.measured) == (False, False) and again.overlap == first.overlap
    sae = train_sae(job).sae
    with torch.no_grad():
        sets = {lang: [set(torch.nonzero(sae.encode(torch.from_numpy(d[i, 1:n[i]])) > 0)[:, 1].tolist()) for i in range(5)]
                for lang, d, n in (("en", en_data, en_len), ("fr", fr_data, fr_len))}
    translated = np.mean([len(a & b) / len(a | b) for a, b in zip(sets["en"], sets["fr"])])
    unrelated = np.mean([len(sets["en"][i] & sets["fr"][perm[i]]) / len(sets["en"][i] | sets["fr"][perm[i]]) for i in range(5)])
    got = again.overlap.pairs["en-fr"]
    assert got.translated == pytest.approx(translated) and got.unrelated == pytest.approx(unrelated)
    assert again.overlap.size["fr"] == pytest.approx(np.mean([len(x) for x in sets["fr"]]))
    job1 = _sae_job(tmp_path, general.url, k=1)
    stage1 = overlap_stage(job1.stage.root, job1.stage, {"en": "en-key", "fr": "fr-key"}, [("en", "fr")], seed=0)
    k1 = sae_layer(OverlapJob(job1, stage1, ojob.paragraphs, ojob.pairs, ojob.perm))
    assert (k1.trained, k1.measured) == (True, True)  # another k: another SAE, so its overlaps are measured again


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
