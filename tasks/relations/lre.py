"""Linear relational embeddings (Hernandez et al., ICLR 2024): how well one affine map, fitted from a few Jacobians,
stands for the model's whole computation from a subject to its object.

Per relation and resid layer l: for each of n training samples (its prompt preceded by the other n - 1 as in-context
demos) linearise F (subject's last-token state at l -> last-layer state at the last token) there; the LRE is
W = mean J, b = mean (F(s) - J s), applied as beta W s + b and decoded through the model's own final norm and
unembedding. Scored on held-out subjects the model answers right:
  faithfulness  the LRE's top-1 token equals the model's own;
  causality     s + pinv_r(beta W)(z' - z), z' the last-layer state of another subject with another object, makes
                the model answer that object.
Beside it the baselines: logit lens (s decoded directly), translation (s + b) and a linear regression fitted on
the same n (s, z) pairs. beta, rank and layer are chosen on `dev` samples only, never on the test subjects.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from lensflow.tasks.core.hooks import Edit, Read, trace
from lensflow.tasks.core.kv_cache import prefix_cache, repeat_cache
from lensflow.tasks.core.models import LM
from lensflow.tasks.core.stages import Item, Stage, digest
from lensflow.tasks.core.tokens import answer_token
from lensflow.tasks.relations.data import Relation, Sample, Split
from lensflow.tasks.relations.jacobian import Prompt, encode_prompt, jacobian

FAITH_METHODS = ("lre", "logit_lens", "translation", "regression")
CAUSAL_METHODS = ("lre", "regression", "identity")  # identity: the state moved by z' - z itself (W = I)


@dataclass(frozen=True)
class Settings:
    layers: tuple[int, ...]
    betas: tuple[float, ...]
    ranks: tuple[int, ...]
    max_pairs: int
    jacobian_rows: int = 256  # memory only (LreConf.jacobian_rows)

    def key_params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "jacobian_rows"}


@dataclass(frozen=True)
class Fit:
    """One layer's LRE (W, b) and the regression baseline (A, c), all fitted on the same n training samples."""

    W: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor
    c: torch.Tensor

    def lre(self, s: torch.Tensor, beta: float) -> torch.Tensor:
        return beta * s @ self.W.T + self.b

    def regression(self, s: torch.Tensor) -> torch.Tensor:
        return s @ self.A.T + self.c


def demos(rel: Relation, samples: Sequence[Sample]) -> str:
    return "".join(rel.demo(s) + "\n" for s in samples)


def fit_layers(lm: LM, rel: Relation, train: Sequence[Sample], layers: Sequence[int], rows: int) -> dict[int, Fit]:
    """Per layer: the mean Jacobian and mean residual over the training samples, and a min-norm least-squares map
    s -> z on the same samples (the regression baseline)."""
    lins: dict[int, list] = {l: [] for l in layers}
    for i, sample in enumerate(train):
        prompt = encode_prompt(lm.tokenizer, demos(rel, [t for j, t in enumerate(train) if j != i]), rel.template,
                               sample.subject)
        for l in layers:
            lins[l].append(jacobian(lm, prompt, l, rows))
    fits = {}
    for l, ls in lins.items():
        J = torch.stack([x.jacobian for x in ls]).double()
        S = torch.stack([x.s for x in ls]).double()
        Z = torch.stack([x.z for x in ls]).double()
        W = J.mean(0)
        b = (Z - torch.einsum("nij,nj->ni", J, S)).mean(0)
        Sc, Zc = S - S.mean(0), Z - Z.mean(0)
        A = (torch.linalg.pinv(Sc) @ Zc).T
        fits[l] = Fit(W.float(), b.float(), A.float(), (Z.mean(0) - S.mean(0) @ A.T).float())
    return fits


def low_rank_pinv(M: torch.Tensor, rank: int) -> torch.Tensor:
    """The pseudo-inverse of M through its top `rank` singular directions."""
    U, S, Vh = torch.linalg.svd(M.double())
    r = min(rank, int((S > S[0] * 1e-6).sum()))
    return (Vh[:r].T @ torch.diag(1 / S[:r]) @ U[:, :r].T).float()


@dataclass(frozen=True)
class States:
    """Subjects run with the training demos before them: subject states per layer [n, d], last-layer states z,
    the model's top-1 token, the object's token, and whether the model answers right."""

    samples: tuple[Sample, ...]
    prompts: tuple[Prompt, ...]
    s: dict[int, torch.Tensor]
    z: torch.Tensor
    top1: torch.Tensor
    target: torch.Tensor

    @property
    def known(self) -> torch.Tensor:
        return self.top1 == self.target


