"""Flow `lre`: Hernandez et al. (2024), "Linearity of Relation Decoding in Transformer Language Models".

  1. relation files (shipped, or lre.relations: a folder of the paper's JSON files or one file) -> the relations
     to run and their train / dev / test split of samples;
  2. per relation, on the model actors in parallel: batched Jacobians on the n training samples -> W, b per layer;
     beta, rank and layer chosen on the dev samples; faithfulness and causality on the test subjects with the
     baselines (logit lens, translation, regression); one stage item per relation under store.root;
  3. per-relation curves (step = layer), means, the table sorted by faithfulness and the figure by relation kind.
"""

from __future__ import annotations

from prefect import flow

from lensflow.flows import stage
from lensflow.tasks.core.session import open_session
from lensflow.tasks.registry import load_config
from lensflow.tasks.relations import EXPERIMENT, fitting
from lensflow.tasks.relations.data import load_relations, select_relations
from lensflow.tasks.relations.report import log_results, summarise

fit_relations = stage(fitting.fit_relations)


@flow(name=EXPERIMENT.name, log_prints=True)
def lre_flow(config: str = "conf/default.yaml", overrides: list[str] | None = None) -> dict:
    conf = load_config(config, overrides)
    EXPERIMENT.check_inputs(conf)  # bad relation files or layers fail here, before a run or actor exists
    relations = select_relations(load_relations(conf.lre.relations), conf.lre.only, conf.lre.max_relations)
    with open_session(conf, EXPERIMENT.name) as s:
        fitted = fit_relations(conf, relations, s.pool)
        text = log_results(s.run, s.info.name, fitted)
    print(text)
    print(f"LRE stage: {fitted.url} ({fitted.computed} relations computed, {len(fitted.results) - fitted.computed} found)")
    summary = summarise(fitted.results)
    return {"run_id": s.run.run_id, "stage": fitted.url, **fitted.metrics(), "faithfulness": summary.faithfulness,
            "causality": summary.causality, "by_kind": summary.by_kind,
            "relations": {r.name: {"kind": r.kind, "layer": r.layer, "faithfulness": r.at_layer(r.faithfulness),
                                   "causality": r.at_layer(r.causality)} for r in fitted.results}}
