"""Transcoders in the multilingual analysis: per-language FVE of the MLP output and the translated / unrelated
overlap of active transcoder features, against a plain transformers forward of one text at a time with hooks of our
own and the transcoder's math written out here, and Python sets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from local_pool import LocalPool

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.dictionaries.pages import layer_pages, store_codes
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.extraction import extract
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.core.store import Activations
from lensflow.tasks.multilingual.overlap import derangement
from lensflow.tasks.multilingual.transcoders import (
    TranscoderOverlapJob,
    overlap_stage,
    training_texts,
    transcoder_layer,
)
from lensflow.tasks.registry import load_config

BLOCK = 3
TEXTS = {"en": ["the black cat sleeps", "a dog runs fast", "rain falls on the town", "we eat bread"],
         "fr": ["le chat noir dort", "un chien court vite", "il pleut sur la ville", "nous mangeons du pain"]}




def _pairs_by_hand(lm, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP input, MLP output) of block BLOCK for one unpadded text, first token dropped (Llama: no post-MLP norm)."""
    seen = {}
    mlp = lm.model.model.layers[BLOCK].mlp
    h1 = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0][0].clone()))
    h2 = mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0].clone()))
    with torch.no_grad():
        lm.model(**lm.tokenizer([text], return_tensors="pt", truncation=True, max_length=16))
    h1.remove(), h2.remove()
    return seen["in"][1:], seen["out"][1:]


def _by_hand(tc: Transcoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = ReLU(TopK_k(W_enc (x / s_in - b_in) + b_enc)), y = (z W_dec + b_out) s_out."""
    pre = (x / tc.scale_in - tc.b_in) @ tc.W_enc.T + tc.b_enc
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(tc.k, -1).indices, True)
    z = torch.where(keep, torch.relu(pre), torch.zeros(()))
    return z, (z @ tc.W_dec + tc.b_out) * tc.scale_out


def test_per_language_fve_and_overlap_match_a_plain_forward(tmp_path):
    lm = load_model(ModelConf(name="tiny-llama"))
    conf = load_config(None, ["model.name=tiny-llama", f"store.root={tmp_path}", "data.max_tokens=16",
                              "store.chunk_size=3", "store.positions=all", "store.layers=[1, 3]",
                              "store.sites=[resid, mlp_in, mlp_out]"])
    stores = {lang: extract(conf, texts, LocalPool(lm), lang) for lang, texts in TEXTS.items()}
    tc = Transcoder(lm.d_model, lm.d_model, 40, k=3, seed=2)
    pairs = {lang: [_pairs_by_hand(lm, t) for t in texts] for lang, texts in TEXTS.items()}
    with torch.no_grad():
        tc.fit(torch.cat([x for x, _ in pairs["en"]]), torch.cat([y for _, y in pairs["en"]]))
        tc.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    trained = Stage.of(str(tmp_path), "dictionaries/transcoders", None, {"test": 1})
    metrics = {"fve": 0.5, "l0": 3.0, "dead": 0.1, "loss_clean": 1.0, "loss_spliced": 1.5}
    trained.save(f"layer_{BLOCK:02d}", Item(tc.state(), {"metrics": metrics}))
    perm = derangement(4, seed=0)
    stage = overlap_stage(str(tmp_path), trained, {l: ex.key for l, ex in stores.items()}, [("en", "fr")], 0)
    job = TranscoderOverlapJob(trained, stage, BLOCK, {l: ex.url for l, ex in stores.items()}, [("en", "fr")],
                               perm.tolist(), skip_first=True)
    got = transcoder_layer(job)
    assert got.measured and got.metrics == metrics and not transcoder_layer(job).measured

    sets = {}
    with torch.no_grad():
        for lang, ps in pairs.items():
            y = torch.cat([y for _, y in ps]).double()
            y_hat = torch.cat([_by_hand(tc, x)[1] for x, _ in ps]).double()
            fve = 1 - float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
            assert got.fve_lang[lang] == pytest.approx(fve, abs=1e-5)
            sets[lang] = [set(torch.nonzero(_by_hand(tc, x)[0] > 0)[:, 1].tolist()) for x, _ in ps]
    jac = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    en, fr = sets["en"], sets["fr"]
    assert got.overlap.pairs["en-fr"].translated == pytest.approx(np.mean([jac(en[i], fr[i]) for i in range(4)]))
    assert got.overlap.pairs["en-fr"].unrelated == pytest.approx(np.mean([jac(en[i], fr[perm[i]]) for i in range(4)]))
    assert got.overlap.size["fr"] == pytest.approx(np.mean([len(s) for s in fr]))

    # the same transcoder's feature pages: codes read on mlp_in, decoder directions adding to mlp_out
    sources = {l: store_codes(tc.encode, Activations(ex.url), BLOCK, "mlp_in") for l, ex in stores.items()}
    pages = layer_pages(lm, sources, tc.decoder_vectors(), BLOCK, "transcoder", 2, 1, 2, 3)
    assert pages.dictionary == "transcoder" and pages.pages
    with torch.no_grad():
        z = {lang: [_by_hand(tc, x)[0] for x, _ in ps] for lang, ps in pairs.items()}
    for page in pages.pages:
        f = page.feature
        peaks = sorted(((float(c[:, f].max()), lang, row, int(c[:, f].argmax()) + 1)
                        for lang, cs in z.items() for row, c in enumerate(cs)), reverse=True)
        peaks = [p for p in peaks if p[0] > 0][:2]
        assert [(c.source, c.row, c.position) for c in page.contexts] == [p[1:] for p in peaks]
        assert [c.value for c in page.contexts] == pytest.approx([p[0] for p in peaks], rel=1e-4)


def test_training_texts_hold_out_general_text_last():
    assert training_texts({"en": ["a", "b"], "fr": ["c"]}, ["g1", "g2"]) == ["a", "b", "c", "g1", "g2"]


def test_a_k_wider_than_the_transcoder_is_one_line_before_any_work(make_conf):
    from lensflow.tasks.core.config import ConfigError
    from lensflow.tasks.multilingual.plan import check_inputs

    with pytest.raises(ConfigError, match=r"^config key 'multilingual.transcoders.train.k': 80 exceeds .* 64"):
        check_inputs(make_conf("multilingual.transcoders.train.width=64", "multilingual.transcoders.train.k=80"))
