"""The LRE stage, driver side: relations split, fitted and scored on the model actors in parallel (one actor per
relation at a time), one stage item per relation, so a killed run resumes per relation and a rerun finds all."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.stages import Stage
from lensflow.tasks.relations.data import Relation, split
from lensflow.tasks.relations.lre import RelationJob, RelationResult, Settings, relation_job

VERSION = 1  # of the LRE fit and scores computed here; part of the stage key


@dataclass(frozen=True)
class Fitted:
    url: str
    results: list[RelationResult]
    computed: int
    wall_s: float

    def metrics(self) -> dict[str, float]:
        return {"relations": len(self.results), "relations_computed": self.computed, "wall_s": self.wall_s}


def fit_relations(conf: Config, relations: list[Relation], pool: ModelPool) -> Fitted:
    lc = conf.lre
    info = pool.describe()
    settings = Settings(tuple(lc.layer_list(info.n_layers)), tuple(lc.betas), tuple(lc.ranks), lc.max_pairs, lc.jacobian_rows)
    stage = Stage.of(conf.store.root, "lre", info.id, settings.key_params(), version=VERSION)
    jobs = [RelationJob(stage, r, split(r, lc.n_train, lc.n_dev, lc.max_test, lc.seed), settings) for r in relations]
    t0 = time.perf_counter()
    done = pool.map(relation_job, jobs, desc="lre (relations)", in_flight=1)
    return Fitted(stage.url, [r for r, _ in done], sum(c for _, c in done), time.perf_counter() - t0)
