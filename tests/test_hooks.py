"""The activation mechanism against plain transformers forward passes and hand-written torch hooks."""

from __future__ import annotations

import pytest
import torch

from lensflow.tasks.core.hooks import Edit, Read, trace
from tests.conftest import FAMILIES

TEXTS = ["The cat sat on the mat", "Hi", "A longer prompt with several words in it"]


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_matches_hidden_states(tiny_lms, family):
    lm = tiny_lms[family]
    enc = lm.encode(TEXTS)
    ref = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True).hidden_states
    with trace(lm, reads=[Read("resid", l) for l in range(lm.n_layers + 1)]) as t:
        out = t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=lm.n_layers)
        after_stop = True  # the stop ends the pass, never the rest of the block
    assert out is None and after_stop  # cut before the final norm
    for l in range(lm.n_layers):
        torch.testing.assert_close(t["resid", l], ref[l], atol=1e-5, rtol=0)
    # HF's last hidden state is after the final norm; the store keeps the pre-norm stream
    torch.testing.assert_close(lm.final_norm(t["resid", lm.n_layers]), ref[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_head_read_and_replace_match_manual_hooks(tiny_lms, family):
    lm = tiny_lms[family]
    enc = lm.encode(TEXTS[:2])
    layer, head, d = 1, 2, lm.head_dim
    captured = {}
    h = lm.attn_out(layer).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach().clone()))
    base_logits = lm.model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits
    h.remove()
    with trace(lm, reads=[Read("attn_head", layer, position=enc["last"])]) as t:
        lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    rows = torch.arange(2)
    expect = captured["x"][rows, enc["last"]].view(2, lm.n_heads, d)
    torch.testing.assert_close(t["attn_head", layer], expect)

    value = torch.randn(d)

    def manual(m, a):
        x = a[0].clone()
        x[rows, -1, head * d:(head + 1) * d] = value
        return (x,)

    h = lm.attn_out(layer).register_forward_pre_hook(manual)
    want = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    h.remove()
    with trace(lm, edits=[Edit("attn_head", layer, value, position=-1, head=head)]):
        got = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base_logits).abs().max() > 1e-4  # the edit did something


def test_per_row_edits_and_add_mode(tiny_lms):
    lm = tiny_lms["llama"]
    enc = lm.encode(["abc def", "abc def"])
    vec = torch.randn(lm.d_model)
    with trace(lm, edits=[Edit("resid", 2, vec, position=1, rows=torch.tensor([1]), mode="add")],
               reads=[Read("resid", 2), Read("resid", 3)]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    r2 = t["resid", 2]
    torch.testing.assert_close(r2[1, 1] - r2[0, 1], vec, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2[1, 0], r2[0, 0])  # earlier position untouched
    torch.testing.assert_close(t["resid", 3][:, 0][0], t["resid", 3][:, 0][1])  # causal: position 0 unaffected
    assert (t["resid", 3][1, 1] - t["resid", 3][0, 1]).abs().max() > 1e-4


def test_gradients_flow_through_edits(tiny_lms):
    lm = tiny_lms["gpt2"]
    enc = lm.encode(["hello there"])
    v = torch.zeros(lm.d_model, requires_grad=True)
    with trace(lm, edits=[Edit("resid", 1, v, position=-1, mode="add")]):
        logits = lm.model(input_ids=enc["input_ids"]).logits
    logits[0, -1, 5].backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_an_early_stop_computes_nothing_deeper_and_keeps_its_edits(tiny_lms):
    """until=2: the edit and read at resid 2 apply, no deeper block runs (its read stays empty), and a full pass
    after it in the same block runs normally."""
    lm = tiny_lms["llama"]
    enc = lm.encode(TEXTS[:2])
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    bump = torch.ones(lm.d_model)
    reads = [Read("resid", 2), Read("resid", 3)]
    with trace(lm, reads=reads, edits=[Edit("resid", 2, bump, position=0, mode="add")]) as t:
        assert t.forward(**inputs, until=2) is None
        assert ("resid", 3) not in t.values
        stopped = t["resid", 2].clone()
        full = t.forward(**inputs)
    assert full is not None and ("resid", 3) in t.values
    ref = lm.model(**inputs, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(stopped[:, 1:], ref[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(stopped[:, 0], ref[:, 0] + bump, atol=1e-5, rtol=0)
