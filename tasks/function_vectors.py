"""Function vectors (Todd et al., ICLR 2024): which attention heads carry an in-context task, and the
vector their mean outputs make, which triggers the task with no demonstrations.

The engine is `last_token_logits`: many prompts that share a prefix (the same demonstrations, or the
same prompt patched in 270 different ways) run as ONE pass over the prefix (KV cache) plus ONE packed
pass over all their suffixes, each suffix attending to the prefix and to itself only (a block-diagonal
4-D mask, position ids restarting after the prefix). That is exactly the computation of separate
forward passes, without copying the prefix cache once per row as a batch-expanded cache would. The
causal-mediation sweep patches one head per row at the last token, so it costs one prefix pass plus
n_layers * n_heads single-token rows instead of n_layers * n_heads full forward passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lensflow.tasks.config import FunctionVectorsConf
from lensflow.tasks.hooks import Edit, Read, trace
from lensflow.tasks.icl import Pair, Split, Template, answer_token, demonstrations, pairs_hash
from lensflow.tasks.models import LM

Head = tuple[int, int]  # (layer, head)
EditFn = Callable[[torch.Tensor, torch.Tensor], list[Edit]]  # (prompt indices, packed last positions) -> edits


# ---------------------------------------------------------------- shared-prefix packed forward


def _common_prefix_len(token_lists: list[list[int]]) -> int:
    """Longest shared prefix, leaving at least one token of every prompt for the packed pass."""
    limit = min(len(t) for t in token_lists) - 1
    first = token_lists[0]
    n = 0
    while n < limit and all(t[n] == first[n] for t in token_lists):
        n += 1
    return n


def _chunks(lengths: list[int], budget: int) -> list[list[int]]:
    out: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if out[-1] and used + n > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


@torch.no_grad()
def last_token_logits(lm: LM, token_lists: list[list[int]], edit_fn: EditFn | None = None,
                      pack_tokens: int = 1024) -> torch.Tensor:
    """Logits [n, vocab] (float32, CPU) at the last token of every prompt, exactly as n separate forward passes.

    edit_fn(indices, last) returns the hooks.Edit list for one packed pass: `indices` are the prompts in it,
    `last` their last tokens' positions in the packed sequence (batch row 0)."""
    dev = lm.device
    p = _common_prefix_len(token_lists)
    cache = None
    if p:
        cache = lm.base(input_ids=torch.tensor([token_lists[0][:p]], device=dev), use_cache=True).past_key_values
    suffixes = [t[p:] for t in token_lists]
    out = []
    for chunk in _chunks([len(s) for s in suffixes], pack_tokens):
        lens = torch.tensor([len(suffixes[i]) for i in chunk], device=dev)
        ids = torch.tensor([tok for i in chunk for tok in suffixes[i]], device=dev)
        seg = torch.repeat_interleave(torch.arange(len(chunk), device=dev), lens)
        starts = torch.cumsum(lens, 0) - lens
        offset = torch.arange(len(ids), device=dev) - starts[seg]
        ar = torch.arange(len(ids), device=dev)
        allowed = (seg[:, None] == seg[None, :]) & (ar[None, :] <= ar[:, None])
        mask = torch.zeros(1, 1, len(ids), p + len(ids), dtype=lm.dtype, device=dev)
        mask[0, 0, :, p:] = torch.where(allowed, 0.0, torch.finfo(lm.dtype).min)
        last = starts + lens - 1
        edits = edit_fn(torch.tensor(chunk, device=dev), last) if edit_fn else []
        with trace(lm, edits=edits):
            h = lm.base(input_ids=ids[None], attention_mask=mask, position_ids=(p + offset)[None],
                        past_key_values=cache, use_cache=cache is not None).last_hidden_state
        if cache is not None:
            cache.crop(p - cache.get_seq_length())  # drop this chunk's keys: the next chunk sees the bare prefix
        out.append(lm.unembed(h[0, last]).float().cpu())
    return torch.cat(out)


def tokenize(lm: LM, texts: list[str]) -> list[list[int]]:
    return [lm.tokenizer(t)["input_ids"] for t in texts]


