"""The store's MLP sites (`mlp_in`, `mlp_out`: a transcoder's training pairs) against a plain transformers forward of
one text at a time (no padding) with hooks registered here on the Hugging Face modules by name; and the layers
preflight checks for the multilingual flow are those of the model it actually runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from local_pool import LocalPool

from lensflow.tasks.core.config import ConfigError, ModelConf
from lensflow.tasks.core.extraction import extract
from lensflow.tasks.core.models import load_model
from lensflow.tasks.core.store import Activations
from lensflow.tasks.multilingual.sae import token_blocks
from lensflow.tasks.registry import load_config

TEXTS = ["the cat sat on the mat", "le chat", "un gato grande y negro en la casa", "der Hund schläft", "a b c d e f"]
BLOCKS = [1, 3]
# what the MLP reads and what the block adds to the residual stream, by Hugging Face module name: Llama adds the MLP's
# output; Gemma 3 adds it after its post-feedforward norm
MLP_OUT = {"llama": "mlp", "gemma3": "post_feedforward_layernorm"}




def _by_hand(lm, family: str, text: str) -> dict[tuple[str, int], torch.Tensor]:
    seen = {}
    hooks = []
    for b in BLOCKS:
        layer = lm.model.model.layers[b]
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, b=b: seen.__setitem__(("mlp_in", b), a[0][0].clone())))
        hooks.append(getattr(layer, MLP_OUT[family]).register_forward_hook(
            lambda m, a, out, b=b: seen.__setitem__(("mlp_out", b), out[0].clone())))
    with torch.no_grad():
        lm.model(**lm.tokenizer([text], return_tensors="pt", truncation=True, max_length=16))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_stored_mlp_in_and_out_equal_a_plain_forward(family, tmp_path):
    lm = load_model(ModelConf(name=f"tiny-{family}"))
    conf = load_config(None, [f"model.name=tiny-{family}", f"store.root={tmp_path}", "data.max_tokens=16",
                              "store.chunk_size=2", "store.positions=all", "store.layers=[1, 3]",
                              "store.sites=[resid, mlp_in, mlp_out]"])
    acts = Activations(extract(conf, TEXTS, LocalPool(lm), "texts").url)
    assert acts.sites == ["resid", "mlp_in", "mlp_out"] and acts.blocks == BLOCKS and acts.d_model == lm.d_model
    lengths = acts.lengths
    for i, text in enumerate(TEXTS):
        seen = _by_hand(lm, family, text)
        n = int(lengths[i])
        for site in ("mlp_in", "mlp_out"):
            for b in BLOCKS:
                got = acts.layer(b, slice(i, i + 1), site=site)[0]
                torch.testing.assert_close(torch.from_numpy(got[:n]), seen[site, b], atol=1e-5, rtol=1e-5)
                assert not got[n:].any()  # padding stays zero
    # the training stream of a dictionary reads these sites like resid: real tokens only, first dropped
    x = np.concatenate(list(token_blocks(acts, 3, slice(0, len(TEXTS)), 2, True, site="mlp_in")))
    want = torch.cat([_by_hand(lm, family, t)["mlp_in", 3][1:] for t in TEXTS])
    torch.testing.assert_close(torch.from_numpy(x), want, atol=1e-5, rtol=1e-5)


def test_positions_last_stores_each_texts_last_token(tmp_path):
    lm = load_model(ModelConf(name="tiny-llama"))
    conf = load_config(None, ["model.name=tiny-llama", f"store.root={tmp_path}", "data.max_tokens=16",
                              "store.chunk_size=2", "store.layers=[1, 3]", "store.sites=[mlp_out]"])
    acts = Activations(extract(conf, TEXTS, LocalPool(lm), "texts").url)
    assert acts.sites == ["mlp_out"]
    for i, text in enumerate(TEXTS):
        got = acts.layer(3, slice(i, i + 1), site="mlp_out")[0]
        torch.testing.assert_close(torch.from_numpy(got), _by_hand(lm, "llama", text)["mlp_out", 3][-1],
                                   atol=1e-5, rtol=1e-5)


def test_preflight_checks_multilingual_layers_against_the_model_the_flow_runs(tmp_path):
    """Gemma 3 270M (18 layers, the flow's default) and SmolLM2 (30, model.name's default) from their GGUF headers."""
    from lensflow.tasks.core.preflight import preflight
    from lensflow.tasks.multilingual import EXPERIMENT

    base = [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "ray.actors=1"]
    with pytest.raises(ConfigError, match=r"'multilingual.layers': \[24\] out of range 0..18 for gemma3-270m"):
        preflight(EXPERIMENT.resolved(load_config(None, [*base, "multilingual.layers=[24]"])), EXPERIMENT.check_inputs)
    preflight(EXPERIMENT.resolved(load_config(None, [*base, "multilingual.layers=[24]", "model.name=smollm2-135m"])),
              EXPERIMENT.check_inputs)
    assert not (tmp_path / "store").exists()  # nothing written
