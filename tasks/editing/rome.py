"""ROME (Meng et al. 2022) and MEMIT (Meng et al. 2023): rewrite a fact by changing an MLP's output projection
(the `mlp_down` module of the architecture table) so that the subject's key maps to a new value.

Keys are the MLP's hidden activations (`mlp_neurons`) at the subject's last token, averaged over context prefixes
(the first one empty); values are optimised with the paper's loss: the new object's log-likelihood after each
prefix, a KL term keeping "{subject} is a"'s next-token distribution (the subject's other properties), and a weight
decay, with the delta's norm clamped. ROME adds a rank-one term with the key covariance C of text; MEMIT spreads many
edits over several layers, each layer taking its share of the residual left at the last one.

Weight deltas are [out, in] tensors (nn.Linear's layout; GPT-2's Conv1D is transposed on apply). `applied` adds them
to the model in place and copies the kept original tensors back afterwards, restoring the model bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.kv_cache import CachedRows
from lensflow.tasks.core.models import LM
from lensflow.tasks.editing.requests import Request


def _conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


@contextmanager
def applied(lm: LM, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """The model with W_l += delta_l for every layer, then each original tensor copied back (bit for bit)."""
    saved: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for layer, delta in deltas.items():
                module = lm.mlp_down(layer)
                w = module.weight
                saved[layer] = w.detach().clone()
                w.add_((delta.T if _conv1d(module) else delta).to(w.device, w.dtype))
        yield
    finally:
        with torch.no_grad():
            for layer, original in saved.items():
                lm.mlp_down(layer).weight.copy_(original)


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    subject_last: int


def encode(tokenizer, text: str, subject: str, at: int | None = None) -> Encoded:
    """Token ids of `text` and the last token overlapping `subject` (its occurrence at character `at`, default
    the first)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    a = text.index(subject) if at is None else at
    b = a + len(subject)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < b and e > a]
    return Encoded(list(enc["input_ids"]), inside[-1])


def _batch(lm: LM, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=lm.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=lm.device)
    return ids, mask


def in_context(tokenizer, prefixes: Sequence[str], prompt: str, subject: str) -> list[Encoded]:
    """The prompt after each prefix, with the subject located in the prompt (not in a prefix)."""
    return [encode(tokenizer, p + prompt, subject, len(p) + prompt.index(subject)) for p in prefixes]


@torch.no_grad()
def read_at_subject(lm: LM, site: str, layer: int, encs: Sequence[Encoded]) -> torch.Tensor:
    """[rows, width] of the site at each row's last subject token."""
    ids, mask = _batch(lm, [e.ids for e in encs])
    pos = torch.tensor([e.subject_last for e in encs], device=lm.device)
    with trace(lm, reads=[Read(site, layer, position=pos)]) as t:
        t.forward(input_ids=ids, attention_mask=mask, until=min(layer + 1, lm.n_layers))
    return t[site, layer].float()


def mean_keys(lm: LM, layer: int, requests: Sequence[Request], prefixes: Sequence[str]) -> torch.Tensor:
    """[requests, d_ff]: each request's key at `layer`, averaged over the prefixes."""
    encs = [e for r in requests for e in in_context(lm.tokenizer, prefixes, r.prompt, r.subject)]
    return read_at_subject(lm, "mlp_neurons", layer, encs).view(len(requests), len(prefixes), -1).mean(1)


@dataclass(frozen=True)
class ValueSettings:
    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm: float


@dataclass(frozen=True)
class Value:
    """The state at (site, layer) on the plain prompt's last subject token, and the delta that makes the new
    object likely; the edit's target is v + delta. `nll` is the new object's mean NLL before / after."""

    v: torch.Tensor
    delta: torch.Tensor
    nll_before: float
    nll_after: float


