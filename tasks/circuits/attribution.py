"""The attribution graph of one prompt: the direct effect of every active transcoder feature, error node and input
token on every later feature and on the top output logits, in the prompt's local replacement model.

The local replacement model: attention patterns and RMSNorm denominators frozen at the prompt's values
(tasks.core.frozen), and each block's MLP output replaced by its transcoder's features plus one error node per
(layer, position), the error being what the transcoder misses there (so with every node at its value the replacement
reproduces the model). Between the MLP outputs everything is then linear, so each edge is exact:

  edge(s -> t) = a_s * <d h_t / d r_s, v_s>

with v_s what node s writes into the residual stream (a feature's decoder vector, an error vector, a token embedding),
a_s its activation (1 for errors and tokens), and h_t the target's input: a feature's pre-activation (its encoder
vector on the MLP input of its layer) or a logit minus the mean logit. MLP outputs enter the pass as leaves, so no
gradient flows through an MLP: effects are direct. Many targets go into one backward pass: the pass runs on a batch of
copies of the prompt, one target per row, and each row's gradient at every leaf gives that target's whole row of
edges (`batch_rows` per pass; 1 gives one backward per target, the benchmark's baseline).

Long prompts: only the rows that are computed are stored ([rows, nodes], the rows in the order they were computed),
not a dense [nodes, nodes] matrix whose uncomputed rows are zeros. With `max_feature_rows` the rows are bounded, so
memory grows with the prompt's length, not its square; the whole pipeline (attribution, influence, pruning, scores)
works on those rows. `dense=True` keeps the unchunked layout (every node's row slot allocated), the benchmark's
baseline.

Features at position 0 (the BOS / attention-sink position, where transcoders trained with skip_first are not
meant to work) are not nodes: that position's MLP output is all error node, as in circuit-tracer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensflow.tasks.circuits.influence import influence, normalised
from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.frozen import frozen
from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.progress import progress


@dataclass
class Graph:
    """Nodes in the order [features, errors (layer-major), tokens, logits]; weights[i, source] is the edge from
    source into node rows[i] (only computed rows are held: a node without a row has no incoming edges)."""

    prompt: str
    tokens: list[int]
    token_strs: list[str]
    features: torch.Tensor  # [n_f, 3] long: (layer, position, feature id)
    activations: torch.Tensor  # [n_f]
    logit_tokens: list[int]
    logit_strs: list[str]
    logit_probs: torch.Tensor  # [n_logits]
    weights: torch.Tensor  # [r, n]: the incoming edges of the nodes `rows`
    n_layers: int
    rows: torch.Tensor  # long [r]: the target node of each row of `weights`

    @property
    def rows_computed(self) -> torch.Tensor:
        """bool [n]: targets whose incoming edges were computed."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[self.rows] = True
        return mask

    @property
    def adjacency(self) -> torch.Tensor:
        """The dense [n, n] matrix (target, source), zero rows where nothing was computed: for tests and small
        graphs only (it is what the row storage avoids)."""
        a = torch.zeros(self.size, self.size, dtype=self.weights.dtype)
        a[self.rows] = self.weights
        return a
    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def size(self) -> int:
        return self.logit_start + len(self.logit_tokens)

    def error_index(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.size, dtype=self.weights.dtype)
        w[self.logit_start:] = self.logit_probs
        return w


@dataclass
class Replacement:
    """One prompt's local replacement model: its nodes' values, read on one clean pass."""

    ids: torch.Tensor  # [1, S]
    mlp_out: list[torch.Tensor]  # per layer [S, d]: what the MLP block added (= decoded features + bias + error)
    errors: list[torch.Tensor]  # per layer [S, d]
    codes: list[torch.Tensor]  # per layer [S, width] (position 0 zeroed)
    embeds: torch.Tensor  # [S, d] resid layer 0 (Gemma's scaled embeddings)
    logits: torch.Tensor  # [vocab] at the last position, from the clean pass


MIN_POSITIONS = 2


