"""Feature pages: the data each page shows (top activating contexts, language profile, density, output tokens)
against an independent computation: a plain transformers forward of one text at a time (hidden_states, no
padding) and the SAE's codes written out by hand; then the HTML at the layout attribution graphs link to.

The model actor is replaced by a local pool that runs the same actor-side function in this process (no Ray).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from local_pool import LocalPool

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.dictionaries.autoencoder import SparseAutoencoder
from lensflow.tasks.core.dictionaries.pages import (
    INDEX,
    FeatureStats,
    choose_features,
    page_href,
    page_path,
    write_site,
)
from lensflow.tasks.core.extraction import extract
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.stages import Item, Stage
from lensflow.tasks.multilingual.features import feature_pages, page_jobs
from lensflow.tasks.registry import load_config

LAYER = 2
TEXTS = {"en": ["the black cat sleeps on the warm mat", "a dog runs", "rain falls on the old town today"],
         "fr": ["le chat noir dort sur le tapis", "un chien court vite", "il pleut sur la vieille ville"]}




@pytest.fixture(scope="module")
def lm():
    return load_model(ModelConf(name="tiny-llama"))


def _codes_by_hand(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """z = ReLU(TopK_k((x / s - b_dec) W_enc^T + b_enc)), every other feature 0."""
    pre = (x / sae.scale - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(sae.k, -1).indices, True)
    return torch.where(keep, torch.relu(pre), torch.zeros(()))


def _by_hand(lm, sae, text: str) -> torch.Tensor:
    """[tokens, F] codes of resid layer LAYER for one unpadded text, first token dropped."""
    enc = lm.tokenizer([text], return_tensors="pt", truncation=True, max_length=16)
    with torch.no_grad():
        h = lm.model(**enc, output_hidden_states=True).hidden_states[LAYER][0]
        return _codes_by_hand(sae, h)[1:]


@pytest.fixture(scope="module")
def built(lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pages")
    conf = load_config(None, ["model.name=tiny-llama", f"store.root={tmp / 'store'}", "data.max_tokens=16",
                              "store.chunk_size=2", "store.positions=all", f"store.layers=[{LAYER}]",
                              "multilingual.pages.multilingual=3", "multilingual.pages.specific=2",
                              "multilingual.pages.contexts=2", "multilingual.pages.tokens=4",
                              "multilingual.pages.min_density=0"])
    stores = {lang: extract(conf, texts, LocalPool(lm), lang) for lang, texts in TEXTS.items()}
    sae = SparseAutoencoder(lm.d_model, 48, "topk", k=4, seed=3)
    with torch.no_grad():
        sae.scale.fill_(1.7)
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    sae_stage = Stage.of(str(tmp / "store"), "test/sae", None, {"k": 4})
    sae_stage.save(f"layer_{LAYER:02d}", Item(sae.state(), {}))
    job = page_jobs(conf, sae_stage, {lang: (ex.key, ex.url) for lang, ex in stores.items()}, [LAYER])[0]
    return sae, job, feature_pages(lm, job), tmp


def test_profile_density_and_contexts_match_a_plain_forward_and_hand_written_codes(lm, built):
    sae, job, pages, _ = built
    codes = {lang: [_by_hand(lm, sae, t) for t in texts] for lang, texts in TEXTS.items()}
    n_tok = {lang: sum(len(z) for z in zs) for lang, zs in codes.items()}
    assert pages.layer == LAYER and pages.width == 48 and pages.pages
    all_fired = sum((torch.cat(zs) > 0).sum(0) for zs in codes.values())
    assert pages.dead == pytest.approx(float((all_fired == 0).float().mean()))
    for page in pages.pages:
        f = page.feature
        fired = {lang: int((torch.cat(zs)[:, f] > 0).sum()) for lang, zs in codes.items()}
        means = {lang: float(torch.cat(zs)[:, f].sum()) / n_tok[lang] for lang, zs in codes.items()}
        assert page.density == pytest.approx(sum(fired.values()) / sum(n_tok.values()))
        for lang, prof in page.profile.items():
            assert prof.tokens == n_tok[lang]
            assert prof.firing_rate == pytest.approx(fired[lang] / n_tok[lang])
            assert prof.mean_activation == pytest.approx(means[lang], rel=1e-4, abs=1e-6)
            assert prof.mass_share == pytest.approx(means[lang] / sum(means.values()), rel=1e-4)
        # top contexts: every text's maximum, strongest first, at most `contexts`, only where the feature fired
        peaks = sorted(((float(z[:, f].max()), lang, row, int(z[:, f].argmax()) + 1)
                        for lang, zs in codes.items() for row, z in enumerate(zs)), reverse=True)
        peaks = [p for p in peaks if p[0] > 0][:2]
        got = [(c.value, c.source, c.row, c.position) for c in page.contexts]
        assert [g[1:] for g in got] == [p[1:] for p in peaks]
        assert [g[0] for g in got] == pytest.approx([p[0] for p in peaks], rel=1e-4)
        for c in page.contexts:
            ids = lm.tokenizer([TEXTS[c.source][c.row]], truncation=True, max_length=16)["input_ids"][0]
            lo = c.position - c.peak
            assert c.tokens == [lm.tokenizer.decode([i]) for i in ids[lo:lo + len(c.tokens)]]
            z = codes[c.source][c.row][:, f]  # position p is row p - 1 of the hand codes (first token dropped)
            shown = [float(z[p - 1]) if p >= 1 else None for p in range(lo, lo + len(c.tokens))]
            assert [a for a, s in zip(c.acts, shown) if s is not None] == pytest.approx(
                [s for s in shown if s is not None], rel=1e-4, abs=1e-6)
            assert c.acts[c.peak] == pytest.approx(c.value, rel=1e-4)


def test_output_tokens_are_the_decoder_direction_through_final_norm_and_unembedding(lm, built):
    sae, _, pages, _ = built
    for page in pages.pages:
        d = (sae.W_dec[page.feature] * sae.scale).detach()
        with torch.no_grad():
            logits = lm.model.lm_head(lm.model.model.norm(d[None]))[0]  # Llama: RMSNorm, no bias
        order = torch.argsort(logits, descending=True)
        want_top = [(lm.tokenizer.decode([int(i)]), float(logits[i])) for i in order[:4]]
        want_bottom = [(lm.tokenizer.decode([int(i)]), float(logits[i])) for i in order.flip(0)[:4]]
        assert [t for t, _ in page.top_tokens] == [t for t, _ in want_top]
        assert [v for _, v in page.top_tokens] == pytest.approx([v for _, v in want_top], rel=1e-4, abs=1e-5)
        assert [t for t, _ in page.bottom_tokens] == [t for t, _ in want_bottom]


def test_page_data_is_a_stage_found_again(lm, built):
    _, job, pages, _ = built
    assert job.stage.done(job.item)
    assert feature_pages(None, job) == pages  # found: no model needed


def test_choice_is_bounded_multilingual_first_then_each_languages_own():
    rate = np.array([[0.5, 0.1, 0.0, 0.3, 0.2, 0.0, 0.6],
                     [0.4, 0.2, 0.3, 0.0, 0.2, 0.0, 0.5]])  # [languages, features]
    tokens = np.array([100, 100])
    stats = FeatureStats(["en", "fr"], tokens, rate * 100, rate * 100, *[torch.zeros(1, 7)] * 4)
    chosen = choose_features(stats, multilingual=2, specific=1)
    # multilingual: highest lowest rate (6: 0.5, 0: 0.4); en's own: 3 (0.3 vs 0); fr's own: 2 (0.3 vs 0)
    assert chosen == {6: "multilingual", 0: "multilingual", 3: "specific:en", 2: "specific:fr"}
    wide = choose_features(stats, 0, 6)
    assert 5 not in wide  # never active: never a page
    assert wide == {3: "specific:en", 1: "specific:fr", 2: "specific:fr"}  # 1: 0.2 vs 0.1 (2x); 0, 6: not 2x


def test_site_layout_links_and_marks_the_peak(built):
    _, _, pages, tmp = built
    files = write_site([pages], tmp / "site", "tiny-llama")
    assert files[0] == tmp / "site" / INDEX
    index = files[0].read_text()
    for page in pages.pages:
        path = tmp / "site" / page_path(LAYER, page.feature)
        assert path in files
        assert f"href='{page_href(LAYER, page.feature)}'" in index
        assert (tmp / "site" / "features" / page_href(LAYER, page.feature)).resolve() == path.resolve()
        text = path.read_text()
        assert text.count('class="tok peak"') == len(page.contexts)
        assert "Language profile" in text and "../index.html" in text
    assert page_path(5, 42) == "features/layer_05/feature_00042.html"


def test_pages_logged_to_mlflow_open_with_lensflow_feature(built, tracking_uri, capsys):
    """The report's artifacts, read back by `lensflow feature LAYER:ID` (the newest finished run of the model)."""
    from mlflow.tracking import MlflowClient

    from lensflow.flows.cli import main
    from lensflow.tasks.core.tracking import RunRef, artifact_files, experiment_id, local_uri
    from lensflow.tasks.multilingual.report import log_feature_pages

    _, _, pages, _ = built
    client = MlflowClient(local_uri(tracking_uri))
    exp = experiment_id(tracking_uri, "pages-test")
    run = client.create_run(exp, tags={"flow": "multilingual", "model.name": "tiny-llama"})
    assert log_feature_pages(RunRef(tracking_uri, exp, run.info.run_id), [pages], "tiny-llama") == len(pages.pages)
    client.set_terminated(run.info.run_id, "FINISHED")
    logged = artifact_files(tracking_uri, run.info.run_id, f"features/layer_{LAYER:02d}")
    assert sorted(logged) == sorted(page_path(LAYER, p.feature) for p in pages.pages)

    page = pages.pages[0]
    args = ["--set", f"tracking.uri={tracking_uri}", "--set", "tracking.experiment=pages-test",
            "--set", "model.name=tiny-llama"]
    assert main(["feature", f"{LAYER}:{page.feature}", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(page_path(LAYER, page.feature)) and open(out[0]).read().startswith("<!doctype html>")
    c = page.contexts[0]
    assert f"{c.source} {c.row}:{c.position}" in "\n".join(out) and f"[[{c.tokens[c.peak]}]]" in "\n".join(out)
    missing = next(f for f in range(pages.width) if f not in {p.feature for p in pages.pages})
    assert main(["feature", f"{LAYER}:{missing}", *args]) == 2
    assert "has no page" in capsys.readouterr().err
