"""Interventions in feature space, through the one activation mechanism (tasks.core.hooks), on the real model.

At a chosen (layer, position) a transcoder's codes z are read from the MLP's actual input, changed (set, add or
scale chosen features: z'), and the MLP block's output gets (z' - z) W_dec added: the site's reconstruction error
(what the transcoder misses) is kept as it was, and later layers, MLPs included, run as the model does. Edited
layers are processed in order, each reading its codes from a pass that already carries the earlier layers' edits
(one partial pass per edited layer, stopped right after it), then one full pass gives the logits. `strength`
multiplies every change, so 0 leaves the model exactly as it is and a sweep walks from nothing to the full edit.
Cases are batched: every row is its own prompt with its own edits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.models import LM


@dataclass(frozen=True)
class FeatureOp:
    """Change features of one layer's transcoder at one position: set them to `values` (0 = zero them), add
    `values` to them, or scale them by `values`."""

    layer: int
    position: int  # non-negative, in the prompt's own tokens
    features: tuple[int, ...]
    kind: Literal["set", "add", "scale"]
    values: tuple[float, ...]


@dataclass
class Case:
    """One prompt and the feature edits made on it."""

    prompt: str
    ops: list[FeatureOp] = field(default_factory=list)


def _new_codes(z: torch.Tensor, op: FeatureOp) -> torch.Tensor:
    f = torch.tensor(op.features, dtype=torch.long, device=z.device)
    v = torch.tensor(op.values, dtype=z.dtype, device=z.device)
    out = z.clone()
    if op.kind == "set":
        out[f] = v
    elif op.kind == "add":
        out[f] = z[f] + v
    else:
        out[f] = z[f] * v
    return out


def residual_change(tc: Transcoder, z: torch.Tensor, op: FeatureOp, strength: float) -> torch.Tensor:
    """What the edit adds to the MLP block's output at the site: strength * (z' - z) W_dec (in the model's units)."""
    dz = (_new_codes(z, op) - z) * strength
    return dz @ tc.decoder_vectors()


@torch.no_grad()
def run_cases(lm: LM, transcoders: dict[int, Transcoder], cases: list[Case], strength: float = 1.0,
              batch: int = 32) -> torch.Tensor:
    """Next-token logits [cases, vocab] at each prompt's last token, with its feature edits applied."""
    out = []
    for i in range(0, len(cases), batch):
        out.append(_run_batch(lm, transcoders, cases[i:i + batch], strength))
    return torch.cat(out) if out else torch.zeros(0, lm.vocab_size)


def _run_batch(lm: LM, transcoders: dict[int, Transcoder], cases: list[Case], strength: float) -> torch.Tensor:
    enc = lm.encode([c.prompt for c in cases])
    ids, mask, last = enc["input_ids"], enc["attention_mask"], enc["last"]
    edits: list[Edit] = []
    for layer in sorted({op.layer for c in cases for op in c.ops}):
        with trace(lm, reads=[Read("mlp_in", layer)], edits=edits) as t:
            t.forward(input_ids=ids, attention_mask=mask, until=layer + 1)
        x = t["mlp_in", layer].float()
        tc = transcoders[layer].to(lm.device)
        for r, c in enumerate(cases):
            for op in (o for o in c.ops if o.layer == layer):
                delta = residual_change(tc, tc.encode(x[r, op.position]), op, strength)
                edits.append(Edit("mlp_out", layer, delta[None].to(lm.dtype), position=torch.tensor([op.position]),
                                  rows=torch.tensor([r]), mode="add"))
    with trace(lm, edits=edits):
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits[torch.arange(len(cases), device=ids.device), last].float().cpu()
