"""Sparse autoencoders over residual-stream activations: the feature basis of the multilingual analysis.

Two sparsity mechanisms, chosen in config:
  topk  z = ReLU(TopK_k(W_enc (x - b_dec) + b_enc))       (Gao et al. 2024): L0 <= k by construction, no L1 to tune
  relu  z = ReLU(W_enc (x - b_dec) + b_enc), loss + l1 * sum(z)   (Bricken et al. 2023)
Decoder rows are kept at unit norm after every step, so an L1 penalty cannot be dodged by shrinking codes and
growing the decoder. Inputs are divided by one scalar per layer (fitted on the first batch) so that the mean
squared norm per dimension is 1: residual norms grow a lot with depth, and one learning rate then fits every layer.
The scalar is part of the saved state; reconstructions come back in the original units.

Training streams zarr stores block by block (`Activations.iter_layer`), never holding a layer in memory:
all tokens of every training prompt are samples, padding (token_ids = -1) is dropped, and the first token of each
prompt can be dropped too (the BOS / attention-sink position has a norm tens of times the rest and would dominate
the MSE). The last `holdout` fraction of general prompts is kept out of training for the fraction of variance
explained. Beside the general (English) text, each compared language's training paragraphs are mixed in at a fixed
share of every batch (`mixed_blocks`): on SmolLM2's resid layer 27 an SAE trained on the built-in text alone (Python's
documentation) explained 0.25 of the variance of unseen English paragraphs of the parallel corpus and less than
nothing of French, Spanish or German ones, so its "features" there were mostly noise.
Each layer's SAE is a stage item (`sae_stage`, item `layer_XX`), published as soon as that layer has trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from lensflow.tasks.core.dictionaries.autoencoder import SparseAutoencoder
from lensflow.tasks.core.dictionaries.saelens import import_sae
from lensflow.tasks.core.stages import Item, Stage, digest
from lensflow.tasks.core.store import Activations

if TYPE_CHECKING:
    from lensflow.tasks.multilingual.config import MultilingualConf

VERSION = 4  # of the saved state and the training code: part of the SAE stage key, so old SAEs are never misread


def loss_terms(sae: SparseAutoencoder, x: torch.Tensor, l1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, reconstruction MSE), both in the normalised input space (MSE per dimension)."""
    x_hat, z = sae(x)
    mse = (x_hat - x).div(sae.scale).pow(2).mean()
    if sae.activation == "relu" and l1 > 0:
        return mse + l1 * z.sum(-1).mean(), mse
    return mse, mse


def token_mask(token_ids: np.ndarray, skip_first: bool) -> np.ndarray:
    """bool [rows, T]: real tokens (token id != -1), minus position 0 when skip_first."""
    mask = np.asarray(token_ids) >= 0
    if skip_first:
        mask = mask.copy()
        mask[:, 0] = False
    return mask


def token_blocks(acts: Activations, layer: int, rows: slice, batch_rows: int, skip_first: bool,
                 site: str = "resid") -> Iterator[np.ndarray]:
    """Stream [tokens, d] float32 blocks of one layer (a block for mlp_in / mlp_out): real tokens of each prompt in
    `rows`, padding dropped."""
    start = rows.start or 0
    for block in acts.iter_layer(layer, batch_rows, rows=rows, site=site):
        ids = acts.token_ids[start:start + block.shape[0]]
        yield block[token_mask(ids, skip_first)]
        start += block.shape[0]


def mixed_blocks(streams: list[Callable[[], Iterator[np.ndarray]]], shares: list[float],
                 block_tokens: int) -> Iterator[np.ndarray]:
    """Endless [~block_tokens, d] blocks drawing `shares[i]` of their tokens from stream i (a zero-argument callable
    giving one pass over that source), each stream restarted at its end: a small corpus in another language is
    repeated to its share instead of being drowned by the general text. Deterministic, so a resumed layer trains
    on exactly what a clean run's does."""
    total = sum(shares)
    live = [(make, share / total) for make, share in zip(streams, shares) if share > 0]
    if not live:
        raise ValueError("SAE training has no source with a positive share")
    iters = [make() for make, _ in live]
    bufs: list[list[np.ndarray]] = [[] for _ in live]
    owed = [0.0] * len(live)

    def take(i: int, n: int) -> np.ndarray:
        have, fresh = sum(len(b) for b in bufs[i]), False
        while have < n:
            block = next(iters[i], None)
            if block is None:
                if fresh:
                    raise ValueError("SAE training data is empty (a training source has no tokens)")
                iters[i], fresh = live[i][0](), True
                continue
            if len(block):
                bufs[i].append(block)
                have, fresh = have + len(block), False
        rows = np.concatenate(bufs[i]) if bufs[i] else np.empty((0, 0), np.float32)
        bufs[i] = [rows[n:]]
        return rows[:n]

    while True:
        parts = []
        for i, (_, share) in enumerate(live):
            owed[i] += share * block_tokens
            n = int(owed[i])
            owed[i] -= n
            if n:
                parts.append(take(i, n))
        yield np.concatenate(parts)


