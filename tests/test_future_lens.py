"""Future Lens: data preparation, metrics, probes and transplant methods on tiny random models, each checked
against an independent computation (plain transformers forward passes, numpy references)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.config import ModelConf
from tasks.future_lens import (PrepItem, RidgeStats, Window, fit_ridge, fit_vocab_probe, make_windows, memory_batches,
                               prepare_windows, score)
from tasks.hooks import Read, trace
from tasks.models import load_model
from tasks.ngram import NGram, context_for
from tasks.soft_prompt import evaluate_prompt, prompt_embeddings, train_soft_prompt, transplant_logits

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the door.",
    "A journey of a thousand miles begins with a single step, and every step teaches something new.",
    "Python is a programming language that lets you work quickly and integrate systems more effectively.",
]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def lm(request):
    return load_model(ModelConf(name=request.param, device="cpu"))


def _plain_logits(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids])).logits[0]


def test_windows_cut_at_word_boundaries():
    ws = make_windows(TEXTS, per_text=3, min_chars=10, max_chars=60, seed=1)
    assert len(ws) == 9
    for w in ws:
        assert w.continuation.startswith(" ") and not w.prefix.endswith(" ")
        assert w.prefix + w.continuation == TEXTS[w.text_id]
    assert ws == make_windows(TEXTS, per_text=3, min_chars=10, max_chars=60, seed=1)


def test_prepare_matches_plain_forward(lm):
    """Greedy continuation with the padded KV-cache loop == greedy decoding by full unpadded forward passes;
    decoded final states == the model's logits at T..T+3; keep == (greedy next == text's next token)."""
    ws = make_windows(TEXTS, per_text=3, min_chars=10, max_chars=60, seed=0)
    out = prepare_windows(lm, PrepItem(ws, max_tokens=64, n_future=4))
    assert len({len(w.prefix) for w in ws}) > 1  # right padding really happens
    for i, w in enumerate(ws):
        ids = lm.tokenizer(w.prefix)["input_ids"]
        seq = list(ids)
        for k in range(4):
            logits = _plain_logits(lm, seq)[-1]
            assert int(logits.argmax()) == out["greedy"][i, k]
            dec = lm.decode(torch.from_numpy(out["final"][i, k]))
            torch.testing.assert_close(dec, logits, atol=1e-4, rtol=1e-4)
            seq.append(int(logits.argmax()))
        nxt = lm.tokenizer(w.continuation, add_special_tokens=False)["input_ids"][0]
        assert bool(out["keep"][i]) == (out["greedy"][i, 0] == nxt)
        assert out["x_last"][i] == ids[-1]


def test_prepare_drops_prefixes_longer_than_max_tokens(lm):
    ws = [Window(0, TEXTS[0][:60], TEXTS[0][60:])]
    out = prepare_windows(lm, PrepItem(ws, max_tokens=8))
    assert not out["keep"][0]


def test_transplant_of_own_state_is_plain_forward(lm):
    """Transplanting the prompt's own state at layer l changes nothing: the teacher-forced transplant logits
    equal a plain forward over prompt + forced tokens (both the KV-cache path and the full-sequence path)."""
    prompt_ids = lm.tokenizer("Tell me about")["input_ids"]
    forced = torch.tensor([[5, 77, 120], [9, 30, 200]])
    emb = lm.model.get_input_embeddings()(torch.tensor(prompt_ids))
    for layer in (0, 2, lm.n_layers):
        with trace(lm, reads=[Read("resid", layer, position=len(prompt_ids) - 1)]) as t:
            lm.model(input_ids=torch.tensor([prompt_ids]))
        h = t["resid", layer].expand(2, -1)
        for cache in (True, False):
            with torch.no_grad():
                got = transplant_logits(lm, emb, layer, h, forced, use_cache=cache)
            for r in range(2):
                want = _plain_logits(lm, prompt_ids + forced[r].tolist())[len(prompt_ids) - 1:]
                torch.testing.assert_close(got[r], want, atol=1e-4, rtol=1e-4)


def test_last_layer_transplant_reproduces_model_prediction(lm):
    """N=0 at the last layer: any prompt (fixed or random soft) + the final-layer state of T predicts exactly
    the model's own next token: Precision@1 = 1.0 against a plain forward pass."""
    hs, preds = [], []
    for text in TEXTS:
        ids = lm.tokenizer(text[:40])["input_ids"]
        with trace(lm, reads=[Read("resid", lm.n_layers, position=len(ids) - 1)]) as t:
            lm.model(input_ids=torch.tensor([ids]))
        hs.append(t["resid", lm.n_layers][0])
        preds.append(int(_plain_logits(lm, ids)[-1].argmax()))
    h, preds = torch.stack(hs), torch.tensor(preds)
    greedy = torch.stack([preds, preds], 1)  # N=1 tokens are irrelevant to N=0
    for prompt in (prompt_embeddings(lm, "Hello! Could you please tell me more about"), torch.randn(10, lm.d_model)):
        m = evaluate_prompt(lm, prompt, lm.n_layers, h, greedy, batch=2, ks=(1,))
        assert m[0]["p_at_1"] == 1.0


