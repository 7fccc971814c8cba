"""What a circuits run writes and logs: per-layer transcoder quality (step = layer), each graph as JSON, an
interactive HTML page and a PNG (local files under .lensflow/graphs/, and MLflow artifacts), the graphs' replacement
and completeness scores, and the interventions' success rates with their controls per language pair."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lensflow.tasks.circuits.attribution import Graph
from lensflow.tasks.circuits.graph_json import graph_json, node_ids
from lensflow.tasks.circuits.graph_page import graph_figure, graph_html
from lensflow.tasks.circuits.proposed import to_yaml
from lensflow.tasks.circuits.pruning import prune, scores
from lensflow.tasks.circuits.supernodes import Supernodes, graph_members
from lensflow.tasks.circuits.swaps import EXPERIMENTS, Outcome
from lensflow.tasks.core import tracking
from lensflow.tasks.core.dictionaries.pages import LayerPages, write_site
from lensflow.tasks.core.dictionaries.transcoder_stage import TrainedLayer

OUT_DIR = Path(".lensflow/graphs")


def slug(prompt: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_").lower()  # MLflow keys and file names: ASCII
    return (s[:48] or "prompt") + "_" + hashlib.sha256(prompt.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class GraphFiles:
    prompt: str
    slug: str
    replacement: float
    completeness: float
    nodes: int
    links: int
    features: int  # active before pruning
    json: str
    html: str
    png: str
    proposed: int = 0  # proposed supernodes drawn (tasks.circuits.proposed)


def write_graph(g: Graph, model: str, transcoders: str, node_threshold: float, edge_threshold: float,
                supernodes: Supernodes | None = None, out_dir: Path = OUT_DIR,
                proposed: Supernodes | None = None, pages: list[LayerPages] | None = None) -> tuple[GraphFiles, object]:
    """Prune, score and write one graph's JSON, HTML and PNG into out_dir/<slug>/ (the figure is returned open).
    `proposed` (tasks.circuits.proposed): drawn beside the user's supernodes (the user's name wins a clash) and
    written as supernodes.proposed.yaml, the user's format, to edit and give back as circuits.supernodes. `pages`
    (tasks.circuits.feature_pages): the kept features' pages are written beside the graph under transcoders/, where
    the page's links point."""
    pruned, s = prune(g, node_threshold, edge_threshold), scores(g)
    name = slug(g.prompt)
    kept = [n for n, keep in zip(node_ids(g), pruned.nodes.tolist()) if keep]
    groups = graph_members({**(proposed or {}), **(supernodes or {})}, kept)
    data = graph_json(g, pruned, s, model, transcoders, node_threshold, edge_threshold, groups, name)
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    if proposed:
        (folder / "supernodes.proposed.yaml").write_text(to_yaml(proposed), encoding="utf-8")
    else:
        (folder / "supernodes.proposed.yaml").unlink(missing_ok=True)  # an earlier run's: not this graph's
    if pages:
        from lensflow.tasks.circuits.feature_pages import ROOT, only

        shown = {(int(l), int(f)) for (l, _, f), k in zip(g.features.tolist(), pruned.nodes.tolist()) if k}
        write_site(only(pages, shown), folder, model, ROOT)
    paths = {"json": folder / "graph.json", "html": folder / "graph.html", "png": folder / "graph.png"}
    paths["json"].write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    paths["html"].write_text(graph_html(data), encoding="utf-8")
    fig = graph_figure(data)
    fig.savefig(paths["png"], dpi=130)
    files = GraphFiles(g.prompt, name, s.replacement, s.completeness, len(data["nodes"]), len(data["links"]),
                       g.n_features, *(str(p.resolve()) for p in paths.values()), len(proposed or {}))
    return files, fig


def log_graph(run: tracking.RunRef, files: GraphFiles, fig, step: int = 0) -> None:
    """The graph's files as artifacts: the page at the artifact root (its feature links are relative to it, and
    transcoder feature pages live under transcoders/), JSON, PNG and proposed supernodes (YAML) under graphs/; the
    PNG also as an image chart."""
    tracking.log_figure(run, fig, f"graphs/{files.slug}.png")
    tracking.log_file(run, files.json, f"graphs/{files.slug}")
    proposed = Path(files.json).parent / "supernodes.proposed.yaml"
    if proposed.is_file():
        tracking.log_file(run, str(proposed), f"graphs/{files.slug}")
    tracking._log_file(run, lambda p: p.write_text(Path(files.html).read_text(encoding="utf-8"), encoding="utf-8"),
                       f"attribution_{files.slug}.html")
    tracking.log_metrics(run, {"circuits.graph.replacement_score": files.replacement,
                               "circuits.graph.completeness_score": files.completeness,
                               "circuits.graph.nodes": files.nodes, "circuits.graph.links": files.links,
                               "circuits.graph.active_features": files.features,
                               "circuits.graph.proposed_supernodes": files.proposed}, step=step)


