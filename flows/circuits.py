"""Flow `circuits` (and the `lensflow attribute PROMPT` command): attribution graphs from per-layer transcoders and
the seed's feature interventions on the antonym set.

  1. per-layer transcoders for every block (the core's transcoder stage, trained in parallel on the model actors,
     resumable per layer; or circuits.transcoders, a published stage folder of the same model);
  2. attribution graphs of the prompts (default: the first circuits.graph_pairs antonym pairs in every language),
     one stage item per prompt, computed on the actors with batched backward passes; pruned, scored (replacement,
     completeness) and written as JSON, HTML and PNG; the transcoder feature pages of the graphs' features (a
     stage), and, when the user gave no supernodes, the supernodes proposed from them, drawn on the graphs;
  3. the three interventions (language, operand, operation) with their controls, one actor job per prompt language,
     at circuits.strength (swept with `lensflow sweep circuits --grid circuits.strength=...`).
"""

from __future__ import annotations

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.circuits import EXPERIMENT, resolve_model, swap_jobs
from lensflow.tasks.circuits.dictionaries import prepare_transcoders
from lensflow.tasks.circuits.feature_pages import graph_pages, proposed_supernodes
from lensflow.tasks.circuits.graphs import graph_stage, graphs
from lensflow.tasks.circuits.report import (
    log_graph,
    log_graph_summary,
    log_pages,
    log_swaps,
    log_transcoders,
    write_graph,
)
from lensflow.tasks.circuits.supernodes import load_supernodes
from lensflow.tasks.circuits.texts import graph_prompts
from lensflow.tasks.core import tracking
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.session import open_session
from lensflow.tasks.registry import load_config

transcoders_stage = stage(prepare_transcoders)
graphs_stage = stage(graphs)
pages_stage = stage(graph_pages)
interventions_stage = stage(swap_jobs.run_interventions)


def _graphs(conf: Config, s, url: str, prompts: list[str], as_task: bool = False) -> list:
    """Every prompt's graph from the graph stage (computed on the actors where missing), written and logged."""
    cc = conf.circuits
    gstage = graph_stage(conf.store.root, url, cc.model_dump())
    found = (graphs_stage if as_task else graphs)(s.pool, gstage, url, prompts, cc.logit_share, cc.max_logits,
                                                  cc.batch_rows, cc.max_batch_tokens, cc.max_feature_rows)
    supernodes = load_supernodes(cc.supernodes, s.info.n_layers, _width(conf)) if cc.supernodes else None
    pages = None
    if cc.pages:
        pages, computed = (pages_stage if as_task else graph_pages)(s.pool, conf.store.root, url, [g for g, _, _ in found],
                                                             list(cc.languages), cc.texts_per_language)
        log_pages(s.run, pages, s.info.name, computed)
    files = []
    for i, (g, computed, seconds) in enumerate(found):
        proposed = proposed_supernodes(pages, g, list(cc.languages)) if pages is not None and not supernodes else None
        f, fig = write_graph(g, s.info.name, url, cc.node_threshold, cc.edge_threshold, supernodes,
                             proposed=proposed, pages=pages)
        log_graph(s.run, f, fig, step=i)
        tracking.log_metrics(s.run, {"circuits.graph.seconds": seconds, "circuits.graph.tokens": len(g.tokens),
                                     "circuits.graph.computed": float(computed)}, step=i)
        print(f"graph {f.prompt!r}: replacement score {f.replacement:.3f}, completeness score {f.completeness:.3f} "
              f"({f.nodes} nodes, {f.links} edges of {g.size} nodes; {seconds:.1f} s)\n  {f.json}\n  {f.html}\n  {f.png}")
        files.append(f)
    return files


def _width(conf: Config) -> int:
    from lensflow.tasks.circuits.checks import transcoder_width

    return transcoder_width(conf)


@flow(name=EXPERIMENT.name, log_prints=True)
def circuits_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = resolve_model(load_config(config, overrides))
    EXPERIMENT.check_inputs(conf)  # bad languages, supernodes, prompts or transcoders: here, before any run or actor
    cc = conf.circuits
    prompts = graph_prompts(list(cc.languages), cc.graph_pairs, cc.prompts)
    with open_session(conf, EXPERIMENT.name) as s:
        dicts = transcoders_stage(conf, s.pool, s.info)
        log_transcoders(s.run, dicts.layers, dicts.url)
        files = _graphs(conf, s, dicts.url, prompts, as_task=True)
        text = log_graph_summary(s.run, files)
        swaps = ""
        if cc.intervene:
            outcomes, kept = interventions_stage(conf, s.pool, dicts.url, s.info.n_layers)
            swaps = log_swaps(s.run, s.info.name, cc.strength, outcomes, kept)
    print(text + "\n" + swaps)
    return {"run_id": s.run.run_id, "transcoders": dicts.url, "transcoders_computed": dicts.computed,
            "graphs": [f.__dict__ for f in files], "interventions": swaps}


def attribute_command(conf: Config, prompt: str) -> dict[str, str]:
    """`lensflow attribute PROMPT`: the prompt's graph (training the transcoders first if they are not published),
    written as JSON, HTML and PNG and logged to a circuits run with its replacement and completeness scores."""
    from lensflow.tasks.circuits.checks import check_inputs

    conf = resolve_model(conf)
    check_inputs(conf, [prompt])
    with open_session(conf, EXPERIMENT.name) as s:
        tracking.set_tags(s.run, {"circuits.command": "attribute"})
        dicts = prepare_transcoders(conf, s.pool, s.info)
        log_transcoders(s.run, dicts.layers, dicts.url)
        (f,) = _graphs(conf, s, dicts.url, [prompt])
        log_graph_summary(s.run, [f])
    return {"json": f.json, "html": f.html, "png": f.png, "replacement_score": f"{f.replacement:.4f}",
            "completeness_score": f"{f.completeness:.4f}", "run_id": s.run.run_id}
