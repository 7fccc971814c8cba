"""n-gram baselines for Future Lens: what token statistics alone predict, with no hidden state at all.

Context at future offset N (the tokens a teacher-forced causal lens also sees, nothing from the hidden state):
  N=0: bigram from x_T (the prefix's last token)
  N=1: bigram from g_0 (the paper's bigram baseline: T+2 from T+1)
  N=2: trigram from (g_0, g_1);  N=3: 4-gram from (g_0, g_1, g_2)
i.e. order max(2, N+1) (capped by `order`) over the sequence x_<=T, g_0..g_{N-1}. Counts come from the
training texts only. Probabilities are Witten-Bell interpolated down to an add-one unigram, so every token
has a finite surprisal and unseen contexts back off instead of failing.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch


class NGram:
    def __init__(self, order: int, vocab_size: int):
        self.order, self.vocab_size = order, vocab_size
        self.next: list[dict[tuple[int, ...], Counter]] = [defaultdict(Counter) for _ in range(order)]
        self.unigram = np.zeros(vocab_size, dtype=np.float64)

    def fit(self, sequences: list[list[int]]) -> NGram:
        for seq in sequences:
            for i, w in enumerate(seq):
                self.unigram[w] += 1
                for k in range(1, self.order):  # context length k
                    if i >= k:
                        self.next[k][tuple(seq[i - k : i])][w] += 1
        return self

    def probs(self, context: tuple[int, ...]) -> np.ndarray:
        """p(w | last len(context) tokens), Witten-Bell interpolated with every shorter context."""
        p = (self.unigram + 1.0) / (self.unigram.sum() + self.vocab_size)
        context = context[-(self.order - 1):] if self.order > 1 else ()
        for k in range(1, len(context) + 1):
            counts = self.next[k].get(tuple(context[-k:]))
            if not counts:
                continue
            total, types = sum(counts.values()), len(counts)
            p = p * (types / (total + types))
            ids = np.fromiter(counts.keys(), dtype=np.int64)
            p[ids] += np.fromiter(counts.values(), dtype=np.float64) / (total + types)
        return p


def context_for(x_last: int, greedy: list[int], n: int, order: int) -> tuple[int, ...]:
    seq = [x_last, *greedy[:n]]
    k = min(max(1, n), order - 1)
    return tuple(seq[-k:])


def ngram_logits(model: NGram, x_last: np.ndarray, greedy: np.ndarray, n: int) -> torch.Tensor:
    """[samples, vocab] log-probabilities of the token at offset n."""
    rows = [np.log(model.probs(context_for(int(x), [int(t) for t in g], n, model.order))) for x, g in zip(x_last, greedy)]
    return torch.from_numpy(np.stack(rows)).float()