def log_pages(run: tracking.RunRef, pages: list[LayerPages], model: str, computed: bool) -> int:
    """The transcoder feature pages at the artifact root's transcoders/ (where graph pages link), with their data as
    transcoders/pages.json (what tasks.circuits.proposed.load_pages reads). Returns the number of pages."""
    from lensflow.tasks.circuits.feature_pages import ROOT

    n = sum(len(lp.pages) for lp in pages)
    tracking.log_metrics(run, {"circuits.pages.computed": float(computed)})
    if not n:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_site(pages, tmp, model, ROOT)
        Path(tmp, ROOT, "pages.json").write_text(json.dumps([asdict(lp) for lp in pages]), encoding="utf-8")
        run.client.log_artifacts(run.run_id, str(Path(tmp, ROOT)), ROOT)
    tracking.log_metrics(run, {"circuits.pages": float(n)})
    return n


def log_transcoders(run: tracking.RunRef, layers: list[TrainedLayer], url: str) -> None:
    if not layers:
        tracking.set_tags(run, {"circuits.transcoders": url})
        return
    for key in ("fve", "l0", "dead", "loss_clean", "loss_spliced"):
        tracking.log_series(run, f"circuits.transcoder.{key}", {t.layer: t.metrics[key] for t in layers})
    tracking.log_metrics(run, {"circuits.transcoder.fve_mean": float(np.mean([t.metrics["fve"] for t in layers])),
                               "circuits.transcoder.computed": float(sum(t.trained for t in layers))})
    tracking.set_tags(run, {"circuits.transcoders": url})


def log_graph_summary(run: tracking.RunRef, files: list[GraphFiles]) -> str:
    if not files:
        return ""
    tracking.log_metrics(run, {"circuits.replacement_score": float(np.mean([f.replacement for f in files])),
                               "circuits.completeness_score": float(np.mean([f.completeness for f in files]))})
    lines = ["| prompt | replacement | completeness | nodes | links | active features |", "|---|---|---|---|---|---|"]
    lines += [f"| {f.prompt} | {f.replacement:.3f} | {f.completeness:.3f} | {f.nodes} | {f.links} | {f.features} |"
              for f in files]
    text = "# Attribution graphs\n\n" + "\n".join(lines) + "\n"
    tracking.log_text(run, text, "circuits/graphs.md")
    return text


@dataclass(frozen=True)
class Rate:
    experiment: str
    source: str
    target: str
    n: int
    success: float
    random_control: float
    wrong_position: float
    unedited: float


def rates(outcomes: list[Outcome]) -> list[Rate]:
    groups: dict[tuple[str, str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[(o.experiment, o.source, o.target)].append(o)
    out = []
    for (e, s, t), os in sorted(groups.items(), key=lambda kv: (EXPERIMENTS.index(kv[0][0]), kv[0][1], kv[0][2])):
        mean = lambda xs: float(np.mean(xs))  # noqa: E731
        out.append(Rate(e, s, t, len(os), mean([o.success for o in os]), mean([o.random_control for o in os]),
                        mean([o.wrong_position for o in os]), mean([o.unedited for o in os])))
    return out


def swaps_table(model: str, strength: float, rs: list[Rate], kept: dict[str, list[str]]) -> str:
    lines = [f"# Feature interventions: {model} (strength {strength:g})", "",
             "Pairs the model answers right unedited, per language: "
             + ", ".join(f"{l} {len(v)}" for l, v in kept.items()), "",
             "| experiment | prompt language | target | n | success | random features | wrong position | unedited |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.experiment} | {r.source} | {r.target} | {r.n} | {r.success:.2f} | {r.random_control:.2f} | "
              f"{r.wrong_position:.2f} | {r.unedited:.2f} |" for r in rs]
    for e in EXPERIMENTS:
        mine = [r for r in rs if r.experiment == e]
        if mine:
            n = sum(r.n for r in mine)
            w = lambda key: sum(getattr(r, key) * r.n for r in mine) / n  # noqa: E731
            lines.append(f"| **{e} (all)** | | | {n} | {w('success'):.2f} | {w('random_control'):.2f} | "
                         f"{w('wrong_position'):.2f} | {w('unedited'):.2f} |")
    return "\n".join(lines) + "\n"


def log_swaps(run: tracking.RunRef, model: str, strength: float, outcomes: list[Outcome],
              kept: dict[str, list[str]]) -> str:
    rs = rates(outcomes)
    metrics: dict[str, float] = {}
    for r in rs:
        key = f"{r.source}_{r.target}" if r.experiment == "language" else r.source
        metrics[f"circuits.{r.experiment}.{key}.success"] = r.success
        metrics[f"circuits.control.{r.experiment}.{key}.random"] = r.random_control
        metrics[f"circuits.control.{r.experiment}.{key}.wrong_position"] = r.wrong_position
        metrics[f"circuits.control.{r.experiment}.{key}.unedited"] = r.unedited
    for e in EXPERIMENTS:
        mine = [o for o in outcomes if o.experiment == e]
        if mine:
            metrics[f"circuits.{e}.success"] = float(np.mean([o.success for o in mine]))
            metrics[f"circuits.control.{e}.random"] = float(np.mean([o.random_control for o in mine]))
            metrics[f"circuits.control.{e}.wrong_position"] = float(np.mean([o.wrong_position for o in mine]))
    metrics.update({f"circuits.kept.{l}": float(len(v)) for l, v in kept.items()})
    tracking.log_metrics(run, metrics)
    text = swaps_table(model, strength, rs, kept)
    tracking.log_text(run, text, "circuits/interventions.md")
    tracking.log_text(run, json.dumps([asdict(o) for o in outcomes], ensure_ascii=False), "circuits/outcomes.json")
    return text
