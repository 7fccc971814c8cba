"""The map a relation's LRE approximates, F: subject state at resid layer l -> last-layer state at the prompt's last
token, and its Jacobian at a point.

Only the tokens from the subject's last one onward depend on the subject state, so the tokens before it run once
into a key/value cache and each pass runs the short rest. `jacobian` runs that rest forward once and then pulls all
d unit cotangents back through it in one vectorised backward (autograd's batched gradients, `rows` at a time only to
bound memory): d backwards for one forward, where copying the state into d rows would pay d forwards too.
`jacobian_loop` is the reference the benchmark and tests compare against: one backward per output dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.kv_cache import prefix_cache, repeat_cache
from lensflow.tasks.core.models import LM


@dataclass(frozen=True)
class Prompt:
    """Token ids of a prompt (in-context demos + the relation's prompt) and where the subject's last token is."""

    ids: tuple[int, ...]
    subject_last: int

    @property
    def last(self) -> int:
        return len(self.ids) - 1


def encode_prompt(tokenizer, prefix: str, template: str, subject: str) -> Prompt:
    """`prefix` (demos, ending in a newline) and the filled template, tokenised apart and joined, so every prompt
    with the same demos shares the prefix's tokens (and its key/value cache)."""
    text = template.replace("{}", subject)
    a = template.index("{}")
    b = a + len(subject)
    pre = tokenizer(prefix)["input_ids"] if prefix else []
    enc = tokenizer(text, add_special_tokens=not pre, return_offsets_mapping=True)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < b and e > a]
    return Prompt(tuple(pre) + tuple(enc["input_ids"]), len(pre) + inside[-1])


@dataclass(frozen=True)
class Linearisation:
    """F at one sample: the subject state s, the last-layer state z = F(s) and the Jacobian J = dz/ds [d, d]."""

    s: torch.Tensor
    z: torch.Tensor
    jacobian: torch.Tensor


def _rest(lm: LM, prompt: Prompt, layer: int, h: torch.Tensor | None, grad: bool):
    """Run the prompt from its subject's last token on (rows = h's rows), h replacing the subject state at `layer`;
    returns (subject state read there, last-layer state at the last token)."""
    p = prompt.subject_last
    cache = prefix_cache(lm, prompt.ids[:p])
    rows = 1 if h is None else h.shape[0]
    rest = torch.tensor([prompt.ids[p:]], device=lm.device).expand(rows, -1)
    edits = [] if h is None else [Edit("resid", layer, h, position=0)]
    reads = [Read("resid", layer, position=0), Read("resid", lm.n_layers, position=-1, grad=grad)]
    with torch.set_grad_enabled(grad), trace(lm, reads=reads, edits=edits) as t:
        lm.base(input_ids=rest, past_key_values=repeat_cache(cache, rows), use_cache=cache is not None)
    return t["resid", layer], t["resid", lm.n_layers]


def jacobian(lm: LM, prompt: Prompt, layer: int, rows: int | None = None) -> Linearisation:
    """dz/ds: one forward of the rest, then ceil(d / rows) batched backwards of `rows` unit cotangents each."""
    s, _ = _rest(lm, prompt, layer, None, grad=False)
    h = s.clone().requires_grad_(True)
    _, out = _rest(lm, prompt, layer, h, grad=True)
    d = out.shape[1]
    rows = min(rows or d, d)
    jac = torch.empty(d, d)
    for c0 in range(0, d, rows):
        c = min(rows, d - c0)
        cotangents = torch.zeros(c, *out.shape, dtype=out.dtype, device=out.device)
        cotangents[torch.arange(c), 0, torch.arange(c0, c0 + c)] = 1
        grads = torch.autograd.grad(out, h, grad_outputs=cotangents, is_grads_batched=True, retain_graph=c0 + c < d)
        jac[c0:c0 + c] = grads[0][:, 0].float().cpu()
    return Linearisation(s[0].float().cpu(), out[0].detach().float().cpu(), jac)


def jacobian_loop(lm: LM, prompt: Prompt, layer: int) -> Linearisation:
    """The reference: one forward, then one backward per output dimension."""
    s, _ = _rest(lm, prompt, layer, None, grad=False)
    h = s.clone().requires_grad_(True)
    _, out = _rest(lm, prompt, layer, h, grad=True)
    d = out.shape[1]
    jac = torch.stack([torch.autograd.grad(out[0, i], h, retain_graph=i < d - 1)[0][0] for i in range(d)])
    return Linearisation(s[0].float().cpu(), out[0].detach().float().cpu(), jac.float().cpu())
