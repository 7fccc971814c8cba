"""Future Lens: data preparation, metrics, probes and transplant methods on tiny random models, each checked
against an independent computation (plain transformers forward passes, numpy references)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import load_model
from lensflow.tasks.future_lens.metrics import score
from lensflow.tasks.future_lens.ngram import NGram, context_for
from lensflow.tasks.future_lens.ridge import RidgeStats, fit_ridge
from lensflow.tasks.future_lens.samples import (
    Block,
    PrepItem,
    Window,
    candidate_windows,
    memory_batches,
    prepare_windows,
    scan_texts,
)
from lensflow.tasks.future_lens.soft_prompt import (
    evaluate_prompt,
    prompt_embeddings,
    train_soft_prompt,
    transplant_logits,
)
from lensflow.tasks.future_lens.vocab_probe import fit_vocab_probe

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


def _windows(lm, max_tokens=40):
    """Every position of the texts as a candidate (tiny random models rarely predict the text's next token)."""
    scans = scan_texts(lm, (TEXTS, max_tokens, 4))
    return scans, [Window(t, tuple(sc["ids"][: p + 1]), sc["ids"][p + 1])
                   for t, sc in enumerate(scans) for p in range(3, min(len(sc["ids"]) - 1, max_tokens), 9)]


def test_scan_finds_exactly_the_model_correct_positions(lm):
    scans = scan_texts(lm, (TEXTS, 40, 4))
    for text, sc in zip(TEXTS, scans):
        ids = lm.tokenizer(text)["input_ids"][:41]
        assert sc["ids"] == ids
        pred = _plain_logits(lm, ids).argmax(-1)
        want = [p for p in range(3, 40) if int(pred[p]) == ids[p + 1]]
        assert sc["positions"] == want
    wins = candidate_windows(scans)
    assert all(w.prefix_ids[-1] == scans[w.text_id]["ids"][len(w.prefix_ids) - 1] for w in wins)


def test_prepare_matches_plain_forward(lm):
    """Greedy continuation with the padded KV-cache loop == greedy decoding by full unpadded forward passes;
    decoded final states == the model's logits at T..T+3; keep == (greedy next == text's next token)."""
    _, ws = _windows(lm)
    assert len({len(w.prefix_ids) for w in ws}) > 1  # right padding really happens
    out = prepare_windows(lm, PrepItem(ws, max_tokens=40, n_future=4))
    for i, w in enumerate(ws):
        seq = list(w.prefix_ids)
        for k in range(4):
            logits = _plain_logits(lm, seq)[-1]
            assert int(logits.argmax()) == out["greedy"][i, k]
            dec = lm.decode(torch.from_numpy(out["final"][i, k]))
            torch.testing.assert_close(dec, logits, atol=1e-4, rtol=1e-4)
            seq.append(int(logits.argmax()))
        assert bool(out["keep"][i]) == (out["greedy"][i, 0] == w.next_id)
        assert out["x_last"][i] == w.prefix_ids[-1]
        assert lm.tokenizer(out["prefix"][i])["input_ids"] == list(w.prefix_ids)


def test_prepare_drops_prefixes_that_retokenize_differently(lm):
    ids = tuple(lm.tokenizer("hello world")["input_ids"])
    out = prepare_windows(lm, PrepItem([Window(0, ids, 5), Window(0, ids, 5)], max_tokens=4, n_future=4))  # truncated
    assert not out["keep"].any()


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
        for forced in (True, False):
            m = evaluate_prompt(lm, prompt, lm.n_layers, h, greedy, batch=2, ks=(1,), teacher_forcing=forced)
            assert m[0].p_at_1 == 1.0


def test_score_against_naive_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 30, generator=g)
    targets = torch.randint(0, 30, (40,), generator=g)
    m = score(logits, targets, ks=(1, 3))
    lp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    order = np.argsort(-logits.numpy(), axis=1)
    for k in (1, 3):
        assert m.p_at[k] == pytest.approx(np.mean([t in order[i, :k] for i, t in enumerate(targets.numpy())]))
    assert m.surprisal == pytest.approx(np.mean([-lp[i, t] / math.log(2) for i, t in enumerate(targets.numpy())]), rel=1e-5)


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
    # validation selection, one penalty per output block: exact signal -> light, pure noise -> heavy shrinkage
    def stats(rows):
        hv = torch.randn(rows, 8, generator=g)
        st = RidgeStats()
        st.add(hv, torch.cat([hv @ torch.ones(8, 5), torch.randn(rows, 5, generator=g)], 1))
        return st

    _, _, info = fit_ridge(stats(300), stats(200), [1e-6, 1e3], groups=2)
    assert info["ridge"] == [1e-6, 1e3]


