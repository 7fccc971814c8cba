"""The pruned attribution graph as JSON, in the shape Neuronpedia's graph viewer reads where it fits.

Schema `lensflow-attribution-graph/1`:

  metadata   slug, scan (the model), prompt, prompt_tokens, node_threshold, edge_threshold, replacement_score,
             completeness_score, n_layers, transcoders (the stage folder the features come from), schema,
             n_nodes_unpruned, n_features_unpruned, feature_rows_computed (features whose incoming edges were computed)
  qParams    pinnedIds [], supernodes [[name, node_id, ...], ...], linkType "both"
  nodes      node_id, jsNodeId, feature, layer, ctx_idx, feature_type, activation, influence, token_prob,
             is_target_logit, clerp (the label: token, feature or logit text), feature_page
  links      source, target, weight (the direct effect of source on target; the edge's sign is kept)

Node ids and kinds follow circuit-tracer's export: a feature is `{layer}_{feature}_{ctx_idx}` (feature_type "cross layer
transcoder", layer its block), an error node `{layer}_err_{ctx_idx}` ("mlp reconstruction error"), a token
`E_{token_id}_{ctx_idx}` (layer "E", "embedding"), a logit `L_{token_id}_{ctx_idx}` (layer n_layers, "logit",
ctx_idx the last position). feature_page is the feature's page relative to the graph's folder,
`transcoders/layer_{LL}/feature_{id:05d}.html` (tasks.circuits.feature_pages: the transcoders' own folder, apart
from SAE pages under features/; absent for other kinds).
"""

from __future__ import annotations

from lensflow.tasks.circuits.attribution import Graph
from lensflow.tasks.circuits.pruning import Pruned, Scores
from lensflow.tasks.core.dictionaries.pages import page_path

PAGES_ROOT = "transcoders"  # tasks.circuits.feature_pages.ROOT (that module imports this one's neighbours)

SCHEMA = "lensflow-attribution-graph/1"


def feature_page(layer: int, feature: int) -> str:
    return page_path(layer, feature, PAGES_ROOT)


def node_ids(g: Graph) -> list[str]:
    ids = [f"{l}_{f}_{p}" for l, p, f in g.features.tolist()]
    ids += [f"{l}_err_{p}" for l in range(g.n_layers) for p in range(g.n_pos)]
    ids += [f"E_{t}_{p}" for p, t in enumerate(g.tokens)]
    ids += [f"L_{t}_{g.n_pos - 1}" for t in g.logit_tokens]
    return ids


def _node(g: Graph, i: int, nid: str, infl: float) -> dict:
    base = {"node_id": nid, "jsNodeId": nid, "influence": infl, "is_target_logit": False, "token_prob": 0.0}
    if i < g.n_features:
        l, p, f = g.features[i].tolist()
        return {**base, "feature": f, "layer": str(l), "ctx_idx": p, "feature_type": "cross layer transcoder",
                "activation": float(g.activations[i]), "clerp": f"L{l} #{f}", "feature_page": feature_page(l, f)}
    if i < g.token_start:
        l, p = divmod(i - g.error_start, g.n_pos)
        return {**base, "feature": None, "layer": str(l), "ctx_idx": p, "feature_type": "mlp reconstruction error",
                "activation": None, "clerp": f"error L{l} @{p}"}
    if i < g.logit_start:
        p = i - g.token_start
        return {**base, "feature": g.tokens[p], "layer": "E", "ctx_idx": p, "feature_type": "embedding",
                "activation": None, "clerp": g.token_strs[p]}
    k = i - g.logit_start
    return {**base, "feature": g.logit_tokens[k], "layer": str(g.n_layers), "ctx_idx": g.n_pos - 1,
            "feature_type": "logit", "activation": None, "token_prob": float(g.logit_probs[k]),
            "is_target_logit": k == 0, "clerp": f"{g.logit_strs[k]!r} (p={float(g.logit_probs[k]):.3f})"}


def graph_json(g: Graph, pruned: Pruned, s: Scores, model: str, transcoders: str, node_threshold: float,
               edge_threshold: float, supernodes: dict[str, list[str]] | None = None, slug: str = "graph") -> dict:
    ids = node_ids(g)
    keep = pruned.nodes.nonzero().flatten().tolist()
    nodes = [_node(g, i, ids[i], float(pruned.influence[i])) for i in keep]
    r_idx, s_idx = pruned.edges.nonzero(as_tuple=True)
    targets = g.rows[r_idx].tolist()
    weights = g.weights[r_idx, s_idx].tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": w} for t, s, w in zip(targets, s_idx.tolist(), weights)]
    return {
        "metadata": {"schema": SCHEMA, "slug": slug, "scan": model, "prompt": g.prompt, "prompt_tokens": g.token_strs,
                     "n_layers": g.n_layers, "node_threshold": node_threshold, "edge_threshold": edge_threshold,
                     "replacement_score": s.replacement, "completeness_score": s.completeness,
                     "transcoders": transcoders, "n_nodes_unpruned": g.size, "n_features_unpruned": g.n_features,
                     "feature_rows_computed": int(g.rows_computed[:g.n_features].sum())},
        "qParams": {"pinnedIds": [], "supernodes": [[name, *members] for name, members in (supernodes or {}).items()],
                    "linkType": "both"},
        "nodes": nodes,
        "links": links,
    }