@dataclass
class TrainSpec:
    """The training settings of one SAE (their defaults: multilingual.sae.* and multilingual.seed)."""

    steps: int
    batch_tokens: int
    lr: float
    l1: float
    seed: int


def train(sae: SparseAutoencoder, blocks, spec: TrainSpec) -> list[float]:
    """Adam on shuffled token batches; `blocks` is a zero-argument callable returning a fresh block iterator
    (one pass over the data), restarted until `spec.steps` steps are done. Returns the per-step loss."""
    gen = torch.Generator().manual_seed(spec.seed)
    device = sae.W_dec.device
    opt = torch.optim.Adam(sae.parameters(), lr=spec.lr, betas=(0.9, 0.999))
    losses: list[float] = []
    fitted = False
    carry = torch.empty(0, device=device)
    while len(losses) < spec.steps:
        tokens = 0
        for block in blocks():
            tokens += block.shape[0]
            block = torch.from_numpy(block).to(device)
            x = torch.cat([carry, block]) if carry.numel() else block
            if not fitted:
                sae.fit_input(x)
                fitted = True
            x = x[torch.randperm(x.shape[0], generator=gen).to(device)]
            n_full = x.shape[0] // spec.batch_tokens
            for i in range(n_full):
                batch = x[i * spec.batch_tokens:(i + 1) * spec.batch_tokens]
                loss, _ = loss_terms(sae, batch, spec.l1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sae.normalize_decoder()
                losses.append(loss.item())
                if len(losses) >= spec.steps:
                    return losses
            carry = x[n_full * spec.batch_tokens:]
        if tokens == 0:
            raise ValueError("SAE training data is empty (no tokens in the training rows)")
        if not losses and carry.shape[0] > 0:  # less data than one batch: train on what there is
            spec = TrainSpec(**{**spec.__dict__, "batch_tokens": carry.shape[0]})
    return losses


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, blocks: Iterator[np.ndarray]) -> dict[str, float]:
    """Fraction of variance explained, 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over all tokens, plus mean L0
    (active features per token) and the fraction of features that never fire. Accumulated in float64 so it streams."""
    sse = sum_x2 = 0.0
    sum_vec: torch.Tensor | None = None
    n = 0
    l0 = 0.0
    device = sae.W_dec.device
    fired = torch.zeros(sae.width, dtype=torch.bool, device=device)
    for block in blocks:
        x = torch.from_numpy(block).to(device)
        if x.shape[0] == 0:
            continue
        x_hat, z = sae(x)
        xd = x.double()
        sse += float((x_hat.double() - xd).pow(2).sum())
        sum_x2 += float(xd.pow(2).sum())
        s = xd.sum(0)
        sum_vec = s if sum_vec is None else sum_vec + s
        n += x.shape[0]
        active = z > 0
        l0 += float(active.sum())
        fired |= active.any(0)
    if n == 0:
        raise ValueError("no held-out tokens to evaluate the SAE on")
    total_var = sum_x2 - float(sum_vec.pow(2).sum()) / n
    return {"fve": 1.0 - sse / total_var, "l0": l0 / n, "mse": sse / n, "dead": 1.0 - float(fired.float().mean()),
            "tokens": float(n)}


SAE_PARAMS = ("activation", "expansion", "k", "l1", "steps", "batch_tokens", "lr", "holdout", "general_share")
BLOCK_BATCHES = 4  # training batches per mixed block: the unit shuffled, so every batch mixes every source


def sae_stage(root: str, general_key: str, sc: MultilingualConf.SAE, skip_first: bool, seed: int,
              language_keys: Mapping[str, str] | None = None) -> Stage:
    """Where the per-layer SAEs live: keyed by the general-text store (model, texts, layers), each language's
    training-paragraph store ({lang: store key}) and every setting that changes a trained SAE; one item
    `layer_XX` per resid layer."""
    language_keys = dict(language_keys or {})
    params = {**{p: getattr(sc, p) for p in SAE_PARAMS}, "skip_first": skip_first, "seed": seed,
              "languages": list(language_keys)}
    if sc.pretrained is not None:  # keyed only when set, so trained SAEs keep the keys they had
        params["pretrained"] = str(sc.pretrained)
    return Stage.of(root, "multilingual/sae", None, params, inputs=[general_key, *language_keys.values()],
                    version=VERSION)


