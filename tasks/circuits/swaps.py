"""The seed's three interventions on the antonym set, each a success rate per (prompt language, target language)
with two controls.

  language   suppress the prompt language's features at the last position, inject the target language's:
             success = the top-1 token starts the antonym in the target language
  operand    at the operand's last token, swap the word's features for another adjective's (the next pair of the
             set): success = the top-1 token starts that adjective's antonym in the prompt's language
  operation  at the last position, suppress antonym features and inject synonym features: success = the top-1 token
             starts the listed synonym in the prompt's language

Feature groups are read from the model, per edited layer (the `group_size` features with the largest contrast):
a language's group contrasts its antonym prompts with the other languages' (mean codes at the last position); a
word's group contrasts its operand position with the other words' of the same language; the antonym and synonym
groups contrast antonym prompts with synonym prompts of one language. Injected features get their mean activation
there. Controls: random features (none of the group's) injected with the same norm of residual change per layer
instead of the edit, and the same edit at the wrong position (position 1, the first token after BOS). Only pairs
the model answers right without intervention (top-1 token) are used, per language.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensflow.tasks.circuits.interventions import Case, FeatureOp, run_cases
from lensflow.tasks.core.dictionaries.transcoder import Transcoder
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import LM
from lensflow.tasks.data.antonym_set import TEMPLATES, AntonymPair, prompt, synonym_prompt

EXPERIMENTS = ("language", "operand", "operation")
WRONG_POSITION = 1


def starts_answer(token: str, answers: tuple[str, ...] | list[str]) -> bool:
    """The top-1 token begins one of the answers (two characters at least, unless the answer is shorter)."""
    s = token.strip().casefold()
    return bool(s) and any(a.casefold().startswith(s) and len(s) >= min(2, len(a)) for a in answers)


@torch.no_grad()
def codes_at(lm: LM, transcoders: dict[int, Transcoder], prompts: list[str], positions: list[int],
             layers: list[int]) -> torch.Tensor:
    """[prompts, layers, width]: each prompt's transcoder codes at its position, on the clean model."""
    enc = lm.encode(prompts)
    with trace(lm, reads=[Read("mlp_in", l) for l in layers]) as t:
        t.forward(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], until=max(layers) + 1)
    rows = torch.arange(len(prompts), device=lm.device)
    pos = torch.tensor(positions, device=lm.device)
    return torch.stack([transcoders[l].to(lm.device).encode(t["mlp_in", l][rows, pos].float()) for l in layers],
                       1).cpu()


def top_group(contrast: torch.Tensor, size: int) -> list[list[int]]:
    """Per layer, the `size` features with the largest positive contrast."""
    out = []
    for row in contrast:
        vals, idx = row.topk(min(size, row.numel()))
        out.append(idx[vals > 0].tolist())
    return out


def last_positions(lm: LM, prompts: list[str]) -> list[int]:
    return [len(lm.tokenizer(p).input_ids) - 1 for p in prompts]


def operand_position(lm: LM, lang: str, word: str) -> int | None:
    """The last token of the operand in the prompt, or None where the prompt tokenises across the word's end."""
    full = lm.tokenizer(prompt(lang, word)).input_ids
    head = lm.tokenizer(TEMPLATES[lang].split("{}")[0] + word).input_ids
    return len(head) - 1 if full[:len(head)] == head else None


@dataclass(frozen=True)
class Plan:
    """One intervention on one prompt: the edit, its two controls, and what counts as success."""

    experiment: str
    source: str  # prompt language
    target: str  # answer language
    pair: str
    case: Case
    random_case: Case
    wrong_case: Case
    answers: tuple[str, ...]
    unedited: bool  # the unedited model's top-1 token already counts as success (e.g. grand / grande)


def _ops(layers: list[int], position: int, suppress: list[list[int]], inject: list[list[int]],
         values: torch.Tensor) -> list[FeatureOp]:
    ops = []
    for i, l in enumerate(layers):
        if suppress[i]:
            ops.append(FeatureOp(l, position, tuple(suppress[i]), "set", (0.0,) * len(suppress[i])))
        if inject[i]:
            ops.append(FeatureOp(l, position, tuple(inject[i]), "add", tuple(float(values[i, f]) for f in inject[i])))
    return ops


def _random_ops(layers: list[int], position: int, transcoders: dict[int, Transcoder], clean: torch.Tensor,
                ops: list[FeatureOp], gen: torch.Generator) -> list[FeatureOp]:
    """Random features (none of the edit's), injected at `position` with the edit's norm of residual change."""
    out = []
    for i, l in enumerate(layers):
        mine = [o for o in ops if o.layer == l]
        if not mine:
            continue
        dec = transcoders[l].decoder_vectors()
        z = clean[i]
        z_new = z.clone()
        for o in mine:
            f = torch.tensor(o.features)
            v = torch.tensor(o.values)
            z_new[f] = v if o.kind == "set" else z[f] + v if o.kind == "add" else z[f] * v
        norm = float(((z_new - z) @ dec).norm())
        taken = {f for o in mine for f in o.features}
        n = sum(len(o.features) for o in mine)
        pool = torch.tensor([f for f in torch.randperm(dec.shape[0], generator=gen).tolist() if f not in taken][:n])
        unit = dec[pool].sum(0).norm().clamp_min(1e-8)
        out.append(FeatureOp(l, position, tuple(pool.tolist()), "add", (norm / float(unit),) * len(pool)))
    return out