def test_score_against_naive_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 30, generator=g)
    targets = torch.randint(0, 30, (40,), generator=g)
    m = score(logits, targets, ks=(1, 3))
    lp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    order = np.argsort(-logits.numpy(), axis=1)
    for k in (1, 3):
        assert m[f"p_at_{k}"] == pytest.approx(np.mean([t in order[i, :k] for i, t in enumerate(targets.numpy())]))
    assert m["surprisal"] == pytest.approx(np.mean([-lp[i, t] / math.log(2) for i, t in enumerate(targets.numpy())]), rel=1e-5)


def test_ngram_witten_bell_by_hand():
    model = NGram(order=3, vocab_size=5).fit([[0, 1, 2, 1, 2, 1, 3]])
    p = model.probs((1,))
    assert p.sum() == pytest.approx(1.0)
    # after 1: seen 2 (twice) and 3 (once): total 3, types 2; unigram add-one over 5 symbols, 7 tokens
    uni = (np.array([1, 3, 2, 1, 0]) + 1) / 12
    want = uni * 2 / 5
    want[2] += 2 / 5
    want[3] += 1 / 5
    np.testing.assert_allclose(p, want)
    assert int(np.argmax(model.probs((1, 2)))) == 1
    assert context_for(7, [8, 9, 10], 0, 4) == (7,)
    assert context_for(7, [8, 9, 10], 1, 4) == (8,)  # the paper's bigram: T+2 from T+1
    assert context_for(7, [8, 9, 10], 3, 4) == (8, 9, 10)


def test_streamed_ridge_equals_least_squares():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 8, generator=g) * torch.linspace(0.1, 10, 8) + 3
    y = h @ torch.randn(8, 5, generator=g) + 0.01 * torch.randn(300, 5, generator=g) - 2
    stats = RidgeStats()
    for i in range(0, 300, 70):  # uneven blocks
        stats.add(h[i : i + 70], y[i : i + 70])
    w, b, _ = fit_ridge(stats, None, [1e-10])
    x = torch.cat([h, torch.ones(300, 1)], 1).double()
    ref = torch.linalg.lstsq(x, y.double()).solution
    torch.testing.assert_close(w.double(), ref[:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.double(), ref[8], atol=1e-3, rtol=1e-3)
    # validation selection: with pure-noise targets, heavy shrinkage must win
    val = RidgeStats()
    val.add(torch.randn(200, 8, generator=g), torch.randn(200, 5, generator=g))
    noise = RidgeStats()
    noise.add(h, torch.randn(300, 5, generator=g))
    _, _, info = fit_ridge(noise, val, [1e-6, 1e3])
    assert info["ridge"] == 1e3


def test_vocab_probe_learns_a_linear_code():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 16
    h = torch.randn(n, d, generator=g)
    targets = torch.stack([h[:, :4].argmax(1) * 10 + 3, h[:, 4:8].argmax(1) * 7 + 1], 1)
    vocab = torch.unique(targets)
    probe, losses = fit_vocab_probe(memory_batches({"h": h, "greedy": targets}, 64), vocab, h.mean(0), h.std(0),
                                    n_future=2, rank=8, steps=300, lr=0.03, weight_decay=0.0)
    assert losses[-1] < 0.5 * losses[0]
    for k in range(2):
        lp = probe.logprobs(h, k, vocab_size=64)
        assert torch.allclose(lp.exp().sum(1), torch.ones(n), atol=1e-4)
        assert score(lp, targets[:, k], ks=(1,))["p_at_1"] > 0.9


def test_soft_prompt_training_lowers_kl():
    """A few Adam steps on one batch must reduce the KL to the model's own distributions."""
    lm = load_model(ModelConf(name="tiny-llama", device="cpu"))
    ws = make_windows(TEXTS, per_text=4, min_chars=10, max_chars=60, seed=0)
    prep = prepare_windows(lm, PrepItem(ws, max_tokens=64, n_future=3))
    texts = [w.prefix for w in ws]
    enc = lm.encode(texts)
    with trace(lm, reads=[Read("resid", 2, position=enc["last"])]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    data = {"h": t["resid", 2], "greedy": torch.from_numpy(prep["greedy"]), "final": torch.from_numpy(prep["final"])}
    init = prompt_embeddings(lm, "Tell me about", length=10)
    assert init.shape == (10, lm.d_model)
    _, losses = train_soft_prompt(lm, 2, memory_batches(data, batch=len(ws)), init, steps=30, lr=0.2)
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