def _rest_batch(lm: LM, prompts: Sequence[Prompt], start: int):
    """Token ids after `start` (the shared prefix) right-padded, their attention mask (prefix included), and each
    row's last and subject-last positions relative to `start`."""
    rests = [list(p.ids[start:]) for p in prompts]
    width = max(map(len, rests))
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rests], device=lm.device)
    mask = torch.tensor([[1] * (start + len(r)) + [0] * (width - len(r)) for r in rests], device=lm.device)
    last = torch.tensor([len(r) - 1 for r in rests], device=lm.device)
    subj = torch.tensor([p.subject_last - start for p in prompts], device=lm.device)
    return ids, mask, last, subj


@torch.no_grad()
def run_states(lm: LM, rel: Relation, prefix: str, samples: Sequence[Sample], layers: Sequence[int]) -> States:
    prompts = [encode_prompt(lm.tokenizer, prefix, rel.template, s.subject) for s in samples]
    start = len(lm.tokenizer(prefix)["input_ids"]) if prefix else 0
    ids, mask, last, subj = _rest_batch(lm, prompts, start)
    reads = [Read("resid", l, position=subj) for l in layers] + [Read("resid", lm.n_layers, position=last)]
    cache = prefix_cache(lm, prompts[0].ids[:start])
    with trace(lm, reads=reads) as t:
        lm.base(input_ids=ids, attention_mask=mask, past_key_values=repeat_cache(cache, len(prompts)),
                use_cache=cache is not None)
    z = t["resid", lm.n_layers].float()
    targets = [answer_token(lm.tokenizer, rel.prompt(s.subject), " " + s.object) for s in samples]
    return States(tuple(samples), tuple(prompts), {l: t["resid", l].float() for l in layers}, z,
                  lm.decode(z.to(lm.dtype)).argmax(-1), torch.tensor(targets, device=z.device))


