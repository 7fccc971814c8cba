"""The multilingual experiment's decisions (tasks/multilingual/plan.py and the stage keys): which layers, pairs
and baseline, the stores it extracts, and what each per-layer stage's key depends on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.extraction import Extraction
from lensflow.tasks.core.models import ModelInfo
from lensflow.tasks.core.prompts import builtin_texts
from lensflow.tasks.core.stages import ModelId
from lensflow.tasks.multilingual.config import MultilingualConf
from lensflow.tasks.multilingual.overlap import parse_pairs
from lensflow.tasks.multilingual.plan import (
    choose_layers,
    load_inputs,
    sae_jobs,
    split_paragraphs,
    store_confs,
)
from lensflow.tasks.multilingual.sae import SAE_PARAMS, sae_stage


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


def _corpus(tmp_path, langs: tuple[str, str], n: int, train_paragraphs: int) -> tuple[dict[str, list[str]], list[str]]:
    """({lang: lines}, config overrides) for aligned files of n numbered paragraphs in two languages."""
    lines = {lang: [f"{lang} paragraph {i}." for i in range(n)] for lang in langs}
    for lang, text in lines.items():
        (tmp_path / f"{lang}.txt").write_text("\n".join(text) + "\n")
    a, b = langs
    files = f"multilingual.files={{{a}: {tmp_path / a}.txt, {b}: {tmp_path / b}.txt}}"
    return lines, [f"multilingual.languages=[{a}, {b}]", files, "multilingual.sae.train_prompts=7",
                   f"multilingual.sae.train_paragraphs={train_paragraphs}"]


def test_inputs_baseline_is_a_seeded_derangement(make_conf, tmp_path):
    lines, args = _corpus(tmp_path, ("en", "de"), 9, train_paragraphs=0)
    inputs = load_inputs(make_conf(*args))
    assert inputs.corpus == lines and inputs.pairs == [("en", "de")] and inputs.n_paragraphs == 9
    assert inputs.sae_text == {} and inputs.train_rows == []
    assert sorted(inputs.perm) == list(range(9)) and all(inputs.perm[i] != i for i in range(9))
    assert np.array_equal(load_inputs(make_conf(*args)).perm, inputs.perm)
    perms = {tuple(load_inputs(make_conf(*args, f"multilingual.seed={s}")).perm) for s in range(4)}
    assert len(perms) > 1  # the seed chooses it
    assert inputs.general == builtin_texts(7)  # data.* texts, capped at sae.train_prompts
    with pytest.raises(ConfigError, match="multilingual.pairs"):
        load_inputs(make_conf(*args, "multilingual.pairs=[en-fr]"))


def test_sae_training_paragraphs_are_a_seeded_aligned_choice_never_measured(make_conf, tmp_path):
    _, args = _corpus(tmp_path, ("en", "fr"), 12, train_paragraphs=4)
    inputs = load_inputs(make_conf(*args))
    rows = inputs.train_rows
    assert len(rows) == 4 and rows == sorted(set(rows)) and all(0 <= i < 12 for i in rows)
    for lang in ("en", "fr"):  # the same lines in every language, so translations stay aligned on both sides
        assert inputs.sae_text[lang] == [f"{lang} paragraph {i}." for i in rows]
        assert inputs.corpus[lang] == [f"{lang} paragraph {i}." for i in range(12) if i not in rows]
    assert inputs.n_paragraphs == 8 and sorted(inputs.perm) == list(range(8))
    assert load_inputs(make_conf(*args)).train_rows == rows
    assert len({tuple(split_paragraphs(12, 4, seed)) for seed in range(6)}) > 1  # the seed chooses them
    assert rows != list(range(4))  # not simply the first lines: a file ordered by topic would skew the split
    assert split_paragraphs(12, 10, 0) and split_paragraphs(12, 0, 0) == []
    with pytest.raises(ConfigError, match=r"multilingual\.sae\.train_paragraphs.*11 of 12 .*fewer than 2"):
        load_inputs(make_conf(*args[:-1], "multilingual.sae.train_paragraphs=11"))


def test_store_confs_keep_every_token_of_the_chosen_layers(make_conf):
    general, paragraphs = store_confs(make_conf("multilingual.paragraph_tokens=40", "store.positions=last"), [0, 2])
    for c in (general, paragraphs):
        assert (c.store.positions, c.store.layers, c.store.sites) == ("all", [0, 2], ["resid"])
    assert (general.data.max_tokens, paragraphs.data.max_tokens) == (16, 40)


def _jobs(conf, general_key="g1", fr_train_key="fr-train-key"):
    info = ModelInfo(ModelId("tiny", None, "float32", "w", "t"), 4, 64, 4, 16, 257)
    general = Extraction("/s/general", general_key, 16, 2, 0, 0, 0.0)
    paragraphs = {lang: Extraction(f"/s/{lang}", f"{lang}-key", 6, 1, 0, 0, 0.0) for lang in ("en", "fr")}
    sae_text = {"en": Extraction("/s/en-train", "en-train-key", 3, 1, 0, 0, 0.0),
                "fr": Extraction("/s/fr-train", fr_train_key, 3, 1, 0, 0, 0.0)}
    inputs = load_inputs(conf)
    return sae_jobs(conf, info, general, sae_text, paragraphs, [0, 3], inputs)


def test_sae_key_moves_with_each_sae_setting_and_the_store_only(make_conf):
    base = sae_stage("/root", "g1", MultilingualConf.SAE(), skip_first=True, seed=0)
    assert sae_stage("/other", "g1", MultilingualConf.SAE(), True, 0).key == base.key  # the root is not identity
    changed = {"activation": "relu", "expansion": 2, "k": 8, "l1": 0.5, "steps": 7, "batch_tokens": 8, "lr": 0.1,
               "holdout": 0.3, "general_share": 0.5}
    assert set(changed) == set(SAE_PARAMS)
    keys = {sae_stage("/root", "g1", MultilingualConf.SAE(**{p: v}), True, 0).key for p, v in changed.items()}
    keys |= {sae_stage("/root", "g2", MultilingualConf.SAE(), True, 0).key,
             sae_stage("/root", "g1", MultilingualConf.SAE(), False, 0).key,
             sae_stage("/root", "g1", MultilingualConf.SAE(), True, 1).key}
    with_fr = sae_stage("/root", "g1", MultilingualConf.SAE(), True, 0, {"fr": "f1"})
    keys |= {with_fr.key, sae_stage("/root", "g1", MultilingualConf.SAE(), True, 0, {"fr": "f2"}).key,
             sae_stage("/root", "g1", MultilingualConf.SAE(), True, 0, {"de": "f1"}).key}
    assert len(keys) == len(changed) + 6 and base.key not in keys
    assert sae_stage("/root", "g1", MultilingualConf.SAE(), True, 0, {}).key == base.key
    # train_prompts and train_paragraphs are not SAE settings: they change the training stores' keys instead
    assert sae_stage("/root", "g1", MultilingualConf.SAE(train_prompts=9, train_paragraphs=3), True, 0).key == base.key


def test_sae_jobs_wire_each_layer_to_its_items_and_keys(make_conf):
    base = ["multilingual.languages=[en, fr]", "multilingual.sae.expansion=3", "multilingual.sae.general_share=0.4"]
    conf = make_conf(*base)
    jobs = _jobs(conf)
    assert [j.sae.layer for j in jobs] == [0, 3] and [j.sae.item for j in jobs] == ["layer_00", "layer_03"]
    assert all(j.sae.width == 192 and j.sae.url == "/s/general" and j.paragraphs == {"en": "/s/en", "fr": "/s/fr"}
               and j.sae.languages == {"en": "/s/en-train", "fr": "/s/fr-train"} and j.sae.general_share == 0.4
               for j in jobs)
    assert jobs[0].stage.url.startswith(conf.store.root) and "/multilingual/overlap/" in jobs[0].stage.url
    stage_keys = {(j.sae.stage.key, j.stage.key) for j in jobs}
    assert len(stage_keys) == 1  # one SAE stage and one overlap stage, one item per layer
    moved = [_jobs(make_conf(*base, extra))[0]
             for extra in ("multilingual.seed=1", "multilingual.pairs=[fr-en]")]
    moved += [_jobs(conf, general_key="g2")[0], _jobs(conf, fr_train_key="fr-train-2")[0]]
    sae_keys = [j.sae.stage.key for j in moved]
    overlap_keys = [j.stage.key for j in moved]
    assert sae_keys[1] == jobs[0].sae.stage.key  # pairs do not touch the SAEs
    assert jobs[0].stage.key not in overlap_keys and len(set(overlap_keys)) == 4
    assert all(a != b for a, b in itertools.combinations([jobs[0].sae.stage.key, *sae_keys[0:1], *sae_keys[2:]], 2))
