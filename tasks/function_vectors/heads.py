"""Function vectors (Todd et al., ICLR 2024): which attention heads carry an in-context task, and the
vector their mean outputs make, which triggers the task with no demonstrations. This module is the model-side
engine; the experiment's stages are in patching (per-ICL-task head patching), choices (top-k heads, layer),
evaluation (accuracies) and report (tables, MLflow).

The engine is `last_token_logits`: many prompts that share a prefix (the same demonstrations, or the
same prompt patched in 270 different ways) run as ONE pass over the prefix (KV cache) plus ONE packed
pass over all their suffixes, each suffix attending to the prefix and to itself only (a block-diagonal
4-D mask, position ids restarting after the prefix). That is exactly the computation of separate
forward passes, without copying the prefix cache once per row as a batch-expanded cache would. The
causal-mediation patching patches one head per row at the last token, so it costs one prefix pass plus
n_layers * n_heads single-token rows instead of n_layers * n_heads full forward passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.models import LM

Head = tuple[int, int]  # (layer, head)
EditFn = Callable[[torch.Tensor, torch.Tensor], list[Edit]]  # (prompt indices, packed last positions) -> edits


# ---------------------------------------------------------------- shared-prefix packed forward


def _common_prefix_len(token_lists: list[list[int]]) -> int:
    """Longest shared prefix, leaving at least one token of every prompt for the packed pass."""
    limit = min(len(t) for t in token_lists) - 1
    first = token_lists[0]
    n = 0
    while n < limit and all(t[n] == first[n] for t in token_lists):
        n += 1
    return n


def _chunks(lengths: list[int], budget: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if out[-1] and used + n > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


@torch.no_grad()
def last_token_logits(lm: LM, token_lists: list[list[int]], edit_fn: EditFn | None = None,
                      pack_tokens: int = 1024) -> torch.Tensor:
    """Logits [n, vocab] (float32, CPU) at the last token of every prompt, exactly as n separate forward passes.

    edit_fn(indices, last) returns the hooks.Edit list for one packed pass: `indices` are the prompts in it,
    `last` their last tokens' positions in the packed sequence (batch row 0)."""
    dev = lm.device
    p = _common_prefix_len(token_lists)
    cache = None
    if p:
        cache = lm.base(input_ids=torch.tensor([token_lists[0][:p]], device=dev), use_cache=True).past_key_values
    suffixes = [t[p:] for t in token_lists]
    out = []
    for chunk in _chunks([len(s) for s in suffixes], pack_tokens):
        lens = torch.tensor([len(suffixes[i]) for i in chunk], device=dev)
        ids = torch.tensor([tok for i in chunk for tok in suffixes[i]], device=dev)
        seg = torch.repeat_interleave(torch.arange(len(chunk), device=dev), lens)
        starts = torch.cumsum(lens, 0) - lens
        offset = torch.arange(len(ids), device=dev) - starts[seg]
        ar = torch.arange(len(ids), device=dev)
        allowed = (seg[:, None] == seg[None, :]) & (ar[None, :] <= ar[:, None])
        mask = torch.zeros(1, 1, len(ids), p + len(ids), dtype=lm.dtype, device=dev)
        mask[0, 0, :, p:] = torch.where(allowed, 0.0, torch.finfo(lm.dtype).min)
        last = starts + lens - 1
        edits = edit_fn(torch.tensor(chunk, device=dev), last) if edit_fn else []
        with trace(lm, edits=edits):
            h = lm.base(input_ids=ids[None], attention_mask=mask, position_ids=(p + offset)[None],
                        past_key_values=cache, use_cache=cache is not None).last_hidden_state
        if cache is not None:
            cache.crop(p - cache.get_seq_length())  # drop this chunk's keys: the next chunk sees the bare prefix
        out.append(lm.unembed(h[0, last]).float().cpu())
    return torch.cat(out)


def tokenize(lm: LM, texts: list[str]) -> list[list[int]]:
    return [lm.tokenizer(t)["input_ids"] for t in texts]


def add_vector_edits(fv: torch.Tensor, layer: int, flags: torch.Tensor) -> EditFn:
    """Edit function adding `fv` to resid `layer` at the last token of the prompts whose flag is set."""

    def edit_fn(idx: torch.Tensor, last: torch.Tensor) -> list[Edit]:
        on = flags.to(idx.device)[idx]
        if not on.any():
            return []
        pos = last[on]
        return [Edit("resid", layer, fv, position=pos, rows=torch.zeros_like(pos), mode="add")]

    return edit_fn


# ---------------------------------------------------------------- mean head outputs, head patching, vector


@torch.no_grad()
def mean_head_outputs(lm: LM, texts: list[str], pack_tokens: int = 1024) -> torch.Tensor:
    """Mean over prompts of every head's output at the last token: [n_layers, n_heads, head_dim] float32."""
    total = torch.zeros(lm.n_layers, lm.n_heads, lm.head_dim, dtype=torch.float64)
    longest = max(len(t) for t in tokenize(lm, texts))
    batch = max(1, pack_tokens // longest)
    for i in range(0, len(texts), batch):
        enc = lm.encode(texts[i:i + batch])
        reads = [Read("attn_head", layer, position=enc["last"]) for layer in range(lm.n_layers)]
        with trace(lm, reads=reads) as t:
            lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        total += torch.stack([t["attn_head", layer].sum(0) for layer in range(lm.n_layers)]).double().cpu()
    return (total / len(texts)).float()


def indirect_effects(lm: LM, token_ids: list[int], answer: int, means: torch.Tensor,
                     pack_tokens: int = 1024) -> torch.Tensor:
    """[n_layers, n_heads]: change in P(answer) when one head's last-token output is replaced by its task mean.

    Rows 0..L*H-1 each patch one head (row = layer * n_heads + head); the last row is the unpatched baseline."""
    n_heads = lm.n_heads
    n = lm.n_layers * n_heads
    values = means.to(lm.device, lm.dtype)

    def edit_fn(idx: torch.Tensor, last: torch.Tensor) -> list[Edit]:
        edits = []
        for layer in torch.unique(idx[idx < n] // n_heads).tolist():
            sel = (idx < n) & (idx // n_heads == layer)
            heads = idx[sel] % n_heads
            edits.append(Edit("attn_head", layer, values[layer, heads], position=last[sel], head=heads,
                              rows=torch.zeros_like(heads)))
        return edits

    probs = last_token_logits(lm, [token_ids] * (n + 1), edit_fn, pack_tokens).softmax(-1)[:, answer]
    return (probs[:n] - probs[n]).view(lm.n_layers, n_heads)


def function_vector(lm: LM, heads: list[Head], head_means: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen heads' mean outputs through the attention output projection: [d_model]."""
    fv = torch.zeros(lm.d_model, dtype=torch.float32, device=lm.device)
    for (layer, head), value in zip(heads, head_means):
        fv += lm.head_output_to_resid(layer, head, value.to(lm.device)).float()
    return fv
