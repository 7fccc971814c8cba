"""A model linearised around one prompt: attention patterns and normalisation denominators recorded on a clean pass
and replayed, so that everything between the MLPs is linear in the residual stream (the "local replacement model"
of attribution graphs, Ameisen et al. 2025).

    with frozen(lm) as fz:
        fz.record(input_ids=ids)          # a clean pass: patterns and norm scales of this prompt
        lm.base(input_ids=ids_batch)      # later passes replay them (a batch of copies of the prompt broadcasts)

Attention: every attention module of the model calls one registered attention function (transformers'
AttentionInterface); while recording it is the family's own eager attention, keeping its pattern, and while
replaying it multiplies the values by the recorded pattern, so the query and key paths carry no gradient. RMSNorm:
recorded input x0 and output y0, replayed as y0 + (x - x0) * w * rsqrt(mean(x0^2) + eps), the norm's exact
linearisation with the denominator held (w read from the module itself: `norm(1) * sqrt(1 + eps)`, which is 1 + weight
in Gemma and weight in Llama). This changes the model's non-linearities, not its activations; reads and edits still go
through tasks.core.hooks. Families with LayerNorm (GPT-2, GPT-J, NeoX: mean-centring and biases) are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.models import LM

ATTENTION = "lensflow_frozen"


@dataclass
class _Norm:
    x0: torch.Tensor
    y0: torch.Tensor
    slope: torch.Tensor  # elementwise d y / d x with the denominator held


@dataclass
class Frozen:
    """What one clean pass recorded; `replaying` switches the hooks from recording to replaying."""

    lm: LM
    replaying: bool = False
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)  # attention module id -> [1, heads, S, S]
    norms: dict[int, list[_Norm]] = field(default_factory=dict)  # norm module id -> one entry per call in a pass
    _calls: dict[int, int] = field(default_factory=dict)

    def record(self, **inputs: object) -> object:
        """The clean pass (through `lm.base`, no LM head): its activations are the real model's (eager attention)."""
        self.replaying, self.patterns, self.norms = False, {}, {}
        with torch.no_grad():
            out = self.lm.base(**inputs, use_cache=False)
        self.replaying = True
        return out


def rms_norms(lm: LM) -> list[nn.Module]:
    """Every normalisation module of the model, all RMSNorms (the only kind linearised here)."""
    norms, other = [], []
    for name, m in lm.model.named_modules():
        kind = type(m).__name__
        if "RMSNorm" in kind:
            norms.append(m)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or kind.endswith("LayerNorm"):
            other.append(name)
    if other:
        raise ConfigError(f"model.name '{lm.name}': the local replacement model supports RMSNorm families "
                          f"(llama, qwen2, gemma3); {other[0]} is a {type(dict(lm.model.named_modules())[other[0]]).__name__}")
    return norms


def _eps(m: nn.Module) -> float:
    for attr in ("eps", "variance_epsilon"):
        if hasattr(m, attr):
            return float(getattr(m, attr))
    raise ConfigError(f"cannot read the epsilon of {type(m).__name__} (expected .eps or .variance_epsilon)")


def _slope(m: nn.Module, x0: torch.Tensor) -> torch.Tensor:
    eps = _eps(m)
    ones = torch.ones(x0.shape[-1], dtype=x0.dtype, device=x0.device)
    with torch.no_grad():
        weight = m.forward(ones).float() * (1.0 + eps) ** 0.5  # forward: no hooks. A constant vector normalises to its weight (times rsqrt(1 + eps))
    return (weight * torch.rsqrt(x0.float().pow(2).mean(-1, keepdim=True) + eps)).to(x0.dtype)


_ACTIVE: list[Frozen] = []  # the frozen state the registered attention function serves (one model at a time)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    fz = _ACTIVE[-1]
    if not fz.replaying:
        eager = sys.modules[type(module).__module__].eager_attention_forward  # the family's own eager attention
        out, pattern = eager(module, query, key, value, attention_mask, **kwargs)
        fz.patterns[id(module)] = pattern.detach()
        return out, None
    pattern = fz.patterns[id(module)]
    v = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)  # grouped-query heads share values
    return (pattern.to(v.dtype) @ v).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def _norm_hook(fz: Frozen, m: nn.Module):
    key = id(m)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        if not fz.replaying:
            fz.norms.setdefault(key, []).append(_Norm(x.detach(), output.detach(), _slope(m, x.detach())))
            return None
        i = fz._calls.get(key, 0)
        fz._calls[key] = i + 1
        rec = fz.norms[key][i]
        return rec.y0 + (x - rec.x0) * rec.slope

    return hook


@contextmanager
def frozen(lm: LM) -> Iterator[Frozen]:
    """Linearise `lm` for the block: `record` once, then every forward pass through it replays."""
    norms = rms_norms(lm)
    _register()
    fz = Frozen(lm)
    configs = {id(c): c for c in (lm.model.config, *(getattr(m, "config", None) for m in lm.model.modules())) if c is not None}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    handles = [m.register_forward_hook(_norm_hook(fz, m)) for m in norms]
    handles.append(lm.base.register_forward_pre_hook(lambda *_: fz._calls.clear()))  # a new pass: calls count anew
    _ACTIVE.append(fz)
    try:
        for c in configs.values():
            c._attn_implementation = ATTENTION
        yield fz
    finally:
        _ACTIVE.remove(fz)
        for h in handles:
            h.remove()
        for k, c in configs.items():
            c._attn_implementation = saved[k]
