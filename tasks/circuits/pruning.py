"""Influence on the output, pruning, and the graph's two quality scores, with circuit-tracer's definitions.

Influence: edge weights taken in absolute value and normalised so each target's incoming weights sum to 1 (W); a
node's influence is its weight in every path to the logits, each logit weighted by its probability p:
influence = p (W + W^2 + W^3 + ...), a finite sum because the graph has no cycles.

Pruning keeps the features carrying `node_threshold` of the total influence (tokens, errors and logits always
stay), then the edges carrying `edge_threshold` of the edge scores of that smaller graph (an edge's score: its
normalised weight times its target's influence, logits counting their probability), and drops features left without
an incoming or outgoing edge until none is left.

Replacement score: of the influence that reaches the logits from tokens and error nodes, the share that starts at
tokens (1 when every path from the input runs through features). Completeness score: over every node, weighted by
its influence plus its logit probability, the share of its incoming normalised weight that does not come from error
nodes (partial credit for nodes mostly explained by features).

Everything works on the graph's computed rows ([r, n], tasks.circuits.attribution): edges live only there, so memory
is r x n, not n x n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensflow.tasks.circuits.attribution import Graph
from lensflow.tasks.circuits.influence import influence, normalised


def _cut(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The smallest score among the largest ones that together reach `share` of the total."""
    s = scores.flatten().sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return s[0]
    i = int(torch.searchsorted(s.cumsum(0) / total, torch.tensor(share, dtype=s.dtype)))
    return s[min(i, s.numel() - 1)]


@dataclass(frozen=True)
class Pruned:
    nodes: torch.Tensor  # bool [n]
    edges: torch.Tensor  # bool [r, n]: (row of the graph's weights, i.e. target g.rows[i], source)
    influence: torch.Tensor  # [n] each node's influence on the logits (full graph)


def prune(g: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    rows = g.rows
    w = normalised(g.weights)
    p = g.logit_weights().double()
    infl = influence(w, p, rows)
    del w
    nodes = torch.ones(g.size, dtype=torch.bool)
    nf = g.n_features
    if nf:
        nodes[:nf] = infl[:nf] >= _cut(infl[:nf], node_threshold)
    a = g.weights.clone()
    a[~nodes[rows]] = 0
    a[:, ~nodes] = 0
    wp = normalised(a)
    del a
    target_infl = influence(wp, p, rows) + p
    scores = wp.mul_(target_infl[rows][:, None])
    edges = (scores >= _cut(scores, edge_threshold)) & (scores > 0)
    del scores, wp
    while True:  # features (and errors) need an outgoing edge; features need an incoming one
        before = nodes.clone()
        keep_out = edges.any(0)
        nodes[:g.token_start] &= keep_out[:g.token_start]
        has_in = torch.zeros(g.size, dtype=torch.bool)
        has_in[rows] = edges.any(1)
        nodes[:nf] &= has_in[:nf]
        edges &= nodes[rows][:, None] & nodes[None, :]
        if torch.equal(before, nodes):
            return Pruned(nodes, edges, infl)


@dataclass(frozen=True)
class Scores:
    replacement: float
    completeness: float


def scores(g: Graph) -> Scores:
    w = normalised(g.weights)
    p = g.logit_weights().double()
    infl = influence(w, p, g.rows)
    errors = slice(g.error_start, g.token_start)
    tokens = slice(g.token_start, g.logit_start)
    from_tokens, from_errors = float(infl[tokens].sum()), float(infl[errors].sum())
    replacement = from_tokens / (from_tokens + from_errors) if from_tokens + from_errors > 0 else 0.0
    not_error = torch.ones(g.size, dtype=torch.float64)  # a node without a row has no incoming (error) weight
    not_error[g.rows] = 1 - w[:, errors].sum(1)
    weight = infl + p
    completeness = float((not_error * weight).sum() / weight.sum()) if weight.sum() > 0 else 0.0
    return Scores(replacement, completeness)
