"""The interventions on the model actors: one job per prompt language (each actor reads the feature groups of every
language, which the contrasts need, and runs the edits whose prompts are in its language)."""

from __future__ import annotations

from dataclasses import dataclass

from lensflow.tasks.circuits.graphs import actor_transcoders
from lensflow.tasks.circuits.swaps import Outcome, plan, run_plans
from lensflow.tasks.core.config import Config
from lensflow.tasks.core.models import LM
from lensflow.tasks.data.antonym_set import load_antonyms


@dataclass(frozen=True)
class SwapJob:
    transcoders: str
    languages: tuple[str, ...]
    source: str
    n_pairs: int
    layers: tuple[int, ...]
    group_size: int
    strength: float
    seed: int


def run_job(lm: LM, job: SwapJob) -> tuple[list[Outcome], dict[str, list[str]]]:
    tcs = actor_transcoders(lm, job.transcoders)
    pairs = load_antonyms(list(job.languages))[:job.n_pairs]
    plans, kept = plan(lm, tcs, pairs, list(job.languages), list(job.layers), job.group_size, job.seed,
                       sources=[job.source])
    return run_plans(lm, tcs, plans, job.strength), kept


def run_interventions(conf: Config, pool, transcoders: str, n_layers: int) -> tuple[list[Outcome], dict[str, list[str]]]:
    cc = conf.circuits
    jobs = [SwapJob(transcoders, tuple(cc.languages), lang, cc.pairs, tuple(cc.layer_list(n_layers)), cc.group_size,
                    cc.strength, cc.seed) for lang in cc.languages]
    results = pool.map(run_job, jobs, desc="interventions", in_flight=1)
    outcomes = [o for res, _ in results for o in res]
    return outcomes, results[0][1] if results else {}
