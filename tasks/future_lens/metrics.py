"""Future Lens metrics: Precision@k and surprisal of a predicted distribution against the model's own tokens."""

from __future__ import annotations

import math

import torch

from lensflow.tasks.core.models import LM

LN2 = math.log(2.0)


def score(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Precision@k (target among the k highest logits; ties count against the target) and mean surprisal
    in bits, -log2 p(target), of the normalised distribution."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    tgt = targets.long().view(-1, 1)
    lt = logits.gather(1, tgt)
    rank = (logits > lt).sum(1)  # 0 = top-1
    out = {f"p_at_{k}": float((rank < k).float().mean()) for k in ks}
    out["surprisal"] = float((-logp.gather(1, tgt).squeeze(1) / LN2).mean())
    return out


@torch.no_grad()
def decoded_scores(lm: LM, pred: torch.Tensor, greedy: torch.Tensor, ks: tuple[int, ...], batch: int) -> list[dict]:
    """Metrics of predicted final-layer states [n, N, d], decoded by the model's own final norm + unembedding."""
    out = []
    for n in range(greedy.shape[1]):
        logits = torch.cat([lm.decode(pred[i : i + batch, n].to(lm.device, lm.dtype)).float().cpu()
                            for i in range(0, pred.shape[0], batch)])
        out.append(score(logits, greedy[:, n], ks))
    return out