def tokenize(lm: LM, prompt: str, min_positions: int = MIN_POSITIONS) -> torch.Tensor:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    if ids.shape[1] < min_positions:
        raise ConfigError(f"prompt {prompt!r}: {ids.shape[1]} token(s), the graph needs at least {min_positions} "
                          "(a token to attribute from and the position whose next token is explained)")
    return ids


def check_transcoders(lm: LM, transcoders: dict[int, Transcoder]) -> None:
    missing = [l for l in range(lm.n_layers) if l not in transcoders]
    if missing:
        raise ConfigError(f"circuits.transcoders: no transcoder for layers {missing} of {lm.name}")
    bad = [l for l, tc in transcoders.items() if tc.W_enc.shape[1] != lm.d_model or tc.W_dec.shape[1] != lm.d_model]
    if bad:
        raise ConfigError(f"circuits.transcoders: layers {bad} do not read or write width {lm.d_model} of {lm.name}")


@torch.no_grad()
def replacement(lm: LM, transcoders: dict[int, Transcoder], ids: torch.Tensor, fz) -> Replacement:
    """The clean pass (recording the frozen state into `fz`) and the replacement's node values."""
    L = lm.n_layers
    reads = [Read("resid", 0)] + [Read(s, l) for l in range(L) for s in ("mlp_in", "mlp_out")]
    with trace(lm, reads=reads) as t:
        out = fz.record(input_ids=ids)
    logits = lm.unembed(out.last_hidden_state[0, -1]).float()
    mlp_out, errors, codes = [], [], []
    for l in range(L):
        tc = transcoders[l].to(lm.device)
        z = tc.encode(t["mlp_in", l][0].float())
        z[0] = 0
        y = t["mlp_out", l][0].float()
        mlp_out.append(y)
        errors.append(y - tc.decode(z))
        codes.append(z)
    return Replacement(ids, mlp_out, errors, codes, t["resid", 0][0].float(), logits)


def top_logits(logits: torch.Tensor, share: float, max_logits: int) -> tuple[list[int], torch.Tensor]:
    """The most likely next tokens until their probabilities add up to `share` (at most max_logits)."""
    probs = torch.softmax(logits.double(), -1)
    p, idx = probs.topk(max_logits)
    n = int(torch.searchsorted(p.cumsum(0), torch.tensor(share, dtype=p.dtype)).item()) + 1
    n = max(1, min(n, max_logits))
    return idx[:n].tolist(), p[:n].float()


# The graph is a float32 [rows, n] matrix (4 bytes a cell), and pruning (tasks.circuits.pruning) holds float64
# normalised copies and edge scores of it, and sorts the scores (float64 values, int64 indices, cumulative sums):
# benchmarks/bench_attribution.py --lengths measured a peak of 63 bytes per cell at 4,677 nodes (dense, rows = n).
# rows x n dominates the memory of a long prompt (n grows with tokens x layers x k; rows is bounded by
# max_feature_rows plus the logits; one pass's memory is bounded by max_batch_tokens).
BYTES_PER_CELL = 64


def graph_mib(n: int, rows: int | None = None) -> float:
    """Estimated peak memory (MiB) of a graph of n nodes of which `rows` have their incoming edges computed (None:
    every node, the dense graph), attribution and pruning."""
    return BYTES_PER_CELL * n * (n if rows is None else rows) / 2**20


def row_bound(n_features: int, max_feature_rows: int | None, n_logits: int) -> int:
    """How many rows a graph computes at most: the logits' and at most max_feature_rows features'."""
    return (n_features if max_feature_rows is None else min(n_features, max_feature_rows)) + n_logits


def max_nodes(n_layers: int, n_tokens: int, k: int, max_logits: int) -> int:
    """The most nodes a prompt's graph can have with TopK transcoders (at most k features per layer and position,
    none at position 0), before the transcoders run."""
    return n_layers * (n_tokens - 1) * k + n_layers * n_tokens + n_tokens + max_logits