def top1(lm: LM, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.decode(z.to(lm.device, lm.dtype)).argmax(-1)


def faithfulness(lm: LM, st: States, layer: int, fit: Fit, beta: float) -> dict[str, float]:
    """Share of the subjects the model answers right whose top-1 token each method reproduces."""
    k = st.known
    if not k.any():
        return {m: float("nan") for m in FAITH_METHODS}
    s, want = st.s[layer][k], st.top1[k]
    outs = {"lre": fit.lre(s, beta), "logit_lens": s, "translation": s + fit.b.to(s), "regression": fit.regression(s)}
    return {m: (top1(lm, z) == want).float().mean().item() for m, z in outs.items()}


def pairs(st: States, max_pairs: int) -> list[tuple[int, int]]:
    """(i, j): subjects the model answers right, j's object token differs from i's; each i once, j the next such."""
    known = [i for i in range(len(st.samples)) if st.known[i]]
    out = []
    for a, i in enumerate(known):
        for j in known[a + 1:] + known[:a]:
            if st.target[j] != st.target[i]:
                out.append((i, j))
                break
        if len(out) >= max_pairs:
            break
    return out


@torch.no_grad()
def flips(lm: LM, rel: Relation, prefix: str, st: States, layer: int, pp: list[tuple[int, int]],
          inverse: torch.Tensor | None) -> float:
    """Share of pairs whose answer becomes the other object when s_i moves by inverse (z_j - z_i) at `layer`."""
    if not pp:
        return float("nan")
    i, j = (torch.tensor(x) for x in zip(*pp))
    dz = st.z[j] - st.z[i]
    delta = dz if inverse is None else dz @ inverse.T.to(dz)
    prompts = [st.prompts[a] for a in i.tolist()]
    start = len(lm.tokenizer(prefix)["input_ids"]) if prefix else 0
    ids, mask, last, subj = _rest_batch(lm, prompts, start)
    cache = prefix_cache(lm, prompts[0].ids[:start])
    with trace(lm, reads=[Read("resid", lm.n_layers, position=last)],
               edits=[Edit("resid", layer, delta.to(lm.dtype), position=subj, mode="add")]) as t:
        lm.base(input_ids=ids, attention_mask=mask, past_key_values=repeat_cache(cache, len(prompts)),
                use_cache=cache is not None)
    return (top1(lm, t["resid", lm.n_layers]) == st.target[j].to(lm.device)).float().mean().item()


def causality(lm: LM, rel: Relation, prefix: str, st: States, layer: int, fit: Fit, beta: float, rank: int,
              max_pairs: int) -> dict[str, float]:
    pp = pairs(st, max_pairs)
    return {"lre": flips(lm, rel, prefix, st, layer, pp, low_rank_pinv(beta * fit.W, rank)),
            "regression": flips(lm, rel, prefix, st, layer, pp, low_rank_pinv(fit.A, rank)),
            "identity": flips(lm, rel, prefix, st, layer, pp, None)}


def _or(x: float, default: float) -> float:
    return default if math.isnan(x) else x


def _best(scores: dict, default):
    """The key with the highest finite score (first listed on ties), else `default`."""
    finite = {k: v for k, v in scores.items() if not (isinstance(v, float) and math.isnan(v))}
    return max(finite, key=finite.get) if finite else default


@dataclass(frozen=True)
class Choice:
    """Hyperparameters chosen on dev samples: beta and rank per layer, then the layer."""

    beta: dict[int, float]
    rank: dict[int, int]
    layer: int
    dev_faithfulness: dict[int, float]
    dev_causality: dict[int, float]


def choose(lm: LM, rel: Relation, prefix: str, dev: States, fits: dict[int, Fit], st: Settings) -> Choice:
    """Everything here sees only the dev states: test subjects cannot move a choice."""
    beta, rank, dev_f, dev_c = {}, {}, {}, {}
    for l, fit in fits.items():
        by_beta = {b: faithfulness(lm, dev, l, fit, b)["lre"] for b in st.betas}
        beta[l] = _best(by_beta, st.betas[0])
        dev_f[l] = by_beta[beta[l]]
        pp = pairs(dev, st.max_pairs)
        by_rank = {r: flips(lm, rel, prefix, dev, l, pp, low_rank_pinv(beta[l] * fit.W, r)) for r in st.ranks}
        rank[l] = _best(by_rank, st.ranks[0])
        dev_c[l] = by_rank[rank[l]]
    layer = _best({l: (_or(dev_f[l], -1.0), _or(dev_c[l], -1.0)) for l in fits}, next(iter(fits)))
    return Choice(beta, rank, layer, dev_f, dev_c)


@dataclass
class RelationResult:
    """One relation's scores. Per layer (the order of `layers`): test faithfulness and causality per method at the
    dev-chosen beta and rank; the headline is the dev-chosen layer's."""

    name: str
    kind: str
    layers: list[int]
    n_train: int
    n_dev_known: int
    n_test: int
    n_test_known: int
    faithfulness: dict[str, list[float]]
    causality: dict[str, list[float]]
    beta: list[float]
    rank: list[int]
    layer: int
    dev_faithfulness: list[float]
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def at_layer(self, table: dict[str, list[float]], method: str = "lre") -> float:
        return table[method][self.layers.index(self.layer)]


def evaluate(lm: LM, rel: Relation, sp: Split, fits: dict[int, Fit], st: Settings) -> RelationResult:
    layers = list(fits)
    prefix = demos(rel, sp.train)
    dev = run_states(lm, rel, prefix, sp.dev, layers)
    test = run_states(lm, rel, prefix, sp.test, layers)
    ch = choose(lm, rel, prefix, dev, fits, st)
    faith = {m: [] for m in FAITH_METHODS}
    caus = {m: [] for m in CAUSAL_METHODS}
    for l in layers:
        for m, v in faithfulness(lm, test, l, fits[l], ch.beta[l]).items():
            faith[m].append(v)
        for m, v in causality(lm, rel, prefix, test, l, fits[l], ch.beta[l], ch.rank[l], st.max_pairs).items():
            caus[m].append(v)
    return RelationResult(rel.name, rel.kind, layers, len(sp.train), int(dev.known.sum()), len(sp.test),
                          int(test.known.sum()), faith, caus, [ch.beta[l] for l in layers],
                          [ch.rank[l] for l in layers], ch.layer, [ch.dev_faithfulness[l] for l in layers])


# ---------------------------------------------------------------- actor-side stage work


@dataclass(frozen=True)
class RelationJob:
    stage: Stage
    relation: Relation
    split: Split
    settings: Settings

    @property
    def key(self) -> str:
        """Names the relation's item by its content (template and split), so renaming a file reuses nothing wrong."""
        texts = [self.relation.name, self.relation.template]
        texts += [f"{s.subject}\x01{s.object}" for part in (self.split.train, self.split.dev, self.split.test)
                  for s in part] + ["|"]
        return digest(texts)[:16]


def relation_job(lm: LM, job: RelationJob) -> tuple[RelationResult, bool]:
    """One relation fitted and scored, found under the stage or computed and published (W, b per layer kept)."""

    def compute() -> Item:
        t0 = time.perf_counter()
        fits = fit_layers(lm, job.relation, job.split.train, job.settings.layers, job.settings.jacobian_rows)
        res = evaluate(lm, job.relation, job.split, fits, job.settings)
        res.wall_s = time.perf_counter() - t0
        tensors = {f"{k}.{l}": getattr(f, k) for l, f in fits.items() for k in ("W", "b")}
        return Item(tensors, {"result": asdict(res)})

    item, computed = job.stage.get_or_compute(job.key, compute)
    return RelationResult(**item.meta["result"]), computed