@dataclass(frozen=True)
class SAEMetrics:
    """Held-out quality of one SAE on general text (`evaluate`)."""

    fve: float
    l0: float
    dead: float
    mse: float
    tokens: float


@dataclass(frozen=True)
class SAEJob:
    """One layer's SAE: train on general-store rows [0, n_train) mixed with every language's training paragraphs,
    evaluate on the held-out general rows, publish it as item `layer_XX`."""

    stage: Stage
    url: str  # general-text store, positions=all
    layer: int
    width: int
    activation: str
    k: int
    spec: TrainSpec
    holdout: float
    skip_first: bool
    languages: dict[str, str] = field(default_factory=dict)  # language -> store URL of its training paragraphs
    general_share: float = 1.0  # of training tokens; the rest is split equally among `languages`
    pretrained: str | None = None  # SAELens-layout folder with `layer_LL` subfolders: imported, not trained

    @property
    def item(self) -> str:
        return f"layer_{self.layer:02d}"


@dataclass
class TrainedSAE:
    layer: int
    sae: SparseAutoencoder
    metrics: SAEMetrics
    trained: bool  # by this call; False = found in the store


def train_sae(job: SAEJob) -> TrainedSAE:
    """Ray remote body: the layer's SAE from the store, or trained and published there the moment it is done, so a
    run killed mid-way keeps every finished layer."""
    item, computed = job.stage.get_or_compute(job.item, lambda: _train(job))
    sae = SparseAutoencoder.from_state(item.tensors).to(_device())
    return TrainedSAE(job.layer, sae, SAEMetrics(**item.meta["metrics"]), computed)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # a GPU when the Ray remote call was given one


def training_sources(job: SAEJob) -> dict[str, tuple[Activations, slice, float]]:
    """{source: (store, training rows, share of training tokens)}: the general text's first (1 - holdout) of
    prompts, then each language's training paragraphs (every row), the languages sharing 1 - general_share
    equally (the general text takes everything when there are none)."""
    general = Activations(job.url)
    n_train = max(1, min(general.n - 1, int(round(general.n * (1 - job.holdout)))))
    langs = {lang: Activations(url) for lang, url in job.languages.items()}
    out = {"general": (general, slice(0, n_train), job.general_share if langs else 1.0)}
    out.update({lang: (a, slice(0, a.n), (1 - job.general_share) / len(langs)) for lang, a in langs.items()})
    return out


def _train(job: SAEJob) -> Item:
    sources = training_sources(job)
    acts, rows, _ = sources["general"]
    if job.pretrained is not None:  # a user's dictionary: measured on the held-out text like a trained one
        sae = import_sae(f"{job.pretrained}/{job.item}").to(_device())
        held = slice(rows.stop, acts.n)
        metrics = evaluate(sae, token_blocks(acts, job.layer, held, acts.chunk_rows, job.skip_first))
        params = {"layer": job.layer, "width": sae.width, "activation": sae.activation, "k": sae.k,
                  "pretrained": job.pretrained}
        return Item(sae.state(), {"metrics": metrics, "losses": [], "params": params, "trained_on": {}})
    sae = SparseAutoencoder(acts.d_model, job.width, job.activation, job.k, seed=job.spec.seed + job.layer)
    sae = sae.to(_device())
    streams = [lambda a=a, r=r: token_blocks(a, job.layer, r, a.chunk_rows, job.skip_first)
               for a, r, _ in sources.values()]
    shares = [share for _, _, share in sources.values()]
    block = BLOCK_BATCHES * job.spec.batch_tokens
    losses = train(sae, lambda: mixed_blocks(streams, shares, block), job.spec)
    held = slice(rows.stop, acts.n)
    metrics = evaluate(sae, token_blocks(acts, job.layer, held, acts.chunk_rows, job.skip_first))
    trained_on = {name: {"texts": digest(a.texts()[r]), "tokens": int(token_mask(a.token_ids[r], job.skip_first).sum()),
                         "share": share} for name, (a, r, share) in sources.items()}
    params = {"layer": job.layer, "width": job.width, "activation": job.activation, "k": job.k, **job.spec.__dict__,
              "holdout": job.holdout, "skip_first": job.skip_first, "general_share": job.general_share,
              **{f"train_tokens.{n}": v["tokens"] for n, v in trained_on.items()}}
    return Item(sae.state(), {"metrics": metrics, "losses": losses, "params": params, "trained_on": trained_on})
