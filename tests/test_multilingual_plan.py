"""The multilingual experiment's decisions (tasks/multilingual_plan.py and the stage keys): which layers, pairs
and baseline, the stores it extracts, and what each per-layer stage's key depends on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lensflow.tasks.config import ConfigError, MultilingualConf
from lensflow.tasks.data import builtin_texts
from lensflow.tasks.extraction import Extraction
from lensflow.tasks.models import ModelInfo
from lensflow.tasks.multilingual_plan import choose_layers, load_inputs, sae_jobs, store_confs
from lensflow.tasks.overlap import parse_pairs
from lensflow.tasks.sae import SAE_PARAMS, sae_stage
from lensflow.tasks.stages import ModelId


def test_choose_layers_default_stride_keeps_zero_and_the_last_layer():
    assert choose_layers(MultilingualConf(), 30) == list(range(0, 31, 3))
    assert choose_layers(MultilingualConf(layer_stride=3), 4) == [0, 3, 4]
    assert choose_layers(MultilingualConf(layers=[4, 1, 1]), 4) == [1, 4]
    with pytest.raises(ConfigError, match=r"multilingual\.layers.*\[5\] out of range 0\.\.4"):
        choose_layers(MultilingualConf(layers=[0, 5]), 4)


def test_pairs_choice():
    langs = ["en", "fr", "es"]
    assert parse_pairs(langs, None) == [("en", "fr"), ("en", "es"), ("fr", "es")]
    assert parse_pairs(langs, ["es-en"]) == [("es", "en")]
    for bad in ("en-de", "en", "fr-fr"):
        with pytest.raises(ConfigError, match=f"multilingual.pairs.*'{bad}'"):
            parse_pairs(langs, [bad])


def test_inputs_baseline_is_a_seeded_derangement(make_conf, tmp_path):
    lines = {lang: [f"{lang} paragraph {i}." for i in range(9)] for lang in ("en", "de")}
    for lang, text in lines.items():
        (tmp_path / f"{lang}.txt").write_text("\n".join(text) + "\n")
    args = ["multilingual.languages=[en, de]", f"multilingual.files={{en: {tmp_path / 'en.txt'}, de: {tmp_path / 'de.txt'}}}",
            "multilingual.sae.train_prompts=7"]
    inputs = load_inputs(make_conf(*args))
    assert inputs.corpus == lines and inputs.pairs == [("en", "de")] and inputs.n_paragraphs == 9
    assert sorted(inputs.perm) == list(range(9)) and all(inputs.perm[i] != i for i in range(9))
    assert np.array_equal(load_inputs(make_conf(*args)).perm, inputs.perm)
    perms = {tuple(load_inputs(make_conf(*args, f"multilingual.seed={s}")).perm) for s in range(4)}
    assert len(perms) > 1  # the seed chooses it
    assert inputs.general == builtin_texts(7)  # data.* texts, capped at sae.train_prompts
    with pytest.raises(ConfigError, match="multilingual.pairs"):
        load_inputs(make_conf(*args, "multilingual.pairs=[en-fr]"))


def test_store_confs_keep_every_token_of_the_chosen_layers(make_conf):
    general, paragraphs = store_confs(make_conf("multilingual.paragraph_tokens=40", "store.positions=last"), [0, 2])
    for c in (general, paragraphs):
        assert (c.store.positions, c.store.layers, c.store.sites) == ("all", [0, 2], ["resid"])
    assert (general.data.max_tokens, paragraphs.data.max_tokens) == (16, 40)


def _jobs(conf, general_key="g1"):
    info = ModelInfo(ModelId("tiny", None, "float32", "w", "t"), 4, 64, 4, 16, 257)
    general = Extraction("/s/general", general_key, 16, 2, 0, 0, 0.0)
    paragraphs = {lang: Extraction(f"/s/{lang}", f"{lang}-key", 6, 1, 0, 0, 0.0) for lang in ("en", "fr")}
    inputs = load_inputs(conf)
    return sae_jobs(conf, info, general, paragraphs, [0, 3], inputs, None)


def test_sae_key_moves_with_each_sae_setting_and_the_store_only(make_conf):
    base = sae_stage("/root", "g1", MultilingualConf.SAE(), skip_first=True, seed=0)
    assert sae_stage("/other", "g1", MultilingualConf.SAE(), True, 0).key == base.key  # the root is not identity
    changed = {"activation": "relu", "expansion": 2, "k": 8, "l1": 0.5, "steps": 7, "batch_tokens": 8, "lr": 0.1,
               "holdout": 0.3}
    assert set(changed) == set(SAE_PARAMS)
    keys = {sae_stage("/root", "g1", MultilingualConf.SAE(**{p: v}), True, 0).key for p, v in changed.items()}
    keys |= {sae_stage("/root", "g2", MultilingualConf.SAE(), True, 0).key,
             sae_stage("/root", "g1", MultilingualConf.SAE(), False, 0).key,
             sae_stage("/root", "g1", MultilingualConf.SAE(), True, 1).key}
    assert len(keys) == len(changed) + 3 and base.key not in keys
    # train_prompts is not an SAE setting: it changes the general store's key instead
    assert sae_stage("/root", "g1", MultilingualConf.SAE(train_prompts=9), True, 0).key == base.key


def test_sae_jobs_wire_each_layer_to_its_items_and_keys(make_conf):
    conf = make_conf("multilingual.languages=[en, fr]", "multilingual.sae.expansion=3")
    jobs = _jobs(conf)
    assert [j.sae.layer for j in jobs] == [0, 3] and [j.sae.item for j in jobs] == ["layer_00", "layer_03"]
    assert all(j.sae.width == 192 and j.sae.url == "/s/general" and j.paragraphs == {"en": "/s/en", "fr": "/s/fr"}
               for j in jobs)
    assert jobs[0].stage.url.startswith(conf.store.root) and "/multilingual/overlap/" in jobs[0].stage.url
    stage_keys = {(j.sae.stage.key, j.stage.key) for j in jobs}
    assert len(stage_keys) == 1  # one SAE stage and one overlap stage, one item per layer
    moved = [_jobs(make_conf("multilingual.languages=[en, fr]", "multilingual.sae.expansion=3", extra))[0]
             for extra in ("multilingual.seed=1", "multilingual.pairs=[fr-en]")]
    moved.append(_jobs(conf, general_key="g2")[0])
    sae_keys = [j.sae.stage.key for j in moved]
    overlap_keys = [j.stage.key for j in moved]
    assert sae_keys[1] == jobs[0].sae.stage.key  # pairs do not touch the SAEs
    assert jobs[0].stage.key not in overlap_keys and len(set(overlap_keys)) == 3
    assert all(a != b for a, b in itertools.combinations([jobs[0].sae.stage.key, sae_keys[0], sae_keys[2]], 2))
