"""The one mechanism that reads and edits activations; no experiment registers torch hooks of its own.

    with trace(lm, reads=[Read("resid", 3, position=enc["last"])]) as t:
        t.forward(input_ids=..., attention_mask=..., until=3)   # stops once resid layer 3 is computed
    h3 = t["resid", 3]                  # [batch, d_model]

Sites (names users type in configs):
  resid        residual stream; layer l = HF hidden_states[l] (0 = embeddings, l = after l blocks, pre final norm)
  attn_head    per-head attention output, the input of the output projection, viewed [.., n_heads, head_dim]
  attn_out     attention block output as added to the residual stream (after the output projection, and after
               the post-attention norm where the family has one: Gemma 2/3)
  mlp_out      MLP block output as added to the residual stream (after the post-MLP norm in Gemma 2/3)
  mlp_neurons  MLP hidden activations (the input of its down projection)
  mlp_in       what the MLP reads: the input of the MLP module, after the pre-MLP norm (a transcoder's input)
Block sites use the 0-based block index. Edits are out-of-place, so gradients flow through them
(soft prompts and lenses train through `trace`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch

from lensflow.tasks.core.models import LM

SITES = ("resid", "attn_head", "attn_out", "mlp_out", "mlp_neurons", "mlp_in")
Index = int | torch.Tensor  # an int for every row, or a LongTensor with one entry per touched row


@dataclass
class Read:
    site: str
    layer: int
    position: Index | None = None  # None = every position
    grad: bool = False  # keep the autograd graph (training through the model)


@dataclass
class Edit:
    site: str
    layer: int
    value: torch.Tensor  # broadcast to [rows, *site_shape] (site_shape = [d] or [head_dim] with `head`)
    position: Index | None = -1  # None = every position at once (value broadcast to [rows, seq, *site_shape])
    head: Index | None = None  # attn_head only
    rows: torch.Tensor | None = None  # batch rows this edit touches; None = all
    mode: Literal["replace", "add"] = "replace"


class _Stop(Exception):
    """Raised after the last needed layer: nothing downstream (later blocks, logits) is computed."""


def _raise_stop(*_: object) -> None:
    raise _Stop


@dataclass
class Trace:
    lm: LM
    values: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        return self.values[key]

    def forward(self, until: int | None = None, **inputs: object) -> object | None:
        """`lm.base(**inputs, use_cache=False)` under this trace. until: a resid layer where this pass stops once
        it is computed (reads and edits there still apply), so extraction up to layer l costs l blocks and no LM
        head; the pass then returns None. The stop ends this call only, never the rest of the `with` block."""
        if until is None:
            return self.lm.base(**inputs, use_cache=False)
        module, pre = _module_for(self.lm, "resid", until)
        # registered after the trace's own hooks on that module, so its reads and edits run first
        handle = module.register_forward_pre_hook(_raise_stop) if pre else module.register_forward_hook(_raise_stop)
        try:
            return self.lm.base(**inputs, use_cache=False)
        except _Stop:
            return None
        finally:
            handle.remove()


def _rows_positions(x: torch.Tensor, rows: torch.Tensor | None, position: Index) -> tuple[torch.Tensor, torch.Tensor]:
    b, s = x.shape[:2]
    r = torch.arange(b, device=x.device) if rows is None else rows.to(x.device)
    p = torch.as_tensor(position, device=x.device).expand(r.shape[0]) if not torch.is_tensor(position) or position.ndim == 0 \
        else position.to(x.device)
    return r, p % s


def _apply(x: torch.Tensor, edit: Edit) -> torch.Tensor:
    if edit.position is None and edit.head is None:  # a whole sequence: one op, not one per position
        r = torch.arange(x.shape[0], device=x.device) if edit.rows is None else edit.rows.to(x.device)
        value = edit.value.to(dtype=x.dtype, device=x.device).expand_as(x[r])
        return x.index_put((r,), x[r] + value if edit.mode == "add" else value)
    r, p = _rows_positions(x, edit.rows, edit.position)
    idx: tuple[torch.Tensor, ...] = (r, p)
    if edit.head is not None:
        h = edit.head
        idx += (torch.as_tensor(h, device=x.device).expand(r.shape[0]) if not torch.is_tensor(h) or h.ndim == 0 else h.to(x.device),)
    current = x[idx]
    value = edit.value.to(dtype=x.dtype, device=x.device).expand_as(current)
    new = current + value if edit.mode == "add" else value
    return x.index_put(idx, new)


def _read(x: torch.Tensor, read: Read) -> torch.Tensor:
    out = x if read.position is None else x[_rows_positions(x, None, read.position)]
    return out if read.grad else out.detach()


def _process(x: torch.Tensor, site: str, layer: int, edits: list[Edit], reads: list[Read], t: Trace, heads: int) -> torch.Tensor:
    """Edits first, then reads (a read sees the edited value)."""
    shaped = x.view(*x.shape[:-1], heads, -1) if site == "attn_head" else x
    for e in edits:
        if (e.site, e.layer) == (site, layer):
            shaped = _apply(shaped, e)
    for r in reads:
        if (r.site, r.layer) == (site, layer):
            t.values[(site, layer)] = _read(shaped, r)
    return shaped.reshape(x.shape) if site == "attn_head" else shaped


def _module_for(lm: LM, site: str, layer: int) -> tuple[torch.nn.Module, bool]:
    """(module, is_pre_hook) for a site; resid layer 0 is the input of block 0, resid l the output of block l-1."""
    if site == "resid":
        if not 0 <= layer <= lm.n_layers:
            raise ValueError(f"resid layer {layer} out of range 0..{lm.n_layers}")
        return (lm.blocks[0], True) if layer == 0 else (lm.blocks[layer - 1], False)
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"{site} layer {layer} out of range 0..{lm.n_layers - 1}")
    if site == "attn_head":
        return lm.attn_out(layer), True
    if site == "attn_out":
        return lm.attn_resid(layer), False
    if site == "mlp_out":
        return lm.mlp_resid(layer), False
    if site == "mlp_neurons":
        return lm.mlp_down(layer), True
    if site == "mlp_in":
        return lm.mlp(layer), True
    raise ValueError(f"unknown site '{site}' (sites: {', '.join(SITES)})")


@contextmanager
def trace(lm: LM, reads: list[Read] = (), edits: list[Edit] = ()) -> Iterator[Trace]:
    """Hook the model for one or more forward calls inside the block (any call of the model, or `Trace.forward`
    to stop early)."""
    t = Trace(lm)
    reads, edits = list(reads), list(edits)
    points = {(x.site, x.layer) for x in [*reads, *edits]}
    handles = []
    heads = lm.n_heads

    def make(site: str, layer: int):
        def pre_hook(module, args, kwargs):
            if args:
                x = _process(args[0], site, layer, edits, reads, t, heads)
                args = (x, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": _process(kwargs["hidden_states"], site, layer, edits, reads, t, heads)}
            return args, kwargs

        def post_hook(module, args, output):
            if isinstance(output, tuple):
                output = (_process(output[0], site, layer, edits, reads, t, heads), *output[1:])
            else:
                output = _process(output, site, layer, edits, reads, t, heads)
            return output

        return pre_hook, post_hook

    try:
        for site, layer in sorted(points):
            module, pre = _module_for(lm, site, layer)
            pre_hook, post_hook = make(site, layer)
            handles.append(
                module.register_forward_pre_hook(pre_hook, with_kwargs=True) if pre else module.register_forward_hook(post_hook)
            )
        yield t
    finally:
        for h in handles:
            h.remove()