def plan(lm: LM, transcoders: dict[int, Transcoder], pairs: list[AntonymPair], languages: list[str],
         layers: list[int], group_size: int, seed: int = 0,
         sources: list[str] | None = None) -> tuple[list[Plan], dict[str, list[str]]]:
    """Every intervention of the three experiments whose prompt is in one of `sources` (default: every language),
    with the pairs kept per language."""
    sources = list(languages) if sources is None else sources
    gen = torch.Generator().manual_seed(seed)
    ant = {lang: [prompt(lang, p.entries[lang].word) for p in pairs] for lang in languages}
    syn = {lang: [synonym_prompt(lang, p.entries[lang].word) for p in pairs] for lang in languages}
    # which pairs the model answers right, unedited
    flat = [q for lang in languages for q in ant[lang]]
    base = run_cases(lm, transcoders, [Case(q) for q in flat]).argmax(-1).tolist()
    top_of = {q: lm.tokenizer.decode([t]) for q, t in zip(flat, base)}
    kept: dict[str, list[int]] = {}
    for li, lang in enumerate(languages):
        tops = base[li * len(pairs):(li + 1) * len(pairs)]
        kept[lang] = [i for i, p in enumerate(pairs) if starts_answer(lm.tokenizer.decode([tops[i]]),
                                                                        p.entries[lang].antonyms)]
    codes = {lang: codes_at(lm, transcoders, ant[lang], last_positions(lm, ant[lang]), layers) for lang in languages}
    syn_codes = {lang: codes_at(lm, transcoders, syn[lang], last_positions(lm, syn[lang]), layers)
                 for lang in languages}
    mean = {lang: codes[lang].mean(0) for lang in languages}
    plans: list[Plan] = []

    def add(experiment: str, src: str, tgt: str, i: int, q: str, pos: int, ops: list[FeatureOp], clean: torch.Tensor,
            answers: tuple[str, ...]) -> None:
        rand = _random_ops(layers, pos, transcoders, clean, ops, gen)
        wrong = [FeatureOp(o.layer, WRONG_POSITION, o.features, o.kind, o.values) for o in ops]
        plans.append(Plan(experiment, src, tgt, pairs[i].id, Case(q, ops), Case(q, rand), Case(q, wrong), answers,
                          starts_answer(top_of[q], answers)))

    # (a) language
    for src in sources:
        own = mean[src] - torch.stack([mean[o] for o in languages if o != src]).amax(0) if len(languages) > 1 \
            else mean[src]
        suppress = top_group(own, group_size)
        for tgt in languages:
            if tgt == src or not kept[tgt]:  # only languages the model answers in
                continue
            other = mean[tgt] - torch.stack([mean[o] for o in languages if o != tgt]).amax(0)
            inject = top_group(other, group_size)
            for i in kept[src]:
                pos = last_positions(lm, [ant[src][i]])[0]
                add("language", src, tgt, i, ant[src][i], pos, _ops(layers, pos, suppress, inject, mean[tgt]),
                    codes[src][i], pairs[i].entries[tgt].antonyms)
    # (b) operand
    for lang in sources:
        ids = kept[lang]
        opos = {i: operand_position(lm, lang, pairs[i].entries[lang].word) for i in range(len(pairs))}
        usable = [i for i in range(len(pairs)) if opos[i] is not None]
        if len(usable) < 2:
            continue
        word_codes = codes_at(lm, transcoders, [ant[lang][i] for i in usable], [opos[i] for i in usable], layers)
        by = {i: word_codes[k] for k, i in enumerate(usable)}
        for a in ids:
            if a not in by:
                continue
            b = usable[(usable.index(a) + 1) % len(usable)]
            rest_a = torch.stack([by[j] for j in usable if j != a]).mean(0)
            rest_b = torch.stack([by[j] for j in usable if j != b]).mean(0)
            ops = _ops(layers, opos[a], top_group(by[a] - rest_a, group_size), top_group(by[b] - rest_b, group_size),
                       by[b])
            add("operand", lang, lang, a, ant[lang][a], opos[a], ops, by[a], pairs[b].entries[lang].antonyms)
    # (c) operation
    for lang in sources:
        m_syn = syn_codes[lang].mean(0)
        suppress = top_group(mean[lang] - m_syn, group_size)
        inject = top_group(m_syn - mean[lang], group_size)
        for i in kept[lang]:
            pos = last_positions(lm, [ant[lang][i]])[0]
            add("operation", lang, lang, i, ant[lang][i], pos, _ops(layers, pos, suppress, inject, m_syn),
                codes[lang][i], (pairs[i].entries[lang].synonym,))
    return plans, {lang: [pairs[i].id for i in kept[lang]] for lang in languages}


@dataclass(frozen=True)
class Outcome:
    experiment: str
    source: str
    target: str
    pair: str
    success: bool
    random_control: bool
    wrong_position: bool
    unedited: bool
    answer: str  # the edited top-1 token


def run_plans(lm: LM, transcoders: dict[int, Transcoder], plans: list[Plan], strength: float) -> list[Outcome]:
    cases = [c for p in plans for c in (p.case, p.random_case, p.wrong_case)]
    tops = run_cases(lm, transcoders, cases, strength).argmax(-1).tolist()
    out = []
    for i, p in enumerate(plans):
        words = [lm.tokenizer.decode([t]) for t in tops[3 * i:3 * i + 3]]
        out.append(Outcome(p.experiment, p.source, p.target, p.pair, *(starts_answer(w, p.answers) for w in words),
                           p.unedited, words[0]))
    return out
