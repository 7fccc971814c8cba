"""Influence on the output through every path of a graph (circuit-tracer's measure, used to prune and score graphs and
to choose which features' rows an attribution computes first): edge weights in absolute value, normalised so each
target's incoming weights sum to 1 (W); influence = p (W + W^2 + ...) for the logits' probabilities p."""

from __future__ import annotations

import torch


def normalised(adjacency: torch.Tensor) -> torch.Tensor:
    a = adjacency.abs().double()
    return a / a.sum(1, keepdim=True).clamp_min(1e-12)


def influence(w: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights (W + W^2 + ...): each power is one path length more; stops when the paths run out."""
    total = torch.zeros_like(weights)
    current = weights @ w
    for _ in range(w.shape[0] + 1):
        if not current.any():
            return total
        total += current
        current = current @ w
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")
