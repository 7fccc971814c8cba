"""Logit lens and tuned lens (Belrose et al., 2023): read every residual layer as a next-token distribution.

Logit lens: decode layer l's residual state through the model's own final norm and unembedding (`LM.decode`).
Tuned lens: first map the state through a learned affine translator per layer, h -> h + A h + b (A, b start at
zero, so training starts from the logit lens), trained to minimise KL(final || lens) over tokens.

The loss needs the model's final distribution p per token, but never the whole of it: with z = W n + b the lens
logits (n = final_norm(h)), KL(p || softmax z) = logsumexp(z) - u.n - c where u = W^T p and c = H(p) + p.b.
So the targets of every token are d_model + 2 numbers (`LensTargets`), computed once from the stored last layer,
instead of a vocab-sized distribution recomputed for every layer and step; the loss and its gradient are exact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import LM


class Readout(nn.Module):
    """The model's final norm + unembedding, copied out of the model so Ray tasks decode without loading it."""

    def __init__(self, norm: nn.Module, unembed: nn.Module):
        super().__init__()
        self.norm = norm
        self.unembed = unembed
        self.requires_grad_(False)

    @classmethod
    def from_lm(cls, lm: LM, dtype: torch.dtype = torch.float32) -> Readout:
        norm = copy.deepcopy(lm.final_norm).to(device="cpu", dtype=dtype)
        unembed = copy.deepcopy(lm.unembed).to(device="cpu", dtype=dtype)
        return cls(norm, unembed).eval()

    @property
    def weight(self) -> torch.Tensor:
        return self.unembed.weight  # [vocab, d]

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.unembed, "bias", None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.norm(h))


class Translator(nn.Module):
    """One tuned-lens layer: h -> h + A h + b, starting at the identity (A = 0, b = 0), i.e. at the logit lens."""

    def __init__(self, d_model: int):
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.linear(h.to(self.linear.weight.dtype)).to(h.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.linear.weight.detach().cpu().contiguous(), "bias": self.linear.bias.detach().cpu().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Translator:
        t = cls(tensors["weight"].shape[0])
        t.linear.load_state_dict({"weight": tensors["weight"].float(), "bias": tensors["bias"].float()})
        return t


@dataclass
class LensTargets:
    """Per-token summary of the final distribution p: u = W^T p [N, d], c = H(p) + p.b [N], top1 = argmax p [N]."""

    u: torch.Tensor
    c: torch.Tensor
    top1: torch.Tensor

    def __len__(self) -> int:
        return self.u.shape[0]

    def to(self, device: torch.device | str) -> LensTargets:
        return LensTargets(self.u.to(device), self.c.to(device), self.top1.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"u": self.u, "c": self.c, "top1": self.top1}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LensTargets:
        return cls(tensors["u"], tensors["c"], tensors["top1"])

    def __getitem__(self, idx) -> LensTargets:
        return LensTargets(self.u[idx], self.c[idx], self.top1[idx])

    @staticmethod
    def cat(parts: list[LensTargets]) -> LensTargets:
        return LensTargets(*(torch.cat([getattr(p, k) for p in parts]) for k in ("u", "c", "top1")))


@torch.no_grad()
def final_targets(readout: Readout, h_last: torch.Tensor, chunk: int = 512) -> LensTargets:
    """Targets from the last residual layer (the model's own output distribution), `chunk` tokens at a time."""
    parts = []
    for x in h_last.float().split(chunk):
        z = readout(x).float()
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        c = -(p * logp).sum(-1)
        if readout.bias is not None:
            c = c + p @ readout.bias.float()
        parts.append(LensTargets(p @ readout.weight.float(), c, z.argmax(-1)))
    return LensTargets.cat(parts)


class _LogSumExp(torch.autograd.Function):
    """logsumexp over the vocab in fp32 that keeps softmax(z) for the backward pass: two fewer passes over
    [tokens, vocab] than autograd's version, which matters because those passes rival the matmuls on CPU."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        p = z.to(torch.promote_types(z.dtype, torch.float32), copy=True)  # fp32 or better; a copy, z stays intact
        m = p.amax(-1, keepdim=True)
        s = p.sub_(m).exp_().sum(-1, keepdim=True)
        ctx.save_for_backward(p.div_(s))
        ctx.in_dtype = z.dtype
        return (m + s.log()).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        return p.mul_(grad.unsqueeze(-1)).to(ctx.in_dtype)  # p is not needed again: reuse its memory


def kl_and_top1(readout: Readout, h: torch.Tensor, targets: LensTargets,
                top1: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token KL(final || lens) in nats and whether the lens' top token is the model's, for states h [N, d]
    (already translated for the tuned lens). Differentiable in h; the readout's dtype sets the matmul precision."""
    n = readout.norm(h.to(readout.weight.dtype))
    z = readout.unembed(n)
    kl = _LogSumExp.apply(z) - (n.float() * targets.u).sum(-1) - targets.c
    return kl, (z.argmax(-1) == targets.top1) if top1 else None


@torch.no_grad()
def evaluate(readout: Readout, batches: Iterable[tuple[torch.Tensor, LensTargets]],
             translator: Translator | None = None) -> dict[str, float]:
    """Mean KL to the final distribution and top-1 agreement over all tokens of `batches`."""
    kl_sum, agree, n = 0.0, 0, 0
    for h, tgt in batches:
        kl, hit = kl_and_top1(readout, translator(h) if translator is not None else h, tgt)
        kl_sum += kl.double().sum().item()
        agree += int(hit.sum())
        n += len(tgt)
    if n == 0:
        raise ValueError("no tokens to evaluate")
    return {"kl_to_final": kl_sum / n, "top1_agree": agree / n}


def train_translator(
    readout: Readout,
    batches: Callable[[int], Iterable[tuple[torch.Tensor, LensTargets]]],
    d_model: int,
    epochs: int,
    lr: float,
    steps_per_epoch: int,
    weight_decay: float = 0.0,
    compute_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[Translator, list[float]]:
    """Fit one layer's translator by AdamW on KL(final || lens), the learning rate decaying linearly to zero
    over epochs * steps_per_epoch steps; `batches(epoch)` yields (h [B, d], LensTargets).

    The frozen readout runs in `compute_dtype` (bf16 matmuls are ~3x faster where the hardware has them and
    up to 7x slower where it does not: tasks/core/kernels.py chooses; the translator, loss and optimizer stay fp32,
    so no loss scaling is needed). The translator is created
    on the readout's device, where the batches must be. Returns the translator and the per-step losses."""
    torch.manual_seed(seed)
    head = readout if compute_dtype == readout.weight.dtype else copy.deepcopy(readout).to(compute_dtype)
    tr = Translator(d_model).to(head.weight.device)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)  # linear decay to zero: large steps early, settled at the end
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))
    losses: list[float] = []
    for epoch in range(epochs):
        for h, tgt in batches(epoch):
            kl, _ = kl_and_top1(head, tr(h.float()), tgt, top1=False)
            loss = kl.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return tr.eval().requires_grad_(False), losses


