"""Per-layer transcoders (Dunefsky et al. 2024; the replacement MLPs of Anthropic's attribution graphs): a sparse
dictionary that reads what the MLP reads (hooks site `mlp_in`, after the pre-MLP norm) and writes what the MLP block
adds to the residual stream (site `mlp_out`, after Gemma's post-MLP norm), so splicing it in for the MLP leaves the
rest of the model untouched.

  z = ReLU(TopK_k(W_enc (x / s_in - b_in) + b_enc)),   y_hat = (z W_dec + b_out) * s_out

with one input and one output scalar per layer (as the SAE's, sae.py) fitted on the first batch, and unit-norm
decoder rows. Quality: the fraction of the MLP output's variance explained, L0, dead features, and the spliced-in
loss: the model's next-token loss with the block's MLP output replaced by the transcoder's at every real token,
against the clean loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.models import LM


class Transcoder(nn.Module):
    def __init__(self, d_in: int, d_out: int, width: int, k: int = 32, seed: int = 0):
        super().__init__()
        if not 0 < k <= width:
            raise ValueError(f"TopK transcoder needs 0 < k <= width, got k={k}, width={width}")
        self.k = k
        g = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(width, d_out, generator=g)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        w_enc = torch.randn(width, d_in, generator=g)
        self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_in = nn.Parameter(torch.zeros(d_in))
        self.b_out = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("scale_in", torch.ones(()))
        self.register_buffer("scale_out", torch.ones(()))

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]

    def _topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = (x / self.scale_in - self.b_in) @ self.W_enc.T + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.relu(vals), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted MLP output, dense codes)."""
        vals, idx = self._topk(x)
        flat = nn.functional.embedding_bag(idx.reshape(-1, self.k), self.W_dec,
                                           per_sample_weights=vals.reshape(-1, self.k), mode="sum")
        y = (flat.reshape(*x.shape[:-1], -1) + self.b_out) * self.scale_out
        z = torch.zeros(*x.shape[:-1], self.width, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals.detach())
        return y, z

    @torch.no_grad()
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        rms = lambda t: float(t.pow(2).sum(-1).mean().div(t.shape[-1]).sqrt().clamp_min(1e-8))  # noqa: E731
        self.scale_in.fill_(rms(x))
        self.scale_out.fill_(rms(y))
        self.b_in.copy_((x / self.scale_in).mean(0))
        self.b_out.copy_((y / self.scale_out).mean(0))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [.., width] (differentiable: zeros where a feature is not in the top k or not positive)."""
        vals, idx = self._topk(x)
        return torch.zeros(*x.shape[:-1], self.width, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)

    def decoder_vectors(self) -> torch.Tensor:
        """[width, d_out]: what one unit of each feature adds to the MLP output (in the model's units)."""
        return self.W_dec * self.scale_out

    def encoder_vectors(self) -> torch.Tensor:
        """[width, d_in]: each feature's pre-activation is `x @ encoder_vectors().T + encoder_offsets()`."""
        return self.W_enc / self.scale_in

    def encoder_offsets(self) -> torch.Tensor:
        return self.b_enc - self.W_enc @ self.b_in

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The MLP output predicted from dense codes (the transcoder's output when z = encode(x))."""
        return (z @ self.W_dec + self.b_out) * self.scale_out

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()} | {"k": torch.tensor(self.k)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Transcoder:
        width, d_out = tensors["W_dec"].shape
        tc = cls(tensors["W_enc"].shape[1], d_out, width, int(tensors["k"]))
        tc.load_state_dict({k: v for k, v in tensors.items() if k != "k"})
        return tc.requires_grad_(False)


def train_transcoder(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, steps: int, batch_tokens: int, lr: float,
                     seed: int = 0) -> list[float]:
    """Adam on shuffled (mlp_in, mlp_out) token pairs held in memory; MSE per dimension in the output's scale."""
    tc.fit(x[:batch_tokens], y[:batch_tokens])
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while len(losses) < steps:
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, max(1, x.shape[0] - batch_tokens + 1), batch_tokens):
            b = order[i:i + batch_tokens]
            loss = (tc(x[b])[0] - y[b]).div(tc.scale_out).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tc.normalize_decoder()
            losses.append(loss.item())
            if len(losses) >= steps:
                break
    return losses


@dataclass(frozen=True)
class TranscoderMetrics:
    fve: float  # of the MLP output, 1 - SSE / total variance
    l0: float
    dead: float


@torch.no_grad()
def evaluate_transcoder(tc: Transcoder, x: torch.Tensor, y: torch.Tensor) -> TranscoderMetrics:
    y_hat, z = tc(x)
    yd = y.double()
    sse = float((y_hat.double() - yd).pow(2).sum())
    total = float((yd - yd.mean(0)).pow(2).sum())
    active = z > 0
    return TranscoderMetrics(1 - sse / total, float(active.sum(-1).float().mean()),
                             1 - float(active.any(0).float().mean()))


@torch.no_grad()
def mlp_pairs(lm: LM, texts: list[str], block: int, max_tokens: int,
              skip_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp_in, mlp_out) [tokens, d] of one block at every real token (first one dropped with skip_first)."""
    enc = lm.encode(texts, max_tokens=max_tokens)
    with trace(lm, reads=[Read("mlp_in", block), Read("mlp_out", block)]) as t:
        t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=block + 1)
    mask = enc["attention_mask"].bool()
    if skip_first:
        mask[:, 0] = False
    return t["mlp_in", block][mask].float(), t["mlp_out", block][mask].float()


@dataclass(frozen=True)
class SplicedLoss:
    clean: float  # mean next-token cross-entropy over real tokens
    spliced: float  # the same with block `block`'s MLP output replaced by the transcoder's at every position

    @property
    def delta(self) -> float:
        return self.spliced - self.clean


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].bool()
    return float(-(lp[m]).mean())


@torch.no_grad()
def spliced_loss(lm: LM, tc: Transcoder, block: int, texts: list[str], max_tokens: int) -> SplicedLoss:
    """Clean and spliced-in next-token loss. The MLP's input at `block` does not depend on that block's output, so
    one clean pass reads it and a second pass writes the transcoder's output at every position (trace edits)."""
    enc = lm.encode(texts, max_tokens=max_tokens)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with trace(lm, reads=[Read("mlp_in", block)]) as t:
        clean_logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    y_hat = tc(t["mlp_in", block].float())[0].to(clean_logits.dtype)
    edits = [Edit("mlp_out", block, y_hat[:, p], position=p) for p in range(ids.shape[1])]
    with trace(lm, edits=edits):
        spliced_logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return SplicedLoss(_ce(clean_logits, ids, mask), _ce(spliced_logits, ids, mask))