def target_ids(tokenizer, text: str, target: str) -> list[int]:
    """The continuation's tokens as the model sees them after `text` (merges at the boundary honoured)."""
    p = tokenizer(text)["input_ids"]
    full = tokenizer(text + target)["input_ids"]
    if len(full) > len(p) and full[:len(p)] == p:
        return full[len(p):]
    return tokenizer(target, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class ValueRows:
    """The rows a value is optimised on: each prefix + prompt + the new object's tokens but the last, then the KL
    prompt "{subject} is a"; each row's last subject token (where the edit goes) and, per prefix row, the position
    of the first target logit and the target's tokens."""

    rows: list[list[int]]
    subject: list[int]
    targets: list[tuple[int, list[int]]]

    @classmethod
    def of(cls, tok, req: Request, prefixes: Sequence[str]) -> ValueRows:
        rows, subject, targets = [], [], []
        for p, e in zip(prefixes, in_context(tok, prefixes, req.prompt, req.subject)):
            t = target_ids(tok, p + req.prompt, req.target_new)
            rows.append(e.ids + t[:-1])
            subject.append(e.subject_last)
            targets.append((len(e.ids) - 1, t))
        kl = encode(tok, f"{req.subject} is a", req.subject)
        return cls(rows + [kl.ids], subject + [kl.subject_last], targets)


def optimise_value(lm: LM, req: Request, site: str, layer: int, prefixes: Sequence[str], st: ValueSettings) -> Value:
    """The paper's value: argmin over delta of NLL(new object | prefix + prompt) + kl_factor KL(before || after on
    "{subject} is a") + weight_decay |delta|^2 / |v|^2, |delta| clamped to clamp_norm |v|."""
    tok = lm.tokenizer
    vr = ValueRows.of(tok, req, prefixes)
    cuts = vr.subject
    targets = [(s - cut, t) for (s, t), cut in zip(vr.targets, cuts)]  # where the target's logits start, after the cut
    kl_ids = vr.rows[-1]
    kl_at = len(kl_ids) - 1 - cuts[-1]
    v = read_at_subject(lm, site, layer, [encode(tok, req.prompt, req.subject)])[0]
    with torch.no_grad():
        ids, mask = _batch(lm, [kl_ids])
        base = lm.model(input_ids=ids, attention_mask=mask).logits[0, len(kl_ids) - 1].float().log_softmax(-1)
    # the tokens before each subject's last one are the same at every step: run once, each step runs the rest
    batch = CachedRows.of(lm, vr.rows, cuts)

    def losses(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with trace(lm, edits=[Edit(site, layer, delta.to(lm.dtype), position=0, mode="add")]):
            logp = batch.logits(lm).float().log_softmax(-1)
        nll = torch.stack([-logp[i, s + torch.arange(len(t)), torch.tensor(t)].mean()
                           for i, (s, t) in enumerate(targets)]).mean()
        kl_div = (base.exp() * (base - logp[-1, kl_at])).sum()
        return nll, kl_div

    delta = torch.zeros_like(v, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=st.lr)
    limit = st.clamp_norm * v.norm()
    with torch.no_grad():
        before = losses(delta)[0].item()
    for _ in range(st.steps):
        opt.zero_grad()
        nll, kl_div = losses(delta)
        loss = nll + st.kl_factor * kl_div + st.weight_decay * delta.norm() ** 2 / v.norm() ** 2
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    with torch.no_grad():
        after = losses(delta)[0].item()
    return Value(v.cpu(), delta.detach().cpu(), before, after)


def rome_delta(lm: LM, layer: int, req: Request, value: Value, prefixes: Sequence[str],
               cov: torch.Tensor) -> torch.Tensor:
    """[d, d_ff] rank-one delta: (v* - v) (C^-1 k*)^T / ((C^-1 k*) . k), with k* the key averaged over prefixes and
    k, v the key and MLP output on the plain prompt, so the plain prompt's MLP output becomes v* = v + delta."""
    k_star = mean_keys(lm, layer, [req], prefixes)[0].double()
    k = read_at_subject(lm, "mlp_neurons", layer, [encode(lm.tokenizer, req.prompt, req.subject)])[0].double()
    u = torch.linalg.solve(cov.double().to(k), k_star)
    left = u / (u @ k)
    return torch.outer(value.delta.double().to(k), left).float().cpu()


def memit_deltas(lm: LM, layers: Sequence[int], requests: Sequence[Request], targets: torch.Tensor,
                 prefixes: Sequence[str], covs: Mapping[int, torch.Tensor], cov_weight: float
                 ) -> dict[int, torch.Tensor]:
    """MEMIT: `targets` [m, d] are the wanted states at resid layer max(layers) + 1 (the output of the last edited
    block) on each plain prompt. Layer by layer, on the model edited so far: the residual left there, shared out
    over the layers still to come, is written into this layer's keys: dW = R^T K (lambda C + K^T K)^-1."""
    layers = sorted(layers)
    out_layer = layers[-1] + 1
    plain = [encode(lm.tokenizer, r.prompt, r.subject) for r in requests]
    deltas: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        with applied(lm, deltas):
            K = mean_keys(lm, layer, requests, prefixes).double()
            h = read_at_subject(lm, "resid", out_layer, plain).double()
        R = (targets.double().to(h) - h) / (len(layers) - i)
        A = cov_weight * covs[layer].double().to(K) + K.T @ K
        deltas[layer] = torch.linalg.solve(A, K.T @ R).T.float().cpu()
    return deltas


@torch.no_grad()
def key_covariance(lm: LM, layer: int, texts: Sequence[str], max_tokens: int, batch: int = 16) -> torch.Tensor:
    """E[k k^T] of the MLP keys at `layer` over every token of `texts` (the paper's uncentred second moment)."""
    total, count = None, 0
    for i in range(0, len(texts), batch):
        enc = lm.encode(list(texts[i:i + batch]), max_tokens=max_tokens)
        with trace(lm, reads=[Read("mlp_neurons", layer)]) as t:
            t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=layer + 1)
        k = t["mlp_neurons", layer][enc["attention_mask"].bool()].double()
        total = k.T @ k if total is None else total + k.T @ k
        count += k.shape[0]
    return (total / count).float().cpu()
