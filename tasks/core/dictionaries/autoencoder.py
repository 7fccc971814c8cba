"""The sparse autoencoder itself (TopK or ReLU + L1, unit-norm decoder rows, one input scale per layer): what
sae.py trains and saelens.py reads and writes in the SAELens layout."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("topk", "relu")


class SparseAutoencoder(nn.Module):
    def __init__(self, d_in: int, width: int, activation: str = "topk", k: int = 32, seed: int = 0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown SAE activation '{activation}' (choose from {', '.join(ACTIVATIONS)})")
        if activation == "topk" and not 0 < k <= width:
            raise ValueError(f"TopK SAE needs 0 < k <= width, got k={k}, width={width}")
        self.activation, self.k = activation, k
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(width, d_in, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # [width, d]: one unit-norm direction per feature
        self.W_enc = nn.Parameter(w.clone())  # [width, d], tied at init (Gao et al.): features start on their direction
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))

    @property
    def width(self) -> int:
        return self.W_dec.shape[0]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x / self.scale - self.b_dec) @ self.W_enc.T + self.b_enc

    def _topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [.., k] after ReLU, feature indices [.., k]): the k largest pre-activations of each token."""
        vals, idx = self.pre_acts(x).topk(self.k, dim=-1)
        return torch.relu(vals), idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [.., width]; for topk, exactly the k largest pre-activations survive (then ReLU)."""
        if self.activation == "relu":
            return torch.relu(self.pre_acts(x))
        vals, idx = self._topk(x)
        return torch.zeros(*x.shape[:-1], self.width, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W_dec + self.b_dec) * self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, dense codes). TopK decodes from its k decoder rows with embedding_bag instead of a
        width x d matmul over mostly zeros: measured 2x faster per training step on CPU (d 576, width 2304, k 32)."""
        if self.activation == "relu":
            z = self.encode(x)
            return self.decode(z), z
        vals, idx = self._topk(x)
        flat_idx, flat_vals = idx.reshape(-1, self.k), vals.reshape(-1, self.k)
        x_hat = nn.functional.embedding_bag(flat_idx, self.W_dec, per_sample_weights=flat_vals, mode="sum")
        x_hat = (x_hat.reshape(*x.shape[:-1], -1) + self.b_dec) * self.scale
        z = torch.zeros(*x.shape[:-1], self.width, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals.detach())
        return x_hat, z

    @torch.no_grad()
    def fit_input(self, x: torch.Tensor) -> None:
        """Set the input scale (mean squared norm per dim = 1) and b_dec (the data mean) from a first batch."""
        self.scale.fill_(float(x.pow(2).sum(-1).mean().div(x.shape[-1]).sqrt().clamp_min(1e-8)))
        self.b_dec.copy_((x / self.scale).mean(0))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def state(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the SAE, as tensors (safetensors holds tensors only)."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        sd["k"] = torch.tensor(self.k)
        sd["topk"] = torch.tensor(int(self.activation == "topk"))
        return sd

    @classmethod
    def from_state(cls, sd: dict[str, torch.Tensor]) -> "SparseAutoencoder":
        width, d = sd["W_dec"].shape
        sae = cls(d, width, "topk" if int(sd["topk"]) else "relu", k=int(sd["k"]))
        sae.load_state_dict({k: v for k, v in sd.items() if k not in ("k", "topk")})
        return sae
