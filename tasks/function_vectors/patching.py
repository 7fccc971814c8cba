"""The function-vectors experiment's ICL tasks, prompts and its expensive stage: the per-ICL-task head patching.

For each ICL task: the mean output of every attention head at the last token of clean n-shot prompts, then the
indirect effect of patching each head (one at a time) with its mean into shuffled-label prompts. One stage item
per ICL task, published by the model actor right after the task, so a killed run keeps the finished ICL tasks and
a rerun (on any node that sees store.root) finds them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lensflow.tasks.core.config import Config, ConfigError
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, ModelId, Stage
from lensflow.tasks.function_vectors.config import FunctionVectorsConf
from lensflow.tasks.function_vectors.heads import indirect_effects, mean_head_outputs
from lensflow.tasks.function_vectors.icl import (
    Pair,
    Split,
    Template,
    available_icl_tasks,
    demonstrations,
    load_pairs,
    pairs_digest,
    scored_prompt,
    split,
)

PATCHING_VERSION = 2  # of the patching's numbers for the same inputs; part of its stage key
PROMPT_KEYS = ("seed", "n_shots", "query_template", "answer_template", "separator")  # shape every prompt


@dataclass(frozen=True)
class IclTaskJob:
    """One ICL task, split by seed, with the experiment's settings (everything an actor needs)."""

    name: str
    split: Split
    conf: FunctionVectorsConf


@dataclass(frozen=True)
class IclTasks:
    """The selected ICL tasks (their patchings choose the heads; each is evaluated) and the ICL tasks that only the
    transfers name (swept for their head means, never voting on the heads)."""

    selected: list[IclTaskJob]
    transfer_only: list[IclTaskJob]

    @property
    def names(self) -> list[str]:
        return [j.name for j in self.selected]

    @property
    def swept(self) -> list[IclTaskJob]:
        return self.selected + self.transfer_only

    def __getitem__(self, name: str) -> IclTaskJob:
        return next(j for j in self.swept if j.name == name)


def load_icl_tasks(fc: FunctionVectorsConf) -> IclTasks:
    """Every selected ICL task and every one a transfer names, split by seed; unknown names fail before any work."""
    known = available_icl_tasks(fc.icl_task_paths)
    names = fc.icl_tasks if fc.icl_tasks is not None else list(known)
    unknown = [n for pair in fc.transfer_pairs() for n in pair if n not in known]
    if unknown:
        raise ConfigError(f"config key 'function_vectors.transfer': unknown ICL task '{unknown[0]}' "
                          f"(known: {', '.join(known)})")
    extra = [n for n in dict.fromkeys(n for pair in fc.transfer_pairs() for n in pair) if n not in names]
    jobs = [IclTaskJob(n, split(load_pairs(n, fc.icl_task_paths), fc.seed), fc) for n in [*names, *extra]]
    return IclTasks(jobs[:len(names)], jobs[len(names):])


def template(conf: FunctionVectorsConf) -> Template:
    return Template(conf.query_template, conf.answer_template, conf.separator)


def prompt_rng(conf: FunctionVectorsConf, name: str, purpose: str) -> random.Random:
    """One seeded stream per (ICL task, purpose): adding a purpose never shifts another one's prompts."""
    return random.Random(f"{conf.seed}:{name}:{purpose}")


def icl_prompts(split: Split, conf: FunctionVectorsConf, name: str, n: int, shuffle_labels: bool,
                purpose: str) -> tuple[list[str], list[Pair]]:
    """n prompts of n_shots training demonstrations + a training query (sampled with replacement when
    the ICL task is small); returns the texts and the query pairs."""
    rng = prompt_rng(conf, name, purpose)
    tpl = template(conf)
    texts, queries = [], []
    for _ in range(n):
        q = rng.choice(split.train)
        demos = demonstrations(split.train, conf.n_shots, rng, exclude=q[0], shuffle_labels=shuffle_labels)
        texts.append(tpl.prompt(demos, q[0]))
        queries.append(q)
    return texts, queries


# ---------------------------------------------------------------- per-ICL-task stage items, computed on the actors


@dataclass(frozen=True)
class StageWork:
    """One stage item for a model actor: found under the store root, or computed by compute(lm, job) and published."""

    stage: Stage
    item: str
    compute: Callable[[LM, Any], Item]
    job: Any