def token_offsets(lengths: np.ndarray) -> np.ndarray:
    """Index of each prompt's first token in the flat (prompt, position) token order the targets use."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def flatten_tokens(block: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """[rows, T, d] right-padded block -> [sum(lengths), d] real tokens in (row, position) order."""
    x = torch.from_numpy(np.ascontiguousarray(block))
    mask = torch.arange(x.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]
    return x[mask]


def token_batches(
    blocks: Iterable[tuple[int, np.ndarray]],
    lengths: np.ndarray,
    targets: LensTargets,
    batch_tokens: int,
    rows: range,
    shuffle_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, LensTargets]]:
    """Stream (h, targets) minibatches of real tokens from row blocks (start_row, [rows, T, d]) of one layer,
    keeping only prompts in `rows`; tokens are shuffled within a block when shuffle_seed is set."""
    offsets = token_offsets(lengths)
    gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    for start, block in blocks:
        lo, hi = max(start, rows.start), min(start + len(block), rows.stop)
        if lo >= hi:
            continue
        h = flatten_tokens(block[lo - start:hi - start], lengths[lo:hi])
        tgt = targets[slice(offsets[lo], offsets[hi])]
        if gen is not None:
            perm = torch.randperm(len(h), generator=gen)
            h, tgt = h[perm], tgt[perm]
        for i in range(0, len(h), batch_tokens):
            yield h[i:i + batch_tokens].float(), tgt[i:i + batch_tokens]


@dataclass(frozen=True)
class PromptStates:
    """Enough to draw the lens grid of one prompt for any lens away from the model (driver side)."""

    tokens: list[str]
    states: torch.Tensor  # every resid layer, float32 [n_layers + 1, tokens, d]
    tokenizer: Any  # names the lens' predictions


@torch.no_grad()
def prompt_states(lm: LM, prompt: str, max_tokens: int | None = None) -> PromptStates:
    enc = lm.encode([prompt], max_tokens)
    n = int(enc["last"][0]) + 1
    layers = list(range(lm.n_layers + 1))
    with trace(lm, reads=[Read("resid", l) for l in layers]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    states = torch.stack([t["resid", l][0, :n] for l in layers]).float().cpu()
    tokens = [lm.tokenizer.decode([int(k)]) for k in enc["input_ids"][0, :n]]
    return PromptStates(tokens, states, lm.tokenizer)


@torch.no_grad()
def grid_cells(readout: Readout, states: torch.Tensor, tokenizer,
               translators: dict[int, Translator] | None = None) -> tuple[list[int], list[list[str]], np.ndarray]:
    """Layer x token grid for `plots.lens_grid`: each cell is the lens' top next token and its probability;
    logit lens when `translators` is None, tuned lens otherwise (a layer without a translator: identity)."""
    layers = list(range(states.shape[0]))
    cells, probs = [], np.zeros(states.shape[:2])
    for l in layers:
        h = states[l]
        if translators is not None and l in translators:
            h = translators[l](h)
        top_p, top_id = torch.softmax(readout(h).float(), -1).max(-1)
        probs[l] = top_p.numpy()
        cells.append([tokenizer.decode([int(k)]) for k in top_id])
    return layers, cells, probs


def readout_of(lm: LM, _: object = None) -> Readout:
    """Model-actor side: the final norm + unembedding the lens stages need, without the rest of the model."""
    return Readout.from_lm(lm)