def add_vector_edits(fv: torch.Tensor, layer: int, flags: torch.Tensor) -> EditFn:
    """Edit function adding `fv` to resid `layer` at the last token of the prompts whose flag is set."""

    def edit_fn(idx: torch.Tensor, last: torch.Tensor) -> list[Edit]:
        on = flags.to(idx.device)[idx]
        if not on.any():
            return []
        pos = last[on]
        return [Edit("resid", layer, fv, position=pos, rows=torch.zeros_like(pos), mode="add")]

    return edit_fn


# ---------------------------------------------------------------- mean head outputs, sweep, vector


@torch.no_grad()
def mean_head_outputs(lm: LM, texts: list[str], pack_tokens: int = 1024) -> torch.Tensor:
    """Mean over prompts of every head's output at the last token: [n_layers, n_heads, head_dim] float32."""
    total = torch.zeros(lm.n_layers, lm.n_heads, lm.head_dim, dtype=torch.float64)
    longest = max(len(t) for t in tokenize(lm, texts))
    batch = max(1, pack_tokens // longest)
    for i in range(0, len(texts), batch):
        enc = lm.encode(texts[i:i + batch])
        reads = [Read("attn_head", layer, position=enc["last"]) for layer in range(lm.n_layers)]
        with trace(lm, reads=reads) as t:
            lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        total += torch.stack([t["attn_head", layer].sum(0) for layer in range(lm.n_layers)]).double().cpu()
    return (total / len(texts)).float()


def indirect_effects(lm: LM, token_ids: list[int], answer: int, means: torch.Tensor,
                     pack_tokens: int = 1024) -> torch.Tensor:
    """[n_layers, n_heads]: change in P(answer) when one head's last-token output is replaced by its task mean.

    Rows 0..L*H-1 each patch one head (row = layer * n_heads + head); the last row is the unpatched baseline."""
    n_heads = lm.n_heads
    n = lm.n_layers * n_heads
    values = means.to(lm.device, lm.dtype)

    def edit_fn(idx: torch.Tensor, last: torch.Tensor) -> list[Edit]:
        edits = []
        for layer in torch.unique(idx[idx < n] // n_heads).tolist():
            sel = (idx < n) & (idx // n_heads == layer)
            heads = idx[sel] % n_heads
            edits.append(Edit("attn_head", layer, values[layer, heads], position=last[sel], head=heads,
                              rows=torch.zeros_like(heads)))
        return edits

    probs = last_token_logits(lm, [token_ids] * (n + 1), edit_fn, pack_tokens).softmax(-1)[:, answer]
    return (probs[:n] - probs[n]).view(lm.n_layers, n_heads)


def top_heads(aie: torch.Tensor | np.ndarray, k: int) -> list[Head]:
    flat = torch.as_tensor(aie).flatten()
    order = torch.argsort(flat, descending=True)[:k].tolist()
    n_heads = torch.as_tensor(aie).shape[1]
    return [(i // n_heads, i % n_heads) for i in order]


def default_top_k(n_layers: int, n_heads: int) -> int:
    """Paper: 10 of GPT-J's 448 heads; small models keep 10 unless that is over a quarter of their heads."""
    return min(10, max(1, n_layers * n_heads // 4))


def function_vector(lm: LM, heads: list[Head], head_means: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen heads' mean outputs through the attention output projection: [d_model]."""
    fv = torch.zeros(lm.d_model, dtype=torch.float32, device=lm.device)
    for (layer, head), value in zip(heads, head_means):
        fv += lm.head_output_to_resid(layer, head, value.to(lm.device)).float()
    return fv


# ---------------------------------------------------------------- per-task work (run on the model actors)


@dataclass(frozen=True)
class TaskJob:
    name: str
    split: Split
    conf: FunctionVectorsConf


@dataclass(frozen=True)
class EvalJob:
    task: TaskJob
    heads: list[Head]
    head_means: np.ndarray  # [k, head_dim]: this task's mean outputs of the chosen heads
    layer: int
    sweep_layers: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TransferJob:
    target: TaskJob
    heads: list[Head]
    head_means: np.ndarray  # the source task's mean outputs of the chosen heads
    layer: int


def template(conf: FunctionVectorsConf) -> Template:
    return Template(conf.query_template, conf.answer_template, conf.separator)


def _rng(conf: FunctionVectorsConf, name: str, purpose: str) -> random.Random:
    return random.Random(f"{conf.seed}:{name}:{purpose}")


def icl_prompts(split: Split, conf: FunctionVectorsConf, name: str, n: int, shuffle_labels: bool,
                purpose: str) -> tuple[list[str], list[Pair]]:
    """n prompts of n_shots training demonstrations + a training query (sampled with replacement when
    the task is small); returns the texts and the query pairs."""
    rng = _rng(conf, name, purpose)
    tpl = template(conf)
    texts, queries = [], []
    for _ in range(n):
        q = rng.choice(split.train)
        demos = demonstrations(split.train, conf.n_shots, rng, exclude=q[0], shuffle_labels=shuffle_labels)
        texts.append(tpl.prompt(demos, q[0]))
        queries.append(q)
    return texts, queries


def task_sweep(lm: LM, job: TaskJob, cache_file: str | None = None) -> dict[str, np.ndarray]:
    """Mean head outputs on clean prompts and mean indirect effects on shuffled-label prompts, for one task.

    With cache_file, a finished result is saved there (and loaded instead of recomputed by a rerun)."""
    if cache_file and Path(cache_file).is_file():
        with np.load(cache_file) as z:
            return {k: z[k] for k in z.files}
    conf, tpl = job.conf, template(job.conf)
    clean, _ = icl_prompts(job.split, conf, job.name, conf.n_clean, False, "clean")
    means = mean_head_outputs(lm, clean, conf.pack_tokens)
    shuffled, queries = icl_prompts(job.split, conf, job.name, conf.n_shuffled, True, "shuffled")
    ie = torch.zeros(lm.n_layers, lm.n_heads)
    for text, (_, y) in zip(shuffled, queries):
        ids = lm.tokenizer(text)["input_ids"]
        ie += indirect_effects(lm, ids, answer_token(lm.tokenizer, text, tpl.continuation(y)), means, conf.pack_tokens)
    result = {"means": means.numpy(), "ie": (ie / len(shuffled)).numpy()}
    if cache_file:
        path = Path(cache_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **result)
        tmp.replace(path)  # atomic: a crash never leaves a half-written result to be "resumed"
    return result


def cached_sweep(lm: LM, item: tuple[TaskJob, str | None]) -> dict[str, np.ndarray]:
    """pool.map entry point: (job, cache file or None)."""
    return task_sweep(lm, *item)


def _accuracy(lm: LM, texts: list[str], answers: list[int], conf: FunctionVectorsConf,
              fv: torch.Tensor | None = None, layer: int = 0, plain: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top-1 first-token correctness without (if plain) and with (if fv is given) the vector, in one packed call."""
    ids = tokenize(lm, texts)
    ans = torch.tensor(answers)
    rows = (ids if plain else []) + (ids if fv is not None else [])
    flags = torch.tensor([False] * len(ids) * plain + [True] * len(ids) * (fv is not None))
    edit_fn = add_vector_edits(fv, layer, flags) if fv is not None else None
    ok = (last_token_logits(lm, rows, edit_fn, conf.pack_tokens).argmax(-1) == ans.repeat(len(rows) // len(ids))).numpy()
    n = len(ids)
    return (ok[:n] if plain else None), (ok[-n:] if fv is not None else None)


def _demo_groups(job: TaskJob, queries: list[Pair], shuffle_labels: bool, purpose: str) -> list[tuple[list[Pair], list[int]]]:
    """Test queries grouped by shared demonstration set (one set per query by default, as in the paper)."""
    conf = job.conf
    n_sets = min(conf.demo_sets or len(queries), len(queries))
    rng = _rng(conf, job.name, purpose)
    groups = []
    for s in range(n_sets):
        demos = demonstrations(job.split.train, conf.n_shots, rng, shuffle_labels=shuffle_labels)
        groups.append((demos, list(range(s, len(queries), n_sets))))
    return groups


def _icl_accuracy(lm: LM, job: TaskJob, queries: list[Pair], shuffle_labels: bool, purpose: str,
                  fv: torch.Tensor | None = None, layer: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    tpl = template(job.conf)
    plain = np.zeros(len(queries), bool)
    with_fv = np.zeros(len(queries), bool) if fv is not None else None
    for demos, idx in _demo_groups(job, queries, shuffle_labels, purpose):
        texts = [tpl.prompt(demos, queries[i][0]) for i in idx]
        answers = [answer_token(lm.tokenizer, t, tpl.continuation(queries[i][1])) for t, i in zip(texts, idx)]
        a, b = _accuracy(lm, texts, answers, job.conf, fv, layer)
        plain[idx] = a
        if with_fv is not None:
            with_fv[idx] = b
    return plain, with_fv


def _zero_shot(lm: LM, conf: FunctionVectorsConf, queries: list[Pair], fmt: str, fv: torch.Tensor | None,
               layer: int, plain: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
    tpl = template(conf)
    texts = [fmt.format(input=x) for x, _ in queries]
    answers = [answer_token(lm.tokenizer, t, tpl.continuation(y)) for t, (_, y) in zip(texts, queries)]
    return _accuracy(lm, texts, answers, conf, fv, layer, plain)


def _mean(x: np.ndarray | None) -> float:
    return float(np.mean(x)) if x is not None and len(x) else float("nan")


def task_eval(lm: LM, job: EvalJob) -> dict:
    """Accuracy with and without the task's function vector on test queries the model solves at n_shots:
    zero-shot, shuffled-label n_shots, natural-text templates, and zero-shot with the vector at other layers."""
    conf = job.task.conf
    fv = function_vector(lm, job.heads, torch.tensor(job.head_means)) * conf.scale
    queries = job.task.split.test[: conf.n_test]
    icl, _ = _icl_accuracy(lm, job.task, queries, False, "test_clean")
    kept = [q for q, ok in zip(queries, icl) if ok or not conf.filter_correct]
    metrics = {"icl.acc": _mean(icl), "n_eval": float(len(kept))}
    sweep: dict[int, float] = {}
    if kept:
        zs, zs_fv = _zero_shot(lm, conf, kept, conf.query_template, fv, job.layer)
        sh, sh_fv = _icl_accuracy(lm, job.task, kept, True, "test_shuffled", fv, job.layer)
        nat = [_zero_shot(lm, conf, kept, t, fv, job.layer) for t in conf.natural_templates]
        metrics |= {
            "zero_shot.acc": _mean(zs), "zero_shot_fv.acc": _mean(zs_fv),
            "shuffled.acc": _mean(sh), "shuffled_fv.acc": _mean(sh_fv),
            "natural_text.acc": float(np.mean([_mean(a) for a, _ in nat])) if nat else float("nan"),
            "natural_text_fv.acc": float(np.mean([_mean(b) for _, b in nat])) if nat else float("nan"),
        }
        for layer in job.sweep_layers:
            sweep[layer] = _mean(_zero_shot(lm, conf, kept, conf.query_template, fv, layer, plain=False)[1])
    return {"metrics": metrics, "layer_sweep": sweep, "fv": fv.cpu().numpy()}


def transfer_eval(lm: LM, job: TransferJob) -> dict[str, float]:
    """Source-task vector added to the target task's zero-shot prompts: how often the first answer token is
    the target-language answer."""
    conf = job.target.conf
    fv = function_vector(lm, job.heads, torch.tensor(job.head_means)) * conf.scale
    queries = job.target.split.test[: conf.n_test]
    plain, with_fv = _zero_shot(lm, conf, queries, conf.query_template, fv, job.layer)
    return {"acc": _mean(plain), "fv.acc": _mean(with_fv), "n": float(len(queries))}


def sweep_cache_file(cache_dir: str | None, model: dict, job: TaskJob) -> str | None:
    """Where a task's sweep result lives: keyed by everything that changes it (model, prompts, task data)."""
    if cache_dir is None:
        return None
    c = job.conf
    key = {"model": model, "task": job.name, "data": pairs_hash(job.split.train),
           **{f: getattr(c, f) for f in ("seed", "n_shots", "query_template", "answer_template", "separator",
                                          "n_clean", "n_shuffled")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return str(Path(cache_dir).resolve() / f"{job.name}-{digest}.npz")
