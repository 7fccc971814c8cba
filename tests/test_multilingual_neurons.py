"""MLP-neuron sets and their stages: actor-side sets and calibrated thresholds against a hand-hooked unpadded
forward of one text at a time; the thresholds choice; reruns that ask the model nothing.

The model actors are replaced by a local pool that runs the same actor-side functions in this process (no Ray).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from local_pool import LocalPool

from lensflow.tasks.core.config import ModelConf
from lensflow.tasks.core.models import load_model
from lensflow.tasks.multilingual.neurons import (
    NeuronJob,
    neuron_active_sets,
    neuron_overlaps,
    neuron_thresholds,
)
from lensflow.tasks.multilingual.plan import load_inputs

TEXTS = ["the cat sat on the mat", "le chat", "un gato grande y negro en la casa", "der Hund schläft", "a b c d e f"]




@pytest.fixture(scope="module")
def lm():
    return load_model(ModelConf(name="tiny-llama"))


def _by_hand(lm, text: str, blocks: list[int], max_tokens: int = 64) -> dict[int, torch.Tensor]:
    """[tokens, F] MLP-neuron activations of one text, no padding, from our own hook on the down projection."""
    seen = {}
    hooks = [lm.mlp_down(b).register_forward_pre_hook(lambda m, a, b=b: seen.__setitem__(b, a[0][0].clone()))
             for b in blocks]
    with torch.no_grad():
        lm.model(**lm.tokenizer([text], return_tensors="pt", truncation=True, max_length=max_tokens))
    for h in hooks:
        h.remove()
    return seen


def test_neuron_sets_match_unpadded_single_text_forward(lm):
    blocks = [1, 3]
    thresholds = {1: np.float32(0.02), 3: np.linspace(-0.01, 0.03, 128).astype(np.float32)}
    got = neuron_active_sets(lm, NeuronJob(TEXTS[:3], blocks, 64, skip_first=True, thresholds=thresholds))
    for i, text in enumerate(TEXTS[:3]):
        seen = _by_hand(lm, text, blocks)
        for b in blocks:
            ref = (seen[b][1:] > torch.as_tensor(thresholds[b])).any(0).numpy()
            assert np.array_equal(got[b][i], ref), (i, b)


def test_calibrated_thresholds_are_mean_chunk_quantiles_and_a_stage(lm, make_conf):
    conf = make_conf("multilingual.neurons.quantile=0.9", "multilingual.neurons.batch_prompts=2")
    blocks = [0, 2]
    pool = LocalPool(lm)
    got = neuron_thresholds(conf, pool, blocks, TEXTS)
    assert got.computed and got.absolute is None and pool.items == 3  # chunks of 2, 2, 1 texts
    for b in blocks:  # per chunk: the k-th smallest value over its real tokens (first dropped), k = ceil(q * tokens)
        per_chunk = []
        for chunk in (TEXTS[0:2], TEXTS[2:4], TEXTS[4:]):
            tokens = np.concatenate([_by_hand(lm, t, [b], conf.data.max_tokens)[b][1:].numpy() for t in chunk])
            per_chunk.append(np.sort(tokens, axis=0)[int(np.ceil(0.9 * len(tokens))) - 1])
        assert np.allclose(got.per_block[b], np.mean(per_chunk, axis=0), atol=1e-5), b

    rerun = LocalPool(lm)
    again = neuron_thresholds(conf, rerun, blocks, TEXTS)
    assert not again.computed and rerun.items == 0 and again.key == got.key
    assert all(np.array_equal(again.per_block[b], got.per_block[b]) for b in blocks)
    other = neuron_thresholds(make_conf("multilingual.neurons.quantile=0.5", "multilingual.neurons.batch_prompts=2"),
                              rerun, blocks, TEXTS)
    assert other.computed and other.key != got.key and rerun.items == 3
    assert all((other.per_block[b] <= got.per_block[b] + 1e-6).all() for b in blocks)  # a lower quantile

    absolute = neuron_thresholds(make_conf("multilingual.neurons.threshold=0.05"), rerun, blocks, TEXTS)
    assert absolute.key is None and absolute.absolute == 0.05 and rerun.items == 3  # no model call
    assert {b: float(v) for b, v in absolute.per_block.items()} == {0: pytest.approx(0.05), 2: pytest.approx(0.05)}


def test_neuron_overlaps_rerun_asks_the_model_nothing_and_a_changed_language_recomputes_only_its_sets(lm, make_conf,
                                                                                                    tmp_path):
    en, fr = tmp_path / "en.txt", tmp_path / "fr.txt"
    en.write_text("\n".join(TEXTS[:4]) + "\n")
    fr.write_text("\n".join(TEXTS[1:5]) + "\n")
    args = ["multilingual.languages=[en, fr]", f"multilingual.files={{en: {en}, fr: {fr}}}",
            "multilingual.sae.train_prompts=6", "multilingual.sae.train_paragraphs=0",
            "multilingual.neurons.calibration_prompts=4"]
    conf = make_conf(*args)
    inputs = load_inputs(conf)
    first = neuron_overlaps(conf, LocalPool(lm), [0, 2, 4], inputs)
    assert first.computed == 3 and sorted(first.blocks) == [1, 3]  # thresholds, en, fr; blocks writing into 2 and 4
    pool = LocalPool(lm)
    again = neuron_overlaps(conf, pool, [0, 2, 4], inputs)
    assert again.computed == 0 and pool.items == 0 and again.blocks == first.blocks
    fr.write_text("\n".join(TEXTS[:4][::-1]) + "\n")
    changed = neuron_overlaps(conf, pool, [0, 2, 4], load_inputs(conf))
    assert changed.computed == 1 and pool.items == 1  # fr's sets only
    assert neuron_overlaps(make_conf(*args, "multilingual.neurons.enabled=false"), pool, [0, 2], inputs) is None
    assert neuron_overlaps(conf, pool, [0], inputs) is None