def check_budget(prompt: str, n_tokens: int, n: int, rows: int, max_graph_mb: float | None,
                 exact: bool = True) -> None:
    """One line naming circuits.max_graph_mb when even the row-chunked graph (rows x n) would not fit the budget."""
    if max_graph_mb is not None and graph_mib(n, rows) > max_graph_mb:
        raise ConfigError(f"prompt {prompt[:40]!r}: {n_tokens} tokens give {'' if exact else 'up to '}{n} graph nodes "
                          f"and {rows} computed rows, about {graph_mib(n, rows):.0f} MiB, over "
                          f"circuits.max_graph_mb={max_graph_mb:g}; lower circuits.max_feature_rows, shorten the prompt "
                          "or raise circuits.max_graph_mb")


@dataclass(frozen=True)
class Target:
    layer: int  # a block index for a feature; n_layers for a logit
    pos: int
    vector: torch.Tensor  # [d]: h_t = <vector, input>


def _pass(lm: LM, rep: Replacement, targets: list[Target]) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """One batched backward: per layer the gradient of each row's target at that layer's MLP output leaf [B, S, d]
    (None where the pass never reached the layer), and at the embeddings [B, S, d]."""
    B, S, L = len(targets), rep.ids.shape[1], lm.n_layers
    top = max(t.layer for t in targets)
    leaves = [rep.mlp_out[l].to(lm.dtype).expand(B, S, -1).clone().requires_grad_(True) for l in range(min(top, L))]
    emb = rep.embeds.to(lm.dtype).expand(B, S, -1).clone().requires_grad_(True)
    edits = [Edit("resid", 0, emb, position=None)] + [Edit("mlp_out", l, leaves[l], position=None)
                                                       for l in range(len(leaves))]
    layers = sorted({t.layer for t in targets if t.layer < L})
    reads = [Read("mlp_in", l, grad=True) for l in layers]
    with torch.enable_grad(), trace(lm, reads=reads, edits=edits) as tr:
        out = tr.forward(input_ids=rep.ids.expand(B, S), until=top + 1 if top < L else None)
        objective = torch.zeros((), dtype=torch.float32, device=lm.device)
        for l in layers + ([L] if top == L else []):
            rows = [i for i, t in enumerate(targets) if t.layer == l]
            src = out.last_hidden_state if l == L else tr["mlp_in", l]
            r = torch.tensor(rows, device=lm.device)
            pos = torch.tensor([targets[i].pos for i in rows], device=lm.device)
            vec = torch.stack([targets[i].vector for i in rows]).to(lm.device, src.dtype)
            objective = objective + (src[r, pos] * vec).sum().float()
        objective.backward()
    grads = [leaf.grad for leaf in leaves] + [None] * (L - len(leaves))
    return grads, emb.grad


