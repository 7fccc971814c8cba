"""Future Lens science choices and stage keys, without a model, Prefect or Ray: the split by text, the filter's
row selection, the default layers, the best fixed prompt, and which stage keys a changed setting moves."""

from __future__ import annotations

import numpy as np
import pytest

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.extraction import Extraction
from lensflow.tasks.core.models import ModelInfo
from lensflow.tasks.core.stages import ModelId
from lensflow.tasks.future_lens import methods as fl
from lensflow.tasks.future_lens.config import FutureLensConf
from lensflow.tasks.future_lens.metrics import Score
from lensflow.tasks.future_lens.samples import (
    SampleTargets,
    Window,
    kept_rows,
    split_windows,
)
from lensflow.tasks.registry import load_config


def test_split_holds_out_whole_texts_and_caps_candidates():
    windows = [Window(t, (t, k), k) for t in range(10) for k in range(30)]
    split = split_windows(windows, 10, test_fraction=0.2, seed=3, n_train=100, n_test=40)
    test_texts = set(range(10)) - set(split.train_texts)
    assert len(test_texts) == 2 and split.train_texts == sorted(split.train_texts)
    assert {w.text_id for w in split.train} <= set(split.train_texts) and {w.text_id for w in split.test} <= test_texts
    assert len(split.train) == 107 and len(split.test) == 44  # 5% + 2 extra candidates; the test side has 60
    assert len(set(split.train)) == 107 and len(set(split.test)) == 44
    again = split_windows(windows, 10, 0.2, 3, 100, 40)
    assert again == split  # seeded
    other = split_windows(windows, 10, 0.2, 4, 100, 40)
    assert other.train != split.train
    small = split_windows(windows[:60], 2, test_fraction=0.1, seed=0, n_train=5, n_test=5)
    assert len(small.train_texts) == 1  # at least one text is held out
    assert len(small.train) == 7 and len(small.test) == 7


def test_kept_rows_take_filtered_rows_of_each_side_in_order():
    keep = np.array([True, False, True, True, False, True, True, True])
    assert kept_rows(keep, 4, n_train=2, n_test=5) == ([0, 2], [5, 6, 7])
    assert kept_rows(keep, 4, n_train=9, n_test=1) == ([0, 2, 3], [5])
    with pytest.raises(ConfigError, match="only 1 train / 3 test"):
        kept_rows(np.array([False, True, False, True, True, True]), 3, 5, 5)


def test_default_layers():
    fc = FutureLensConf()
    assert fl.causal_layers(fc, 30) == [0, 5, 10, 15, 20, 25, 30]
    assert fl.causal_layers(FutureLensConf(causal_layer_stride=3), 4) == [1, 4]  # counted down from the last
    assert fl.linear_layers(fc, 4) == [0, 1, 2, 3, 4]
    assert fl.linear_layers(FutureLensConf(linear_layers=[3, 1, 3]), 4) == [1, 3]
    with pytest.raises(ConfigError, match="future_lens.causal_layers"):
        fl.causal_layers(FutureLensConf(causal_layers=[2, 5]), 4)


def test_best_fixed_prompt_is_the_highest_mean_precision_at_1():
    def rows(*per_layer):
        return [fl.LayerResult("fixed", l, [Score({1: p}, 0.0) for p in ps]) for l, ps in enumerate(per_layer)]

    a = rows([1.0, 0.0], [0.2, 0.2])  # mean 0.35
    b = rows([0.5, 0.3], [0.3, 0.3])  # mean 0.35 + 0.0125
    c = rows([0.9, 0.1], [0.1, 0.1])  # mean 0.3
    assert fl.best_fixed_prompt([a, b, c]) == 1
    assert fl.best_fixed_prompt([a, c, a]) == 0  # ties: the first


def _keys(*overrides: str, targets_key: str = "t1", weights: str = "w1") -> dict[str, str]:
    """Every stage key of a plan for a 4-layer model (no model needed: the plan only names stages)."""
    conf = load_config(None, ["store.root=/nonexistent", *overrides])
    info = ModelInfo(ModelId("m", None, "float32", weights, "tok"), 4, 8, 2, 4, 50)
    targets = SampleTargets("/t", targets_key, 10, 5, 100, 50, [0, 1], computed=False)
    plan = fl.plan(conf, info, targets, Extraction("/a", "a1", 15, 1, 0, 0, 0.0))
    keys = {"ngram": plan.ngram.key}
    for method, jobs in plan.jobs.items():
        for j in jobs:
            keys[f"{j.method}.eval"] = j.evaluated.key
            if j.trained:
                keys[f"{j.method}.trained"] = j.trained.key
    return keys


def test_a_changed_setting_moves_exactly_the_stages_downstream_of_it():
    base = _keys()
    assert len(set(base.values())) == len(base) == 9  # 3 trained, their 3 evaluations, 2 fixed prompts, the n-gram

    def moved(*overrides: str, **kw: str) -> set[str]:
        other = _keys(*overrides, **kw)
        return {k for k in base if other[k] != base[k]}

    assert moved("future_lens.soft_prompt_steps=7") == {"soft_prompt.trained", "soft_prompt.eval"}
    assert moved("future_lens.vocab_rank=8") == {"linear_vocab.trained", "linear_vocab.eval"}
    assert moved("future_lens.ridge=[1.0]") == {"linear_hidden.trained", "linear_hidden.eval"}
    assert moved("future_lens.teacher_forcing=false") == {"soft_prompt.eval", "fixed_prompt_p0.eval",
                                                           "fixed_prompt_p1.eval"}
    assert moved("future_lens.ks=[1]") == {k for k in base if k.endswith(".eval")} | {"ngram"}
    assert moved("future_lens.fixed_prompts=['Tell me about', 'x']") == {"fixed_prompt_p0.eval", "fixed_prompt_p1.eval"}
    assert _keys("future_lens.fixed_prompts=['Tell me about']")["fixed_prompt_p0.eval"] == base["fixed_prompt_p1.eval"]
    assert moved("future_lens.seed=1") == {k for k in base if k.split(".")[0] in fl.TRAINING}
    assert moved(targets_key="t2") == set(base)
    assert moved(weights="w2") == set(base)