def test_vocab_probe_learns_a_linear_code():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 16
    h = torch.randn(n, d, generator=g)
    targets = torch.stack([h[:, :4].argmax(1) * 10 + 3, h[:, 4:8].argmax(1) * 7 + 1], 1)
    vocab = torch.unique(targets)
    probe, losses = fit_vocab_probe(memory_batches(Block(targets, h), 64), vocab, h.mean(0), h.std(0),
                                    n_future=2, rank=8, steps=300, lr=0.03, weight_decay=0.0)
    assert losses[-1] < 0.5 * losses[0]
    for k in range(2):
        lp = probe.logprobs(h, k, vocab_size=64)
        assert torch.allclose(lp.exp().sum(1), torch.ones(n), atol=1e-4)
        assert score(lp, targets[:, k], ks=(1,)).p_at_1 > 0.9


def test_soft_prompt_training_lowers_kl():
    """A few Adam steps on one batch must reduce the KL to the model's own distributions."""
    lm = load_model(ModelConf(name="tiny-llama", device="cpu"))
    _, ws = _windows(lm)
    prep = prepare_windows(lm, PrepItem(ws, max_tokens=40, n_future=3))
    texts = list(prep["prefix"])
    enc = lm.encode(texts)
    with trace(lm, reads=[Read("resid", 2, position=enc["last"])]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    data = Block(torch.from_numpy(prep["greedy"]), t["resid", 2], torch.from_numpy(prep["final"]))
    init = prompt_embeddings(lm, "Tell me about", length=10)
    assert init.shape == (10, lm.d_model)
    _, losses = train_soft_prompt(lm, 2, itertools.repeat(data), init, steps=10, lr=0.1)
    assert np.mean(losses[-3:]) < 0.8 * losses[0]


@pytest.fixture(scope="module")
def tiny_samples(tmp_path_factory):
    """A real (tiny) sample set: activation store written by the extraction's own chunk code, targets by
    prepare_windows; no Ray needed. Returns conf, lm, targets and the extraction, as the flow has them."""
    from lensflow.tasks.core import store
    from lensflow.tasks.core.extraction import ChunkJob, Extraction, compute_chunk, plan
    from lensflow.tasks.core.models import describe
    from lensflow.tasks.future_lens.samples import SampleTargets, write_targets
    from lensflow.tasks.registry import load_config

    lm = load_model(ModelConf(name="tiny-llama", device="cpu"))
    root = tmp_path_factory.mktemp("fl")
    conf = load_config(None, ["model.name=tiny-llama", f"store.root={root / 'store'}", "data.max_tokens=40",
                              "store.chunk_size=8", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                              "future_lens.soft_prompt_steps=2", "future_lens.soft_prompt_batch=4",
                              "future_lens.vocab_steps=3", "future_lens.vocab_batch=8", "future_lens.eval_batch=4",
                              "future_lens.ks=[1, 5]", "future_lens.causal_layers=[2]", "future_lens.linear_layers=[2]"])
    _, ws = _windows(lm)
    prep = prepare_windows(lm, PrepItem(ws, max_tokens=40, n_future=4))
    texts = [str(p) for p in prep["prefix"]]
    stage, spec = plan(conf, texts, describe(lm), "fl")
    store.create(stage.url, spec, texts)
    for c in range(spec.n_chunks):
        store.write_chunk(stage.url, c, spec.rows(c), compute_chunk(lm, ChunkJob(stage.url, c, texts[spec.rows(c)], spec)))
    store.mark_complete(stage.url)
    turl = str(root / "targets")
    write_targets(turl, {k: prep[k] for k in ("greedy", "final", "x_last", "prefix")}, {"n_train": len(texts) - 6}, 8)
    targets = SampleTargets(turl, "targets-key", len(texts) - 6, 6, len(texts), len(texts), [0, 1], computed=True)
    return conf, lm, targets, Extraction(stage.url, stage.key, len(texts), spec.n_chunks, spec.n_chunks, 0, 0.0)


def test_stored_states_feed_the_transplant_exactly(tiny_samples):
    """The store's last-layer state of each prefix, transplanted into any prompt, reproduces the greedy token."""
    from lensflow.tasks.future_lens.samples import read_block

    conf, lm, targets, ex = tiny_samples
    s = targets.samples(ex.url, lm.vocab_size, 8)
    d = read_block(s, lm.n_layers, s.test)
    m = evaluate_prompt(lm, prompt_embeddings(lm, "Tell me about"), lm.n_layers, d.h, d.greedy, 3, (1,))
    assert m[0].p_at_1 == 1.0


def test_layer_stages_are_published_then_found_without_recomputing(tiny_samples, monkeypatch):
    """Every per-layer job trains and scores once and publishes both; a second run finds them (the trainers and
    scorers are never called) and gets the same metrics, which equal the stored state's scores computed
    directly; each run logs the state to its own MLflow run, and the grid reads the soft prompt back from it."""
    import lensflow.tasks.future_lens.methods as fl
    from lensflow.tasks.core import tracking
    from lensflow.tasks.core.models import describe
    from lensflow.tasks.future_lens.report import log_layers
    from lensflow.tasks.future_lens.samples import read_block

    conf, lm, targets, ex = tiny_samples
    info = describe(lm)

    def run_all(run):
        p = fl.plan(conf, info, targets, ex)
        on_lm = [(fl.soft_prompt_job, "soft_prompt"), (fl.fixed_prompt_job, "fixed_prompt"),
                 (fl.linear_hidden_job, "linear_hidden")]
        results = [fn(lm, j) for fn, m in on_lm for j in p.jobs[m]] + [fl.linear_vocab_job(j) for j in p.jobs["linear_vocab"]]
        log_layers(run, p)  # as the flow does: the report reads each trained layer back from its stage
        return p, results

    with tracking.flow_run(conf, "future-lens") as run:
        p, first = run_all(run)
    assert [r.method for r in first] == ["soft_prompt", "fixed_prompt_p0", "fixed_prompt_p1", "linear_hidden", "linear_vocab"]
    assert all(r.evaluated for r in first) and [r.trained for r in first] == [True, False, False, True, True]
    soft = p.jobs["soft_prompt"][0]
    prompt = soft.trained.load("layer_02").tensors["prompt"]
    d = read_block(p.samples, 2, p.samples.test)
    assert first[0].metrics == evaluate_prompt(lm, prompt, 2, d.h, d.greedy, 4, (1, 5))
    assert first[1].metrics == evaluate_prompt(lm, prompt_embeddings(lm, conf.future_lens.fixed_prompts[0]), 2, d.h,
                                               d.greedy, 4, (1, 5))

    def boom(*a, **k):
        raise AssertionError("recomputed")

    for name in ("fit_ridge", "fit_vocab_probe", "train_soft_prompt", "evaluate_prompt", "decoded_scores", "score"):
        monkeypatch.setattr(fl, name, boom)
    with tracking.flow_run(conf, "future-lens") as run2:
        tracking.tag_model(run2, info)  # as the flow does: the grid accepts only a run of the same weights
        _, again = run_all(run2)
    assert not any(r.trained or r.evaluated for r in again)
    assert [r.metrics for r in again] == [r.metrics for r in first]
    logged = tracking.load_tensors(conf.tracking.uri, run2.run_id, "soft_prompts/layer_02.safetensors")["prompt"]
    assert torch.equal(logged, prompt)

    # the grid reads the soft prompt back from the second run: one row (layer 2) by one column per prompt token
    from lensflow.tasks.future_lens.grid import render_grid

    out = render_grid(conf, "ab cd", run_id=run2.run_id, out_dir=targets.url + "_grid")
    page = open(out["html"]).read()
    assert page.count("<tr><th>2</th>") == 1 and page.count("<td ") == len(lm.tokenizer("ab cd")["input_ids"])
    assert open(out["png"], "rb").read(4) == b"\x89PNG"
