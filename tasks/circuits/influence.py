"""Influence on the output through every path of a graph (circuit-tracer's measure, used to prune and score graphs and
to choose which features' rows an attribution computes first): edge weights in absolute value, normalised so each
target's incoming weights sum to 1 (W); influence = p (W + W^2 + ...) for the logits' probabilities p.

W is held as its computed rows only ([r, n] with the nodes `rows` they belong to): a node without a row has no
incoming edges, so x W = x[rows] W_rows, and no [n, n] matrix is ever needed."""

from __future__ import annotations

import torch


def normalised(weights: torch.Tensor) -> torch.Tensor:
    a = weights.abs().double()
    return a / a.sum(1, keepdim=True).clamp_min(1e-12)


def influence(w: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """weights (W + W^2 + ...): each power is one path length more; stops when the paths run out. w: [r, n], the
    rows of W for the nodes `rows` (None: w is the whole [n, n] matrix)."""
    n = weights.shape[0]
    rows = torch.arange(n) if rows is None else rows

    def step(x: torch.Tensor) -> torch.Tensor:
        return x[rows] @ w

    total = torch.zeros_like(weights)
    current = step(weights)
    for _ in range(n + 1):
        if not current.any():
            return total
        total += current
        current = step(current)
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")
