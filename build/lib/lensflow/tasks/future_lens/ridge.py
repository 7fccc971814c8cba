"""Linear maps from one hidden state to others (the Future Lens linear model approximation): closed-form ridge
from streamed sufficient statistics, exact whatever the sample count; the gradient recipe it replaces (the
benchmark's baseline); and the optional KL refinement through the model's own head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lensflow.tasks.core.devices import loss_scaler
from lensflow.tasks.core.models import LM


@dataclass
class RidgeStats:
    """Sufficient statistics of a multi-output least-squares fit, accumulated over streamed row blocks
    (float64), so the fit is exact whatever the sample count and never needs all rows in memory."""

    n: int = 0
    sh: torch.Tensor | None = None
    sy: torch.Tensor | None = None
    hh: torch.Tensor | None = None
    hy: torch.Tensor | None = None
    yy: torch.Tensor | None = None  # per output dimension

    def add(self, h: torch.Tensor, y: torch.Tensor) -> None:
        h, y = h.double(), y.double()
        if self.hh is None:
            self.sh, self.sy = h.new_zeros(h.shape[1]), y.new_zeros(y.shape[1])
            self.hh, self.hy = h.new_zeros(h.shape[1], h.shape[1]), h.new_zeros(h.shape[1], y.shape[1])
            self.yy = y.new_zeros(y.shape[1])
        self.n += h.shape[0]
        self.sh += h.sum(0)
        self.sy += y.sum(0)
        self.hh += h.T @ h
        self.hy += h.T @ y
        self.yy += (y * y).sum(0)

    def merge(self, other: RidgeStats) -> RidgeStats:
        out = RidgeStats(self.n + other.n)
        for name in ("sh", "sy", "hh", "hy", "yy"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def centred(self, mh: torch.Tensor, my: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gram matrices of h - mh, y - my (means of some other set, e.g. the fitting rows)."""
        n, sh, sy = self.n, self.sh, self.sy
        hh = self.hh - torch.outer(sh, mh) - torch.outer(mh, sh) + n * torch.outer(mh, mh)
        hy = self.hy - torch.outer(sh, my) - torch.outer(mh, sy) + n * torch.outer(mh, my)
        yy = self.yy - 2 * sy * my + n * my * my
        return hh, hy, yy


def fit_ridge(fit: RidgeStats, val: RidgeStats | None, ridges: list[float], groups: int = 1,
              chosen: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Closed-form ridge y ~ (h - mh) W + my. The penalty is relative (lambda * mean eigenvalue of the Gram
    matrix), so one grid works at every layer whatever the activation scale; it is chosen on `val` by
    squared error computed from statistics alone (one eigendecomposition, every lambda nearly free),
    separately for each of `groups` equal blocks of output columns (one per future offset N: the next
    token's state is far more predictable than later ones and wants far less shrinkage). chosen: one
    penalty per block, no selection (the refit on all training rows)."""
    mh, my = fit.sh / fit.n, fit.sy / fit.n
    hh, hy, _ = fit.centred(mh, my)
    evals, evecs = torch.linalg.eigh(hh)
    evals = evals.clamp_min(0)
    scale = float(evals.mean())
    proj = evecs.T @ hy

    def solve(lam: float) -> torch.Tensor:
        return evecs @ (proj / (evals + lam * scale).unsqueeze(1))

    width = hy.shape[1] // groups
    best = list(chosen) if chosen is not None else [ridges[0]] * groups
    info: dict = {"val_mse": {}}
    if chosen is None and val is not None and val.n and len(ridges) > 1:
        vhh, vhy, vyy = val.centred(mh, my)
        errs = {}
        for lam in ridges:
            w = solve(lam)
            per_col = vyy - 2 * (w * vhy).sum(0) + (w * (vhh @ w)).sum(0)
            errs[lam] = (per_col.view(groups, width).sum(1) / val.n).tolist()
        best = [min(ridges, key=lambda lam: errs[lam][g]) for g in range(groups)]
        info["val_mse"] = {lam: sum(e) for lam, e in errs.items()}
    info["ridge"] = best
    sols = {lam: solve(lam) for lam in set(best)}
    w = torch.cat([sols[lam][:, g * width : (g + 1) * width] for g, lam in enumerate(best)], 1)
    return w.float(), (my - mh @ w).float(), info


def fit_linear_sgd(h: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The gradient recipe for the same map (Adam on squared error, standardised inputs): the benchmark's
    baseline against the closed form."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = h.mean(0), h.std(0).clamp_min(1e-6)
    x = (h - mu) / sd
    d_in, d_out = h.shape[1], y.shape[1]
    w = torch.zeros(d_in, d_out, requires_grad=True)
    b = y.mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, h.shape[0], (min(batch, h.shape[0]),), generator=g)
        loss = ((x[idx] @ w + b - y[idx]) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    w_eff = (w.detach() / sd.unsqueeze(1))
    return w_eff, b.detach() - mu @ w_eff, losses


def finetune_hidden_kl(lm: LM, h: torch.Tensor, teacher: torch.Tensor, w: torch.Tensor, b: torch.Tensor, steps: int,
                       lr: float, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optional: refine the ridge map so decode(h W + b) matches the model's own distribution (KL), as the
    paper's linear model approximation is trained; the model stays frozen. w, b are float32 master weights; through
    a float16 model the loss is scaled (devices.loss_scaler)."""
    g = torch.Generator().manual_seed(seed)
    w = w.clone().float().to(lm.device).requires_grad_(True)
    b = b.clone().float().to(lm.device).requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    scaler = loss_scaler(lm.dtype, lm.device)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, h.shape[0], (min(batch, h.shape[0]),), generator=g)
        hb, tb = h[idx].to(lm.device, lm.dtype), teacher[idx].to(lm.device, lm.dtype)
        with torch.no_grad():
            p_t = torch.log_softmax(lm.decode(tb).float(), -1)
        p_s = torch.log_softmax(lm.decode((hb @ w.to(lm.dtype) + b.to(lm.dtype))).float(), -1)
        loss = F.kl_div(p_s, p_t, log_target=True, reduction="batchmean")
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return w.detach().float().cpu(), b.detach().float().cpu(), losses
