"""The attribution graph for people: a self-contained interactive HTML page (no network, no external script) and a
PNG chart, both placing nodes by position (x) and layer (y: tokens at the bottom, logits on top).

The page draws the pruned graph as SVG: edge width by |weight|, blue positive and red negative, a slider for the share
of the strongest edges shown (10% at first: tens of thousands of edges hide the structure); hovering a node
shows its kind, activation, influence and its strongest incoming and outgoing edges with their weights; clicking a
feature opens its feature page (a relative link, `transcoders/layer_LL/feature_NNNNN.html`); supernodes are drawn as
labelled boxes around their members.
"""

from __future__ import annotations

import html
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

COLORS = {"cross layer transcoder": "#f4a259", "mlp reconstruction error": "#9e9e9e", "embedding": "#5b8e7d",
          "logit": "#bc4b51"}

_SCRIPT = r"""
const G = JSON.parse(document.getElementById('graph-data').textContent);
const svg = document.getElementById('g'), info = document.getElementById('info');
const nL = G.metadata.n_layers, toks = G.metadata.prompt_tokens, W = 120 * toks.length + 160, H = 46 * (nL + 3);
svg.setAttribute('viewBox', `0 0 ${W} ${H}`); svg.style.width = W + 'px';
const row = n => n.layer === 'E' ? 0 : (n.feature_type === 'logit' ? nL + 1 : +n.layer + 1);
const cells = {}; G.nodes.forEach(n => { const k = row(n) + ':' + n.ctx_idx; (cells[k] = cells[k] || []).push(n); });
const pos = {};
Object.values(cells).forEach(ns => ns.forEach((n, i) => {
  pos[n.node_id] = [100 + 120 * n.ctx_idx + (i - (ns.length - 1) / 2) * Math.min(14, 100 / ns.length),
                    H - 40 - 46 * row(n)];
}));
const NS = 'http://www.w3.org/2000/svg', el = (t, a) => { const e = document.createElementNS(NS, t);
  for (const k in a) e.setAttribute(k, a[k]); return e; };
for (let r = 0; r <= nL + 1; r++) { const t = el('text', {x: 4, y: H - 36 - 46 * r, class: 'lab'});
  t.textContent = r === 0 ? 'tokens' : (r === nL + 1 ? 'logits' : 'L' + (r - 1)); svg.appendChild(t); }
toks.forEach((s, p) => { const t = el('text', {x: 100 + 120 * p, y: H - 8, class: 'tok'}); t.textContent = s;
  svg.appendChild(t); });
const byId = {}; G.nodes.forEach(n => byId[n.node_id] = n);
(G.qParams.supernodes || []).forEach(([name, ...ids]) => {
  const ps = ids.filter(i => pos[i]).map(i => pos[i]); if (!ps.length) return;
  const xs = ps.map(p => p[0]), ys = ps.map(p => p[1]), x0 = Math.min(...xs) - 12, y0 = Math.min(...ys) - 14;
  svg.appendChild(el('rect', {x: x0, y: y0, width: Math.max(...xs) - x0 + 12, height: Math.max(...ys) - y0 + 12,
    rx: 8, class: 'super'}));
  const t = el('text', {x: x0 + 2, y: y0 - 3, class: 'superlab'}); t.textContent = name; svg.appendChild(t); });
const maxW = Math.max(...G.links.map(l => Math.abs(l.weight)), 1e-9);
const edges = [];
G.links.forEach(l => { const a = pos[l.source], b = pos[l.target]; if (!a || !b) return;
  const e = el('line', {x1: a[0], y1: a[1], x2: b[0], y2: b[1], 'stroke-width': 0.3 + 4 * Math.abs(l.weight) / maxW,
    stroke: l.weight >= 0 ? '#3a6ea5' : '#c0392b', class: 'edge'});
  const t = el('title', {}); t.textContent = `${l.source} -> ${l.target}: ${l.weight.toFixed(4)}`; e.appendChild(t);
  e.dataset.s = l.source; e.dataset.t = l.target; e.dataset.w = Math.abs(l.weight); edges.push(e);
  svg.appendChild(e); });
const order = edges.slice().sort((a, b) => +b.dataset.w - +a.dataset.w), slider = document.getElementById('share');
const showEdges = () => { const n = Math.ceil(order.length * slider.value / 100);
  order.forEach((e, i) => { e.style.display = i < n ? '' : 'none'; });
  document.getElementById('shown').textContent = `${n} of ${order.length} edges`; };
slider.addEventListener('input', showEdges); showEdges();
const fmt = x => x === null || x === undefined ? '-' : (+x).toFixed(4);
G.nodes.forEach(n => { const [x, y] = pos[n.node_id];
  const c = el('circle', {cx: x, cy: y, r: n.feature_type === 'cross layer transcoder' ? 5 : 7,
    fill: COLORS[n.feature_type] || '#888', class: 'node'});
  c.addEventListener('mouseenter', () => { edges.forEach(e => e.classList.toggle('hi',
      e.dataset.s === n.node_id || e.dataset.t === n.node_id));
    const ins = G.links.filter(l => l.target === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    const outs = G.links.filter(l => l.source === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    info.innerHTML = `<b>${n.clerp}</b> (${n.feature_type}, ${n.node_id})<br>activation ${fmt(n.activation)}, ` +
      `influence ${fmt(n.influence)}` + (n.feature_page ? `<br><a href="${n.feature_page}">feature page</a>` : '') +
      '<br><u>in</u>: ' + ins.slice(0, 8).map(l => `${byId[l.source] ? byId[l.source].clerp : l.source} ${fmt(l.weight)}`).join('; ') +
      '<br><u>out</u>: ' + outs.slice(0, 8).map(l => `${byId[l.target] ? byId[l.target].clerp : l.target} ${fmt(l.weight)}`).join('; '); });
  if (n.feature_page) c.addEventListener('click', () => { window.location.href = n.feature_page; });
  const t = el('title', {}); t.textContent = n.clerp; c.appendChild(t); svg.appendChild(c); });
"""

