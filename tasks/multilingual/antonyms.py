"""The antonym prompt set (tasks/data/antonyms/antonyms.jsonl): adjectives with their antonyms and a synonym in
every language of the multilingual experiment, and which of them a model answers right.

The seed's zero-shot prompt per language (`TEMPLATES`, e.g. `The opposite of "small" is "`) is completed greedily
with plain forwards of the Hugging Face model (no hooks, no cache); the answer is the text before the closing
quote, and it is right when it equals one of the accepted antonyms (case-folded). Pairs a model gets wrong are
dropped for that model and language, so a later circuit analysis only explains behaviour the model has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from lensflow.tasks.data.antonym_set import (  # noqa: F401 - re-exported: the data part lives in tasks/data
    ANTONYMS_FILE,
    PUNCT,
    QUOTES,
    TEMPLATES,
    AntonymPair,
    Entry,
    answer_of,
    is_right,
    load_antonyms,
    prompt,
)


@torch.no_grad()
def greedy(model, tokenizer, text: str, max_new_tokens: int = 6) -> str:
    """Greedy continuation of `text` by plain full forwards (the prompts are short), decoded."""
    ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        out = tokenizer.decode(ids[0, start:], skip_special_tokens=True)
        if any(q in out for q in (*QUOTES, "\n")):
            break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


@dataclass(frozen=True)
class Survival:
    """Which pairs one model answers right in one language."""

    language: str
    kept: list[str]  # pair ids
    answers: dict[str, str]  # pair id -> the model's answer

    @property
    def n(self) -> int:
        return len(self.kept)


def survival(model, tokenizer, pairs: list[AntonymPair], languages: list[str],
             max_new_tokens: int = 6) -> dict[str, Survival]:
    """{language: the pairs the model answers right}."""
    out = {}
    for lang in languages:
        answers = {p.id: answer_of(greedy(model, tokenizer, prompt(lang, p.entries[lang].word), max_new_tokens))
                   for p in pairs}
        kept = [p.id for p in pairs if is_right(answers[p.id], p.entries[lang])]
        out[lang] = Survival(lang, kept, answers)
    return out


def main() -> None:  # python -m lensflow.tasks.multilingual.antonyms smollm2-135m gemma3-270m
    import sys

    from lensflow.tasks.core.config import ModelConf
    from lensflow.tasks.core.models import load_model

    langs = list(TEMPLATES)
    pairs = load_antonyms(langs)
    for name in sys.argv[1:]:
        lm = load_model(ModelConf(name=name))
        res = survival(lm.model, lm.tokenizer, pairs, langs)
        print(json.dumps({"model": name, "pairs": len(pairs), "kept": {l: r.n for l, r in res.items()},
                          "answers": {l: r.answers for l, r in res.items()}}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
