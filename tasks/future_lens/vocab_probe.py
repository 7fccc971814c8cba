"""Direct vocabulary probe for Future Lens: a low-rank map from one hidden state to the tokens at T+1..T+N+1,
trained on the model's own greedy tokens (no model needed: it runs as a plain Ray remote function)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class VocabProbe:
    """h -> logits over the tokens seen as training targets, low rank: logits_N = B_N A (h - mu)/sd + c_N.

    Why this shape: a full [vocab, d] map per (layer, N) is 28M parameters for SmolLM2 and 200M for GPT-J,
    far beyond what a few thousand CPU steps (or 100k samples) can fit; a shared rank-r read-out A plus a
    per-N head over the target vocabulary is cheap and regularised. Tokens never seen as targets get the
    floor probability eps / (V - |vocab|) (they cannot be learned from the data), so surprisal stays finite."""

    mu: torch.Tensor
    sd: torch.Tensor
    a: torch.Tensor  # [r, d]
    b: torch.Tensor  # [n_future, |vocab|, r]
    c: torch.Tensor  # [n_future, |vocab|]
    vocab: torch.Tensor  # [|vocab|] token ids
    eps: float = 1e-3

    def state(self) -> dict[str, torch.Tensor]:
        return {"mu": self.mu, "sd": self.sd, "a": self.a, "b": self.b, "c": self.c, "vocab": self.vocab,
                "eps": torch.tensor(self.eps)}

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> VocabProbe:
        return cls(s["mu"], s["sd"], s["a"], s["b"], s["c"], s["vocab"].long(), float(s["eps"]))

    def to(self, device: torch.device | str) -> VocabProbe:
        return VocabProbe(*(getattr(self, k).to(device) for k in ("mu", "sd", "a", "b", "c", "vocab")), self.eps)

    def logits_small(self, h: torch.Tensor) -> torch.Tensor:
        z = ((h - self.mu) / self.sd) @ self.a.T  # [n, r]
        return torch.einsum("nr,kvr->knv", z, self.b) + self.c.unsqueeze(1)  # [n_future, n, |vocab|]

    def logprobs(self, h: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
        """Full-vocabulary log-probabilities for future offset n (floor for tokens outside the probe's vocab)."""
        small = torch.log_softmax(self.logits_small(h)[n], -1) + math.log1p(-self.eps)
        rest = vocab_size - self.vocab.numel()
        out = torch.full((h.shape[0], vocab_size), math.log(self.eps / max(rest, 1)), device=small.device)
        out[:, self.vocab] = small
        return out


def fit_vocab_probe(batches, vocab: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor, n_future: int, rank: int,
                    steps: int, lr: float, weight_decay: float, prior: torch.Tensor | None = None, seed: int = 0
                    ) -> tuple[VocabProbe, list[float]]:
    """AdamW on cross-entropy against the model's own tokens, all N jointly (mean over N), minibatches from
    `batches` (dicts with h [b, d] and greedy [b, n_future]). prior: [n_future, |vocab|] initial log-frequencies.
    The probe trains in float32 on mu's device (the same initialisation on every device); batches move there."""
    g = torch.Generator().manual_seed(seed)
    dev = mu.device
    d = mu.numel()
    r = min(rank, d)
    a = (torch.randn(r, d, generator=g) / math.sqrt(d)).to(dev).requires_grad_(True)
    b = torch.zeros(n_future, vocab.numel(), r, device=dev, requires_grad=True)
    c = (prior.clone() if prior is not None else torch.zeros(n_future, vocab.numel())).to(dev).requires_grad_(True)
    opt = torch.optim.AdamW([a, b, c], lr=lr, weight_decay=weight_decay)
    losses = []
    for _, mb in zip(range(steps), batches):
        local = torch.searchsorted(vocab, mb.greedy.to(dev))
        z = ((mb.h.to(dev, torch.float32) - mu) / sd) @ a.T
        logits = torch.einsum("nr,kvr->knv", z, b) + c.unsqueeze(1)
        loss = sum(F.cross_entropy(logits[j], local[:, j]) for j in range(n_future)) / n_future
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return VocabProbe(mu, sd, a.detach(), b.detach(), c.detach(), vocab), losses
