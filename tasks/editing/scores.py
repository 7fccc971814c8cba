"""CounterFact's scores (Meng et al. 2022), each a fraction in [0, 1]:
  efficacy     the new object beats the true one on the edit prompt (mean per-token log-likelihood);
  paraphrase   the same on the paraphrases;
  specificity  neighbourhood prompts (other subjects whose answer is the true object) keep the true object;
  fluency      the weighted bi- and tri-gram entropy of greedy generations from the edit prompt (the paper's
               2/3, 4/3 weights), each n-gram entropy divided by its maximum, log2(number of n-grams), so 1 means
               no n-gram repeats and repetitive, degenerate text scores low.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lensflow.tasks.core.models import LM
from lensflow.tasks.editing.requests import Request
from lensflow.tasks.editing.rome import _batch, target_ids

SCORES = ("efficacy", "paraphrase", "specificity", "fluency")


@torch.no_grad()
def mean_logprobs(lm: LM, pairs: Sequence[tuple[str, str]], batch: int = 64) -> list[float]:
    """Mean per-token log-probability of each (prompt, continuation)."""
    out = []
    for i in range(0, len(pairs), batch):
        rows, spans = [], []
        for prompt, cont in pairs[i:i + batch]:
            p = lm.tokenizer(prompt)["input_ids"]
            t = target_ids(lm.tokenizer, prompt, cont)
            rows.append(p + t)
            spans.append((len(p) - 1, t))
        ids, mask = _batch(lm, rows)
        logp = lm.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1).cpu()
        out += [logp[j, s + torch.arange(len(t)), torch.tensor(t)].mean().item() for j, (s, t) in enumerate(spans)]
    return out


def ngram_entropy(text: str, weights: dict[int, float] = {2: 2 / 3, 3: 4 / 3}) -> float:  # noqa: B006
    """The paper's weighted n-gram entropy, each n normalised by its maximum: in [0, 1]."""
    words = text.split()
    total, wsum = 0.0, 0.0
    for n, w in weights.items():
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        h = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += w * (h / math.log2(count) if count > 1 else 0.0)
        wsum += w
    return total / wsum


@torch.no_grad()
def generate(lm: LM, prompt: str, tokens: int) -> str:
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device=lm.device)
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                            do_sample=False, use_cache=True, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@dataclass(frozen=True)
class Scores:
    """Means over requests (fluency over the generations made)."""

    efficacy: float
    paraphrase: float
    specificity: float
    fluency: float
    n_requests: int
    samples: tuple[str, ...] = ()  # a few generations, for people

    def metrics(self) -> dict[str, float]:
        return {s: getattr(self, s) for s in SCORES}


def score(lm: LM, requests: Sequence[Request], fluency_prompts: int, fluency_tokens: int) -> Scores:
    """Scores of the model as it is now (edited or not) on `requests`."""
    pairs, index = [], []
    for r in requests:
        groups = {"edit": [r.prompt], "paraphrase": list(r.paraphrases), "neighborhood": list(r.neighborhood)}
        for g, prompts in groups.items():
            for p in prompts:
                index.append((g, len(pairs)))
                pairs += [(p, r.target_true), (p, r.target_new)]
    lp = mean_logprobs(lm, pairs)
    per: dict[str, list[list[float]]] = {"edit": [], "paraphrase": [], "neighborhood": []}
    pos = 0
    for r in requests:
        counts = {"edit": 1, "paraphrase": len(r.paraphrases), "neighborhood": len(r.neighborhood)}
        for g, n in counts.items():
            got = []
            for _ in range(n):
                true, new = lp[2 * pos], lp[2 * pos + 1]
                got.append(float(new > true) if g != "neighborhood" else float(true > new))
                pos += 1
            per[g].append(got)

    def mean_of_means(rows: list[list[float]]) -> float:
        rows = [sum(x) / len(x) for x in rows if x]
        return sum(rows) / len(rows) if rows else float("nan")

    texts = [generate(lm, r.prompt, fluency_tokens) for r in requests[:fluency_prompts]]
    fluency = sum(map(ngram_entropy, texts)) / len(texts) if texts else float("nan")
    return Scores(mean_of_means(per["edit"]), mean_of_means(per["paraphrase"]), mean_of_means(per["neighborhood"]),
                  fluency, len(requests), tuple(texts[:3]))
