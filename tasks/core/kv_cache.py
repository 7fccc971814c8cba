"""Tokens that stay the same across many forwards (an optimisation loop's prompts, a Jacobian's demos) run once into a
key/value cache; each later forward runs only the tokens after them, which is where an edit can change anything."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lensflow.tasks.core.models import LM


@torch.no_grad()
def prefix_cache(lm: LM, ids: Sequence[int]):
    """The key/value cache of one row of `ids` (None for no tokens)."""
    if not ids:
        return None
    return lm.base(input_ids=torch.tensor([list(ids)], device=lm.device), use_cache=True).past_key_values


def repeat_cache(cache, rows: int):
    """A private copy of a batch-1 cache for `rows` rows (a forward appends to the cache it is given)."""
    if cache is None:
        return None
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


@dataclass(frozen=True)
class CachedRows:
    """Rows of token ids split at per-row cuts: the tokens before each cut run once, left-padded as in batched
    generation, so each row's tokens stay contiguous (sliding windows see what they would unpadded); the rest run on
    every call with explicit positions, each row's own as if unpadded. `rest_ids[i, j]` is row i's token cut_i + j."""

    cache: object
    rest_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, lm: LM, rows: Sequence[Sequence[int]], cuts: Sequence[int]) -> CachedRows:
        pad = lm.tokenizer.pad_token_id
        heads = [list(r[:c]) for r, c in zip(rows, cuts)]
        rests = [list(r[c:]) for r, c in zip(rows, cuts)]
        P, R = max(map(len, heads)), max(map(len, rests))
        ids = torch.tensor([[pad] * (P - len(h)) + h for h in heads], device=lm.device)
        head_mask = torch.tensor([[0] * (P - len(h)) + [1] * len(h) for h in heads], device=lm.device)
        rest_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in rests], device=lm.device)
        head_positions = (head_mask.cumsum(1) - 1).clamp(min=0)
        cache = lm.base(input_ids=ids, attention_mask=head_mask, position_ids=head_positions,
                        use_cache=True).past_key_values
        rest_ids = torch.tensor([r + [pad] * (R - len(r)) for r in rests], device=lm.device)
        positions = torch.tensor(list(cuts), device=lm.device)[:, None] + torch.arange(R, device=lm.device)
        return cls(cache, rest_ids, torch.cat([head_mask, rest_mask], 1), positions)

    def logits(self, lm: LM) -> torch.Tensor:
        """[rows, rest, vocab]: the full model on the rest of every row (hooks of a `trace` apply as usual)."""
        return lm.model(input_ids=self.rest_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                        past_key_values=copy.deepcopy(self.cache), use_cache=True).logits