_STYLE = """
body { font-family: sans-serif; margin: 12px; } #wrap { overflow: auto; border: 1px solid #ddd; }
.edge { opacity: 0.35; } .edge.hi { opacity: 1; } .node { cursor: pointer; stroke: #333; stroke-width: 0.5; }
.lab { font-size: 11px; fill: #555; } .tok { font-size: 12px; text-anchor: middle; }
.super { fill: #fff6d5; fill-opacity: 0.35; stroke: #c9a227; stroke-dasharray: 4 2; }
.superlab { font-size: 11px; fill: #8a6d00; } #info { min-height: 5em; margin: 8px 0; font-size: 13px; }
"""


def graph_html(data: dict) -> str:
    m = data["metadata"]
    payload = json.dumps(data).replace("</", "<\\/")
    colors = json.dumps(COLORS)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(m['prompt'])}</title>
<style>{_STYLE}</style></head><body>
<h3>{html.escape(m['scan'])}: {html.escape(m['prompt'])}</h3>
<p>replacement score {m['replacement_score']:.3f}, completeness score {m['completeness_score']:.3f};
{len(data['nodes'])} nodes and {len(data['links'])} edges kept (node threshold {m['node_threshold']}, edge threshold
{m['edge_threshold']}; {m['n_features_unpruned']} active features before pruning). Hover a node for its edges; click a
feature for its page. Blue: positive effect, red: negative; width: |weight|.</p>
<label>strongest edges shown: <input id="share" type="range" min="1" max="100" value="10"> <span id="shown"></span>
</label><div id="info"></div><div id="wrap"><svg id="g" xmlns="http://www.w3.org/2000/svg"></svg></div>
<script id="graph-data" type="application/json">{payload}</script>
<script>const COLORS = {colors};{_SCRIPT}</script></body></html>
"""


PNG_EDGES = 1500


def graph_figure(data: dict):
    """The same layout as a matplotlib figure (the PNG_EDGES strongest edges by |weight|, supernodes as labelled
    boxes)."""
    m = data["metadata"]
    n_layers, toks = m["n_layers"], m["prompt_tokens"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(toks) + 2), 0.42 * (n_layers + 3) + 1.5))

    def row(n: dict) -> int:
        return 0 if n["layer"] == "E" else (n_layers + 1 if n["feature_type"] == "logit" else int(n["layer"]) + 1)

    cells: dict[tuple[int, int], list[dict]] = {}
    for n in data["nodes"]:
        cells.setdefault((row(n), n["ctx_idx"]), []).append(n)
    pos = {}
    for (r, p), ns in cells.items():
        for i, n in enumerate(ns):
            pos[n["node_id"]] = (p + (i - (len(ns) - 1) / 2) * min(0.1, 0.8 / len(ns)), r)
    wmax = max((abs(l["weight"]) for l in data["links"]), default=1.0) or 1.0
    links = sorted((l for l in data["links"] if l["source"] in pos and l["target"] in pos), key=lambda l: abs(l["weight"]))
    links = links[-PNG_EDGES:]  # the strongest: tens of thousands of hairlines hide the structure
    rel = [abs(l["weight"]) / wmax for l in links]
    colors = [(0.23, 0.43, 0.65, 0.25 + 0.6 * r) if l["weight"] >= 0 else (0.75, 0.22, 0.17, 0.25 + 0.6 * r)
              for l, r in zip(links, rel)]
    ax.add_collection(LineCollection([[pos[l["source"]], pos[l["target"]]] for l in links], colors=colors,
                                     linewidths=[0.2 + 2.5 * r for r in rel], zorder=1))
    for name, *members in data["qParams"]["supernodes"]:
        pts = [pos[i] for i in members if i in pos]
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.add_patch(plt.Rectangle((min(xs) - 0.15, min(ys) - 0.35), max(xs) - min(xs) + 0.3,
                                       max(ys) - min(ys) + 0.7, fill=False, ls="--", ec="#c9a227", zorder=2))
            ax.text(min(xs) - 0.15, max(ys) + 0.4, name, fontsize=7, color="#8a6d00")
    for kind, color in COLORS.items():
        mine = [n for n in data["nodes"] if n["feature_type"] == kind]
        if mine:
            ax.scatter([pos[n["node_id"]][0] for n in mine], [pos[n["node_id"]][1] for n in mine], color=color,
                       s=18 if kind == "cross layer transcoder" else 36, edgecolors="#333", linewidths=0.4, zorder=3,
                       label=kind)
    for n in data["nodes"]:
        if n["feature_type"] == "logit":
            x, y = pos[n["node_id"]]
            ax.text(x, y + 0.3, n["clerp"], fontsize=6, ha="center", rotation=20)
    ax.set_xticks(range(len(toks)), [t.replace("$", r"\$") for t in toks], rotation=45, fontsize=7, ha="right")
    ax.set_yticks(range(n_layers + 2), ["tokens", *[f"L{l}" for l in range(n_layers)], "logits"], fontsize=7)
    ax.set_xlim(-0.7, len(toks) - 0.3)
    ax.set_title(f"{m['scan']}: {m['prompt']}\nreplacement {m['replacement_score']:.3f}, completeness "
                 f"{m['completeness_score']:.3f}; the {len(links)} strongest of {len(data['links'])} edges",
                 fontsize=9)
    fig.tight_layout()
    return fig
