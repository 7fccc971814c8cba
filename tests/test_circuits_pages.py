"""Transcoder feature pages for the features a graph shows: their language profile against plain torch hooks on a
tiny random Gemma 3, their folder apart from SAE pages, and the graph page's links landing on written pages."""

from __future__ import annotations

import json

import pytest
import torch

from lensflow.tasks.circuits.attribution import attribute
from lensflow.tasks.circuits.feature_pages import computed_features, proposed_supernodes, transcoder_pages
from lensflow.tasks.circuits.report import write_graph
from lensflow.tasks.circuits.supernodes import load_supernodes
from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.models import load_model

TEXTS = {"en": ["The opposite of \"small\" is \"big\".", "The cat sleeps on the warm mat."],
         "fr": ["Le contraire de \"petit\" est \"grand\".", "Le chat dort sur le tapis chaud."]}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    lm = load_model(ModelConf(name="tiny-gemma3"))
    tcs = {}
    for l in range(lm.n_layers):
        tc = Transcoder(lm.d_model, lm.d_model, 48, 4, seed=l)
        with torch.no_grad():
            tc.b_enc += 0.3
        tcs[l] = tc.requires_grad_(False)
    return lm, tcs


def _firing_rate(lm, tc: Transcoder, layer: int, texts: list[str], feature: int) -> float:
    """Share of real tokens (the first excepted) where the feature is active, one text at a time, plain hooks."""
    fired = total = 0
    for t in texts:
        ids = lm.tokenizer(t, return_tensors="pt", truncation=True, max_length=32).input_ids
        got = {}
        h = lm.mlp(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0][0].float()))
        try:
            with torch.no_grad():
                lm.model(input_ids=ids, use_cache=False)
        finally:
            h.remove()
        z = tc.encode(got["x"])[1:, feature]
        fired, total = fired + int((z > 0).sum()), total + z.shape[0]
    return fired / total


def test_pages_profile_folder_and_links(tiny, tmp_path):
    lm, tcs = tiny
    g = attribute(lm, tcs, TEXTS["en"][0], batch_rows=64, max_feature_rows=12)
    wanted = computed_features([g])
    assert sum(len(v) for v in wanted.values()) == len({(l, f) for l, _, f in g.features[g.rows_computed[:g.n_features]].tolist()})
    pages = transcoder_pages(lm, tcs, TEXTS, wanted)
    got = {(p.layer, p.feature): p for lp in pages for p in lp.pages}
    assert set(got) == {(l, f) for l, fs in wanted.items() for f in fs}
    for (l, f), page in list(got.items())[:6]:
        for lang, texts in TEXTS.items():
            assert page.profile[lang].firing_rate == pytest.approx(_firing_rate(lm, tcs[l], l, texts, f), abs=1e-9)

    proposed = proposed_supernodes(pages, g, ["en", "fr"])
    files, _ = write_graph(g, lm.name, "KEY", 0.8, 0.98, out_dir=tmp_path, proposed=proposed, pages=pages)
    folder = tmp_path / files.slug
    assert not (folder / "features").exists() and (folder / "transcoders" / "index.html").is_file()
    data = json.loads(open(files.json, encoding="utf-8").read())
    links = [n["feature_page"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert links and all(p.startswith("transcoders/layer_") and (folder / p).is_file() for p in links)
    assert proposed  # read back as the user's YAML, every member a feature with a page
    back = load_supernodes(folder / "supernodes.proposed.yaml", lm.n_layers, 48)
    assert back == proposed and all(m in got for ms in back.values() for m in ms)
    assert {s[0] for s in data["qParams"]["supernodes"]} <= set(proposed)
