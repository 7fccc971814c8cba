"""Attribution graphs as a stage: one item per prompt, keyed by the transcoders' stage and the attribution
settings, computed on the model actors in parallel (each prompt's backward passes batched), so a rerun or another
flow finds a prompt's graph again and a killed run resumes per prompt."""

from __future__ import annotations

from dataclasses import dataclass

from lensflow.tasks.circuits.attribution import Graph, attribute
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.dictionaries.transcoder_stage import load_transcoders
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, ModelId, Stage, digest

VERSION = 2  # 2: the computed rows only (weights [r, n] and rows), not a dense adjacency
SETTINGS = ("logit_share", "max_logits", "max_feature_rows")


def graph_stage(root: str, transcoders_url: str, settings: dict) -> Stage:
    return Stage.of(root, "circuits/graphs", None, {k: settings[k] for k in SETTINGS}, inputs=[transcoders_url],
                    version=VERSION)


_LOADED: dict[tuple[str, ModelId], dict[int, Transcoder]] = {}  # per actor process: one stage at a time


def actor_transcoders(lm: LM, url: str) -> dict[int, Transcoder]:
    """The stage's transcoders, loaded once per actor (and refused when they belong to another model)."""
    key = (url, lm.id)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = {l: tc.to(lm.device) for l, tc in load_transcoders(url, lm.id, lm.n_layers).items()}
    return _LOADED[key]


@dataclass(frozen=True)
class GraphJob:
    stage: Stage
    transcoders: str
    prompt: str
    logit_share: float
    max_logits: int
    batch_rows: int
    max_batch_tokens: int
    max_feature_rows: int | None

    @property
    def item(self) -> str:
        return "prompt_" + digest([self.prompt])[:16]


def to_item(g: Graph) -> Item:
    return Item({"features": g.features, "activations": g.activations, "logit_probs": g.logit_probs,
                 "weights": g.weights, "rows": g.rows},
                {"prompt": g.prompt, "tokens": g.tokens, "token_strs": g.token_strs, "logit_tokens": g.logit_tokens,
                 "logit_strs": g.logit_strs, "n_layers": g.n_layers})


def from_item(item: Item) -> Graph:
    m, t = item.meta, item.tensors
    return Graph(m["prompt"], m["tokens"], m["token_strs"], t["features"], t["activations"], m["logit_tokens"],
                 m["logit_strs"], t["logit_probs"], t["weights"], m["n_layers"], t["rows"])


def graph_of(lm: LM, job: GraphJob) -> tuple[Graph, bool, float]:
    """Actor side: (the prompt's graph, whether this call computed it, seconds it took)."""
    import time

    start = time.perf_counter()

    def compute() -> Item:
        tcs = actor_transcoders(lm, job.transcoders)
        return to_item(attribute(lm, tcs, job.prompt, job.logit_share, job.max_logits, job.batch_rows,
                                 job.max_batch_tokens, job.max_feature_rows))

    item, computed = job.stage.get_or_compute(job.item, compute)
    return from_item(item), computed, time.perf_counter() - start


def graphs(pool, stage: Stage, transcoders: str, prompts: list[str], logit_share: float, max_logits: int,
           batch_rows: int, max_batch_tokens: int, max_feature_rows: int | None) -> list[tuple[Graph, bool, float]]:
    jobs = [GraphJob(stage, transcoders, p, logit_share, max_logits, batch_rows, max_batch_tokens, max_feature_rows)
            for p in prompts]
    return pool.map(graph_of, jobs, desc="attribution graphs", in_flight=1)

