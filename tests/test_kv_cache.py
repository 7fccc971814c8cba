"""CachedRows: rows of different lengths, cut at different places, run their fixed tokens once and the rest per call;
checked against a plain Hugging Face forward of each whole row, alone and unpadded, with the same edit made by a
plain torch hook."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES

from lensflow.tasks.core.hooks import Edit, trace
from lensflow.tasks.core.kv_cache import CachedRows

ROWS = [[5, 9, 13, 2, 7, 30, 41], [8, 3, 3, 11, 60], [21, 4, 17, 9, 9, 12, 50, 6, 2], [33, 7, 19]]
CUTS = [3, 1, 6, 0]  # a row with nothing cached still runs whole


def _plain(lm, row: list[int], cut: int, layer: int, delta: torch.Tensor | None) -> torch.Tensor:
    """Logits of one unpadded row after `cut`; delta added to the output of block layer-1 at token `cut`."""

    def add(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[0, cut] += delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = lm.blocks[layer - 1].register_forward_hook(add) if delta is not None else None
    try:
        with torch.no_grad():
            return lm.model(input_ids=torch.tensor([row])).logits[0, cut:]
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_rest_equals_whole_rows(tiny_lms, family):
    lm = tiny_lms[family]
    batch = CachedRows.of(lm, ROWS, CUTS)
    torch.manual_seed(0)
    delta = torch.randn(lm.d_model)
    for edit in (None, delta):
        edits = [] if edit is None else [Edit("resid", 2, edit, position=0, mode="add")]
        with torch.no_grad(), trace(lm, edits=edits):
            got = batch.logits(lm)
        for i, (row, cut) in enumerate(zip(ROWS, CUTS)):
            want = _plain(lm, row, cut, 2, edit)
            torch.testing.assert_close(got[i, :len(row) - cut], want, atol=1e-5, rtol=1e-5)
