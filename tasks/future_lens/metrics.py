"""Future Lens metrics: Precision@k and surprisal of a predicted distribution against the model's own tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lensflow.tasks.core.models import LM

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Score:
    """A prediction's quality at one offset N: Precision@k for each k, and mean surprisal in bits."""

    p_at: dict[int, float]
    surprisal: float

    @property
    def p_at_1(self) -> float:
        return self.p_at[1]

    def as_dict(self) -> dict[str, float]:
        """The stage items' stored form, whose keys are also the logged metrics' names (`p_at_1`, `surprisal`)."""
        return {**{f"p_at_{k}": v for k, v in self.p_at.items()}, "surprisal": self.surprisal}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> Score:
        return cls({int(k.removeprefix("p_at_")): v for k, v in d.items() if k.startswith("p_at_")}, d["surprisal"])


def score(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> Score:
    """Precision@k (target among the k highest logits; ties count against the target) and mean surprisal
    in bits, -log2 p(target), of the normalised distribution."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    tgt = targets.long().view(-1, 1)
    lt = logits.gather(1, tgt)
    rank = (logits > lt).sum(1)  # 0 = top-1
    return Score({k: float((rank < k).float().mean()) for k in ks},
                 float((-logp.gather(1, tgt).squeeze(1) / LN2).mean()))


@torch.no_grad()
def decoded_scores(lm: LM, pred: torch.Tensor, greedy: torch.Tensor, ks: tuple[int, ...], batch: int) -> list[Score]:
    """Metrics of predicted final-layer states [n, N, d], decoded by the model's own final norm + unembedding."""
    out = []
    for n in range(greedy.shape[1]):
        logits = torch.cat([lm.decode(pred[i : i + batch, n].to(lm.device, lm.dtype)).float().cpu()
                            for i in range(0, pred.shape[0], batch)])
        out.append(score(logits, greedy[:, n], ks))
    return out