def attribute(lm: LM, transcoders: dict[int, Transcoder], prompt: str, logit_share: float = 0.95,
              max_logits: int = 10, batch_rows: int = 64, max_batch_tokens: int | None = None,
              max_feature_rows: int | None = None, max_graph_mb: float | None = None, dense: bool = False) -> Graph:
    """The (unpruned) attribution graph of `prompt`. max_batch_tokens caps rows x tokens of one pass, so a long
    prompt gets fewer targets per backward pass instead of running out of memory. max_feature_rows: compute the
    incoming edges of at most this many features (None: every one), chosen as circuit-tracer does: after the logits'
    rows, each next batch is the uncomputed features with the most influence on the logits through the rows known
    so far; every feature stays a node (a source of edges) either way, and every computed row is exact.
    max_graph_mb: refuse (ConfigError) a prompt whose computed rows would need more, before they are allocated.
    dense: allocate every node's row (the unchunked layout; the same numbers, the benchmark's baseline; its rows
    are every node, those not computed being zeros)."""
    check_transcoders(lm, transcoders)
    ids = tokenize(lm, prompt)
    L, S = lm.n_layers, ids.shape[1]
    if max_batch_tokens is not None:
        batch_rows = max(1, min(batch_rows, max_batch_tokens // S))
    with frozen(lm) as fz:
        rep = replacement(lm, transcoders, ids, fz)
        feats = [(l, p, f) for l in range(L) for p, f in (rep.codes[l] > 0).nonzero().tolist()]
        features = torch.tensor(feats, dtype=torch.long).reshape(-1, 3)
        acts = torch.stack([rep.codes[l][p, f] for l, p, f in feats]).cpu() if feats else torch.zeros(0)
        logit_ids, probs = top_logits(rep.logits, logit_share, max_logits)
        U = lm.unembed.weight.detach().float()
        u_mean = U.mean(0)
        n_f = len(feats)
        n = n_f + L * S + S + len(logit_ids)
        logit_rows = list(range(n_f + L * S + S, n))
        cap = n_f if max_feature_rows is None else min(n_f, max_feature_rows)
        n_rows = n if dense else row_bound(n_f, max_feature_rows, len(logit_ids))
        check_budget(prompt, S, n, n_rows, max_graph_mb)

        def target(row: int) -> Target:
            if row >= n_f:
                return Target(L, S - 1, U[logit_ids[row - logit_rows[0]]] - u_mean)
            l, p, f = feats[row]
            return Target(l, p, transcoders[l].encoder_vectors()[f].detach().float())

        A = torch.zeros(n_rows, n)  # row slot i holds the incoming edges of node order[i]
        order: list[int] = []
        done = torch.zeros(n, dtype=torch.bool)
        weights = torch.zeros(n, dtype=torch.float64)
        weights[logit_rows] = probs.double()
        dec = [transcoders[l].decoder_vectors().detach().float().to(lm.device) for l in range(L)]
        by_layer = [[i for i, (fl, _, _) in enumerate(feats) if fl == l] for l in range(L)]
        queue = list(range(n_f)) if cap == n_f else None  # every feature: in order, no influence needed
        with progress(len(logit_rows) + cap, "attribution rows", unit="row") as bar:
            batch = logit_rows[:batch_rows]
            while batch:
                grads, g_emb = _pass(lm, rep, [target(r) for r in batch])
                block = torch.zeros(len(batch), n)
                for l in range(L):
                    g = grads[l]
                    if g is None:
                        continue
                    g = g.float()
                    idx = by_layer[l]
                    if idx:
                        pos = features[idx, 1].to(lm.device)
                        fid = features[idx, 2].to(lm.device)
                        block[:, idx] = ((g[:, pos] * dec[l][fid]).sum(-1) * acts[idx].to(lm.device)).cpu()
                    block[:, n_f + l * S:n_f + (l + 1) * S] = (g * rep.errors[l]).sum(-1).cpu()
                block[:, n_f + L * S:n_f + L * S + S] = (g_emb.float() * rep.embeds).sum(-1).cpu()
                slots = batch if dense else list(range(len(order), len(order) + len(batch)))
                A[slots] = block
                order += batch
                done[batch] = True
                bar.update(len(batch))
                batch = [r for r in logit_rows if not done[r]][:batch_rows]
                room = cap - int(done[:n_f].sum())
                if batch or room <= 0:
                    continue
                if queue is not None:
                    batch = [r for r in queue if not done[r]][:min(batch_rows, room)]
                    continue
                held = torch.tensor(order) if not dense else torch.arange(n)
                score = influence(normalised(A[:len(held)]), weights, held)[:n_f].masked_fill(done[:n_f], -1.0)
                batch = score.topk(min(batch_rows, room)).indices.tolist()
    tok = lm.tokenizer
    rows = torch.arange(n) if dense else torch.tensor(order, dtype=torch.long)
    return Graph(prompt, ids[0].tolist(), [tok.decode([i]) for i in ids[0].tolist()], features, acts.float(),
                 logit_ids, [tok.decode([i]) for i in logit_ids], probs, A[:len(rows)], L, rows)