def find_or_compute(lm: LM, work: StageWork) -> tuple[Item, bool]:
    """ModelPool.map entry point: (the item, whether this call computed it)."""
    return work.stage.get_or_compute(work.item, lambda: work.compute(lm, work.job))


# ---------------------------------------------------------------- the head patching


def patching_stage(root: str, model: ModelId, job: IclTaskJob) -> Stage:
    """Keyed by what the patching reads: the model, the prompt settings and the ICL task's training pairs (the patching
    never reads valid or test pairs, so changing those keeps it)."""
    c = job.conf
    params = {"icl_task": job.name, "train": pairs_digest(job.split.train), "n_clean": c.n_clean,
              "n_shuffled": c.n_shuffled, **{k: getattr(c, k) for k in PROMPT_KEYS}}
    return Stage.of(root, "fv_patching", model, params, version=PATCHING_VERSION)


def compute_patching(lm: LM, job: IclTaskJob) -> Item:
    """Mean head outputs on clean prompts and mean indirect effects on shuffled-label prompts, for one ICL task."""
    conf, tpl = job.conf, template(job.conf)
    clean, queries = icl_prompts(job.split, conf, job.name, conf.n_clean, False, "clean")
    clean = [scored_prompt(lm.tokenizer, t, tpl.continuation(y))[0] for t, (_, y) in zip(clean, queries)]
    means = mean_head_outputs(lm, clean, conf.pack_tokens)  # where the answer is predicted, as when scored
    shuffled, queries = icl_prompts(job.split, conf, job.name, conf.n_shuffled, True, "shuffled")
    ie = torch.zeros(lm.n_layers, lm.n_heads)
    for text, (_, y) in zip(shuffled, queries):
        text, answer = scored_prompt(lm.tokenizer, text, tpl.continuation(y))
        ie += indirect_effects(lm, lm.tokenizer(text)["input_ids"], answer, means, conf.pack_tokens)
    return Item({"means": means.cpu(), "ie": ie / len(shuffled)}, {"icl_task": job.name})


@dataclass(frozen=True)
class IclTaskPatching:
    name: str
    key: str  # the patching's stage key: an input of every stage that reads this ICL task's head means
    means: torch.Tensor  # [n_layers, n_heads, head_dim] mean head outputs at the last token (clean prompts)
    ie: torch.Tensor  # [n_layers, n_heads] mean indirect effect (shuffled-label prompts)
    computed: bool  # False when a published item was found

    def head_means(self, heads: list[tuple[int, int]]) -> torch.Tensor:
        """[k, head_dim]: this ICL task's mean outputs of the chosen heads."""
        return torch.stack([self.means[layer, head] for layer, head in heads])


@dataclass(frozen=True)
class Patchings:
    icl_tasks: list[IclTaskPatching]

    def __getitem__(self, name: str) -> IclTaskPatching:
        return next(t for t in self.icl_tasks if t.name == name)

    def __contains__(self, name: object) -> bool:
        return any(t.name == name for t in self.icl_tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.icl_tasks]

    @property
    def ie(self) -> np.ndarray:
        """[icl_tasks, n_layers, n_heads]."""
        return np.stack([t.ie.numpy() for t in self.icl_tasks])

    @property
    def aie(self) -> np.ndarray:
        """Average indirect effect over ICL tasks: [n_layers, n_heads]."""
        return self.ie.mean(0)

    @property
    def computed(self) -> int:
        return sum(t.computed for t in self.icl_tasks)

    def only(self, names: list[str]) -> Patchings:
        return Patchings([self[n] for n in names])


def patch_icl_tasks(conf: Config, jobs: list[IclTaskJob], pool) -> Patchings:
    """The head patching of every ICL task, ICL tasks in parallel across the model actors (pool: actors.ModelPool)."""
    info = pool.describe()
    stages = [patching_stage(conf.store.root, info.id, j) for j in jobs]
    found = pool.map(find_or_compute, [StageWork(s, j.name, compute_patching, j) for s, j in zip(stages, jobs)],
                     desc="FV head patching (ICL tasks)")
    return Patchings([IclTaskPatching(j.name, s.key, item.tensors["means"], item.tensors["ie"], computed)
                   for j, s, (item, computed) in zip(jobs, stages, found)])
