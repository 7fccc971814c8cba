"""Future Lens (Pal et al., CoNLL 2023): how much of the tokens at T+1..T+N+1 one hidden state at T encodes.

A sample is a prefix of natural text whose last token is T; the hidden states of T (every layer) are the
input and the model's own greedy continuation g_0..g_3 the targets for N = 0..3 (g_0 is the next token).
Only prefixes where the model predicts the true next token are kept (the paper's filter), so at N=0 the
greedy token and the text agree. Every method is scored against the model's own continuation.

This module holds the data preparation (model side, run on the Ray actors), the metrics and the two linear
probes; the causal (transplant) methods live in tasks/soft_prompt.py and the n-gram baseline in tasks/ngram.py.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lensflow.tasks.config import FutureLensConf
from lensflow.tasks.hooks import Read, trace
from lensflow.tasks.models import LM
from lensflow.tasks.tracking import RunRef

METHODS = ("bigram", "linear_vocab", "linear_hidden", "fixed_prompt", "soft_prompt")
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Window:
    text_id: int
    prefix_ids: tuple[int, ...]  # tokens x_0..x_T of the text
    next_id: int  # the text's token T+1


@torch.inference_mode()
def scan_texts(lm: LM, item: tuple[list[str], int, int]) -> list[dict]:
    """One batched forward pass over whole texts finds every position T where the model's greedy next token
    is the text's own (the paper's filter) at once, instead of one forward per candidate prefix; also returns
    the texts' tokens. item: (texts, max_tokens, min_prefix_tokens)."""
    texts, max_tokens, min_prefix = item
    enc = lm.encode(texts, max_tokens=max_tokens + 1)  # right padded: causal positions see no padding
    with trace(lm, reads=[Read("resid", lm.n_layers)]) as t:
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    h = t["resid", lm.n_layers]
    out = []
    for row, length in enumerate(enc["attention_mask"].sum(1).tolist()):
        ids = enc["input_ids"][row, :length].tolist()
        pred = lm.decode(h[row, : length - 1]).argmax(-1).cpu() if length > 1 else torch.zeros(0, dtype=torch.long)
        ok = (pred == torch.tensor(ids[1:], dtype=torch.long)).nonzero().flatten().tolist()
        out.append({"ids": ids, "positions": [p for p in ok if min_prefix - 1 <= p < max_tokens]})
    return out


def candidate_windows(scans: list[dict], text_offset: int = 0) -> list[Window]:
    return [Window(text_offset + tid, tuple(sc["ids"][: p + 1]), sc["ids"][p + 1])
            for tid, sc in enumerate(scans) for p in sc["positions"]]


@dataclass(frozen=True)
class PrepItem:
    windows: list[Window]
    max_tokens: int
    n_future: int = 4


@torch.inference_mode()
def prepare_windows(lm: LM, item: PrepItem) -> dict[str, np.ndarray]:
    """Model side of the data, for chosen samples: the prefix text, the model's greedy continuation (n_future
    tokens, KV cache), the pre-norm final-layer states at T..T+n_future-1 (targets of the linear
    approximation and, decoded, the model's own distributions), and keep = the prefix text re-tokenizes to
    the same tokens (what the extraction will see: lm.encode, max_tokens) and the greedy next token is the
    text's. The states are recomputed from the prefix alone, exactly as the extraction computes them."""
    tok = lm.tokenizer
    prefixes = [tok.decode(list(w.prefix_ids), skip_special_tokens=True) for w in item.windows]
    enc = lm.encode(prefixes, max_tokens=item.max_tokens)
    ids, mask, last = enc["input_ids"], enc["attention_mask"], enc["last"]
    same = torch.tensor([tuple(ids[i, : int(last[i]) + 1].tolist()) == w.prefix_ids for i, w in enumerate(item.windows)])
    nxt = torch.tensor([w.next_id for w in item.windows])
    n, steps = lm.n_layers, item.n_future
    b = ids.shape[0]
    finals, greedy = [], []
    with trace(lm, reads=[Read("resid", n, position=last)]) as t:
        out = lm.base(input_ids=ids, attention_mask=mask, use_cache=True)
    past, h = out.past_key_values, t["resid", n]
    for k in range(steps):
        finals.append(h.float())
        g = lm.decode(h).argmax(-1)
        greedy.append(g)
        if k == steps - 1:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=mask.device)], 1)
        with trace(lm, reads=[Read("resid", n, position=0)]) as t:
            out = lm.base(input_ids=g[:, None], attention_mask=mask, past_key_values=past, position_ids=(last + 1 + k)[:, None],
                          use_cache=True)
        past, h = out.past_key_values, t["resid", n]
    greedy_t = torch.stack(greedy, 1).cpu()
    return {
        "keep": (same & (greedy_t[:, 0] == nxt)).numpy(),
        "greedy": greedy_t.numpy().astype(np.int64),
        "final": torch.stack(finals, 1).cpu().numpy().astype(np.float32),
        "x_last": ids[torch.arange(b), last].cpu().numpy().astype(np.int64),
        "prefix": np.array(prefixes, dtype=object),
    }


def tokenize_texts(lm: LM, texts: list[str]) -> list[list[int]]:
    """Token ids of whole texts, for the n-gram counts (tokenizer lives with the model)."""
    return [list(x) for x in lm.tokenizer(texts, add_special_tokens=False)["input_ids"]]


# --------------------------------------------------------------------------------------------- metrics


def score(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Precision@k (target among the k highest logits; ties count against the target) and mean surprisal
    in bits, -log2 p(target), of the normalised distribution."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    tgt = targets.long().view(-1, 1)
    lt = logits.gather(1, tgt)
    rank = (logits > lt).sum(1)  # 0 = top-1
    out = {f"p_at_{k}": float((rank < k).float().mean()) for k in ks}
    out["surprisal"] = float((-logp.gather(1, tgt).squeeze(1) / LN2).mean())
    return out


def prefixed(method: str, metrics: dict[str, float], n: int) -> dict[str, float]:
    """MLflow names the dashboards read: future_lens.<method>.<metric>.n<N> (step = source layer)."""
    return {f"future_lens.{method}.{k}.n{n}": v for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------- linear approximation


@dataclass
class RidgeStats:
    """Sufficient statistics of a multi-output least-squares fit, accumulated over streamed row blocks
    (float64), so the fit is exact whatever the sample count and never needs all rows in memory."""

    n: int = 0
    sh: torch.Tensor | None = None
    sy: torch.Tensor | None = None
    hh: torch.Tensor | None = None
    hy: torch.Tensor | None = None
    yy: torch.Tensor | None = None  # per output dimension

    def add(self, h: torch.Tensor, y: torch.Tensor) -> None:
        h, y = h.double(), y.double()
        if self.hh is None:
            self.sh, self.sy = h.new_zeros(h.shape[1]), y.new_zeros(y.shape[1])
            self.hh, self.hy = h.new_zeros(h.shape[1], h.shape[1]), h.new_zeros(h.shape[1], y.shape[1])
            self.yy = y.new_zeros(y.shape[1])
        self.n += h.shape[0]
        self.sh += h.sum(0)
        self.sy += y.sum(0)
        self.hh += h.T @ h
        self.hy += h.T @ y
        self.yy += (y * y).sum(0)

    def merge(self, other: RidgeStats) -> RidgeStats:
        out = RidgeStats(self.n + other.n)
        for name in ("sh", "sy", "hh", "hy", "yy"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def centred(self, mh: torch.Tensor, my: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gram matrices of h - mh, y - my (means of some other set, e.g. the fitting rows)."""
        n, sh, sy = self.n, self.sh, self.sy
        hh = self.hh - torch.outer(sh, mh) - torch.outer(mh, sh) + n * torch.outer(mh, mh)
        hy = self.hy - torch.outer(sh, my) - torch.outer(mh, sy) + n * torch.outer(mh, my)
        yy = self.yy - 2 * sy * my + n * my * my
        return hh, hy, yy


def fit_ridge(fit: RidgeStats, val: RidgeStats | None, ridges: list[float], groups: int = 1,
              chosen: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Closed-form ridge y ~ (h - mh) W + my. The penalty is relative (lambda * mean eigenvalue of the Gram
    matrix), so one grid works at every layer whatever the activation scale; it is chosen on `val` by
    squared error computed from statistics alone (one eigendecomposition, every lambda nearly free),
    separately for each of `groups` equal blocks of output columns (one per future offset N: the next
    token's state is far more predictable than later ones and wants far less shrinkage). chosen: one
    penalty per block, no selection (the refit on all training rows)."""
    mh, my = fit.sh / fit.n, fit.sy / fit.n
    hh, hy, _ = fit.centred(mh, my)
    evals, evecs = torch.linalg.eigh(hh)
    evals = evals.clamp_min(0)
    scale = float(evals.mean())
    proj = evecs.T @ hy

    def solve(lam: float) -> torch.Tensor:
        return evecs @ (proj / (evals + lam * scale).unsqueeze(1))

    width = hy.shape[1] // groups
    best = list(chosen) if chosen is not None else [ridges[0]] * groups
    info: dict = {"val_mse": {}}
    if chosen is None and val is not None and val.n and len(ridges) > 1:
        vhh, vhy, vyy = val.centred(mh, my)
        errs = {}
        for lam in ridges:
            w = solve(lam)
            per_col = vyy - 2 * (w * vhy).sum(0) + (w * (vhh @ w)).sum(0)
            errs[lam] = (per_col.view(groups, width).sum(1) / val.n).tolist()
        best = [min(ridges, key=lambda lam: errs[lam][g]) for g in range(groups)]
        info["val_mse"] = {lam: sum(e) for lam, e in errs.items()}
    info["ridge"] = best
    sols = {lam: solve(lam) for lam in set(best)}
    w = torch.cat([sols[lam][:, g * width : (g + 1) * width] for g, lam in enumerate(best)], 1)
    return w.float(), (my - mh @ w).float(), info


def fit_linear_sgd(h: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The gradient recipe for the same map (Adam on squared error, standardised inputs): the benchmark's
    baseline against the closed form."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = h.mean(0), h.std(0).clamp_min(1e-6)
    x = (h - mu) / sd
    d_in, d_out = h.shape[1], y.shape[1]
    w = torch.zeros(d_in, d_out, requires_grad=True)
    b = y.mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, h.shape[0], (min(batch, h.shape[0]),), generator=g)
        loss = ((x[idx] @ w + b - y[idx]) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    w_eff = (w.detach() / sd.unsqueeze(1))
    return w_eff, b.detach() - mu @ w_eff, losses


def finetune_hidden_kl(lm: LM, h: torch.Tensor, teacher: torch.Tensor, w: torch.Tensor, b: torch.Tensor, steps: int,
                       lr: float, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optional: refine the ridge map so decode(h W + b) matches the model's own distribution (KL), as the
    paper's linear model approximation is trained; the model stays frozen."""
    g = torch.Generator().manual_seed(seed)
    w = w.clone().to(lm.device).requires_grad_(True)
    b = b.clone().to(lm.device).requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, h.shape[0], (min(batch, h.shape[0]),), generator=g)
        hb, tb = h[idx].to(lm.device, lm.dtype), teacher[idx].to(lm.device, lm.dtype)
        with torch.no_grad():
            p_t = torch.log_softmax(lm.decode(tb).float(), -1)
        p_s = torch.log_softmax(lm.decode((hb @ w.to(lm.dtype) + b.to(lm.dtype))).float(), -1)
        loss = F.kl_div(p_s, p_t, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return w.detach().float().cpu(), b.detach().float().cpu(), losses


# --------------------------------------------------------------------------------------------- direct vocabulary probe


@dataclass
class VocabProbe:
    """h -> logits over the tokens seen as training targets, low rank: logits_N = B_N A (h - mu)/sd + c_N.

    Why this shape: a full [vocab, d] map per (layer, N) is 28M parameters for SmolLM2 and 200M for GPT-J,
    far beyond what a few thousand CPU steps (or 100k samples) can fit; a shared rank-r read-out A plus a
    per-N head over the target vocabulary is cheap and regularised. Tokens never seen as targets get the
    floor probability eps / (V - |vocab|) (they cannot be learned from the data), so surprisal stays finite."""

    mu: torch.Tensor
    sd: torch.Tensor
    a: torch.Tensor  # [r, d]
    b: torch.Tensor  # [n_future, |vocab|, r]
    c: torch.Tensor  # [n_future, |vocab|]
    vocab: torch.Tensor  # [|vocab|] token ids
    eps: float = 1e-3

    def state(self) -> dict[str, torch.Tensor]:
        return {"mu": self.mu, "sd": self.sd, "a": self.a, "b": self.b, "c": self.c, "vocab": self.vocab,
                "eps": torch.tensor(self.eps)}

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> VocabProbe:
        return cls(s["mu"], s["sd"], s["a"], s["b"], s["c"], s["vocab"].long(), float(s["eps"]))

    def logits_small(self, h: torch.Tensor) -> torch.Tensor:
        z = ((h - self.mu) / self.sd) @ self.a.T  # [n, r]
        return torch.einsum("nr,kvr->knv", z, self.b) + self.c.unsqueeze(1)  # [n_future, n, |vocab|]

    def logprobs(self, h: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
        """Full-vocabulary log-probabilities for future offset n (floor for tokens outside the probe's vocab)."""
        small = torch.log_softmax(self.logits_small(h)[n], -1) + math.log1p(-self.eps)
        rest = vocab_size - self.vocab.numel()
        out = torch.full((h.shape[0], vocab_size), math.log(self.eps / max(rest, 1)))
        out[:, self.vocab] = small
        return out


def fit_vocab_probe(batches, vocab: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor, n_future: int, rank: int,
                    steps: int, lr: float, weight_decay: float, prior: torch.Tensor | None = None, seed: int = 0
                    ) -> tuple[VocabProbe, list[float]]:
    """AdamW on cross-entropy against the model's own tokens, all N jointly (mean over N), minibatches from
    `batches` (dicts with h [b, d] and greedy [b, n_future]). prior: [n_future, |vocab|] initial log-frequencies."""
    g = torch.Generator().manual_seed(seed)
    d = mu.numel()
    r = min(rank, d)
    a = (torch.randn(r, d, generator=g) / math.sqrt(d)).requires_grad_(True)
    b = torch.zeros(n_future, vocab.numel(), r, requires_grad=True)
    c = (prior.clone() if prior is not None else torch.zeros(n_future, vocab.numel())).requires_grad_(True)
    opt = torch.optim.AdamW([a, b, c], lr=lr, weight_decay=weight_decay)
    losses = []
    for _, mb in zip(range(steps), batches):
        local = torch.searchsorted(vocab, mb["greedy"])
        z = ((mb["h"] - mu) / sd) @ a.T
        logits = torch.einsum("nr,kvr->knv", z, b) + c.unsqueeze(1)
        loss = sum(F.cross_entropy(logits[j], local[:, j]) for j in range(n_future)) / n_future
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return VocabProbe(mu, sd, a.detach(), b.detach(), c.detach(), vocab), losses


def memory_batches(data: dict[str, torch.Tensor], batch: int, seed: int = 0):
    """Endless random minibatches from in-memory tensors (tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    n = next(iter(data.values())).shape[0]
    while True:
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        yield {k: v[idx] for k, v in data.items()}


# --------------------------------------------------------------------------------------------- sample store


@dataclass(frozen=True)
class Samples:
    """Where a prepared sample set lives: hidden states (the extraction's zarr group, rows in sample order,
    train rows first) and the targets group written by `write_targets`. Picklable into Ray workers."""

    acts_url: str
    targets_url: str
    n_train: int
    n_test: int
    vocab_size: int
    chunk_rows: int = 32

    @property
    def train(self) -> slice:
        return slice(0, self.n_train)

    @property
    def test(self) -> slice:
        return slice(self.n_train, self.n_train + self.n_test)


def write_targets(url: str, arrays: dict[str, np.ndarray], attrs: dict, chunk_rows: int) -> None:
    """Greedy tokens, final-layer states, last prefix token, prefix text of every sample, chunked like the
    activation store so training jobs stream both with the same row blocks."""
    import zarr

    g = zarr.open_group(url, mode="w")
    for name, value in arrays.items():
        chunks = (chunk_rows, *value.shape[1:]) if value.ndim else None
        g.create_array(name, shape=value.shape, chunks=chunks, dtype=value.dtype if value.dtype != object else str)
        g[name][...] = value
    g.attrs.update({**attrs, "complete": True})


def read_targets(url: str) -> dict:
    """attrs of a finished targets group, or {} when absent/unfinished (then the preparation reruns)."""
    import zarr

    try:
        g = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return {}
    return dict(g.attrs) if g.attrs.get("complete") else {}


def read_block(s: Samples, layer: int | None, rows: slice) -> dict[str, torch.Tensor]:
    """One contiguous block of rows: h (layer given), greedy, final, x_last as CPU tensors."""
    import zarr

    from lensflow.tasks.store import Activations

    g = zarr.open_group(s.targets_url, mode="r")
    out = {k: torch.from_numpy(np.asarray(g[k][rows])) for k in ("greedy", "final", "x_last")}
    out["final"] = out["final"].float()
    if layer is not None:
        out["h"] = torch.from_numpy(Activations(s.acts_url).layer(layer, rows))
    return out


def row_blocks(rows: slice, block: int, seed: int):
    """Endless random order of contiguous row blocks (chunk-level shuffling: each read is whole chunks)."""
    starts = list(range(rows.start, rows.stop, block))
    rng = random.Random(seed)
    while True:
        rng.shuffle(starts)
        for st in starts:
            yield slice(st, min(rows.stop, st + block))


def minibatches(s: Samples, layer: int, rows: slice, batch: int, block: int, seed: int):
    """Endless shuffled minibatches of dict(h, greedy, final, x_last), streamed from the stores block by block."""
    g = torch.Generator().manual_seed(seed)
    for sl in row_blocks(rows, max(block, batch), seed):
        data = read_block(s, layer, sl)
        perm = torch.randperm(sl.stop - sl.start, generator=g)
        for i in range(0, perm.numel() - batch + 1 if perm.numel() >= batch else 1, batch):
            idx = perm[i : i + batch]
            yield {k: v[idx] for k, v in data.items()}


def blocks(rows: slice, size: int):
    for st in range(rows.start, rows.stop, size):
        yield slice(st, min(rows.stop, st + size))


# --------------------------------------------------------------------------------------------- per-layer jobs


@dataclass(frozen=True)
class LayerJob:
    """One source layer's training (or, with reuse_run_id, loading) and test evaluation of one method.
    run: the flow's MLflow run (child run + artifacts); None in tests (nothing is logged)."""

    layer: int
    samples: Samples
    conf: FutureLensConf
    run: RunRef | None = None
    reuse_run_id: str | None = None


def artifact(method: str, layer: int) -> str:
    folder = "soft_prompts" if method == "soft_prompt" else f"probes/{method}"
    return f"{folder}/layer_{layer:02d}.safetensors"


def load_state(job: LayerJob, method: str) -> dict[str, torch.Tensor]:
    from lensflow.tasks.tracking import load_tensors

    if job.run is None:
        raise ValueError("reuse_run_id needs a tracking run (the tracking URI of the source run)")
    return load_tensors(job.run.tracking_uri, job.reuse_run_id, artifact(method, job.layer))


def log_job(job: LayerJob, method: str, state: dict[str, torch.Tensor] | None, curves: dict[str, list | dict],
            params: dict) -> None:
    """Child run with the loss curve(s); the trained tensors go to the flow's run (what reuse and the grid load)."""
    if job.run is None:
        return
    from lensflow.tasks import tracking

    with tracking.child_run(job.run, f"{method}/layer_{job.layer:02d}", {"layer": job.layer, "method": method, **params}) as ch:
        for name, values in curves.items():
            tracking.log_series(ch, name, values)
    if state is not None:
        tracking.log_tensors(job.run, state, artifact(method, job.layer))


@torch.no_grad()
def decoded_scores(lm: LM, pred: torch.Tensor, greedy: torch.Tensor, ks: tuple[int, ...], batch: int) -> list[dict]:
    """Metrics of predicted final-layer states [n, N, d], decoded by the model's own final norm + unembedding."""
    out = []
    for n in range(greedy.shape[1]):
        logits = torch.cat([lm.decode(pred[i : i + batch, n].to(lm.device, lm.dtype)).float().cpu()
                            for i in range(0, pred.shape[0], batch)])
        out.append(score(logits, greedy[:, n], ks))
    return out


def linear_hidden_job(lm: LM, job: LayerJob) -> dict:
    """h_l -> final-layer states at T..T+N-1 (one multi-output ridge, all N), decoded by the model: closed
    form from streamed sufficient statistics, penalty chosen on the last tenth of the training rows."""
    s, c, l = job.samples, job.conf, job.layer
    t0 = time.perf_counter()
    curves: dict = {}
    params: dict = {}
    if job.reuse_run_id:
        st = load_state(job, "linear_hidden")
        w, b = st["w"], st["b"]
    else:
        n_val = max(1, s.n_train // 10)
        fit, val = RidgeStats(), RidgeStats()
        for sl in blocks(s.train, s.chunk_rows):
            d = read_block(s, l, sl)
            y = d["final"].flatten(1)
            cut = max(0, min(sl.stop, s.n_train - n_val) - sl.start)
            if cut:
                fit.add(d["h"][:cut], y[:cut])
            if cut < y.shape[0]:
                val.add(d["h"][cut:], y[cut:])
        groups = int(read_block(s, None, slice(0, 1))["greedy"].shape[1])  # one penalty per offset N
        _, _, info = fit_ridge(fit, val, c.ridge, groups)
        w, b, _ = fit_ridge(fit.merge(val), None, c.ridge, groups, chosen=info["ridge"])
        curves["ridge_val_mse"] = list(info["val_mse"].values())
        params = {"ridge": info["ridge"], "ridge_grid": c.ridge}
        if c.hidden_kl_steps:
            d = read_block(s, l, s.train)
            dm = d["final"].shape[-1]
            ws, bs = [], []
            for n in range(d["final"].shape[1]):
                wn, bn, losses = finetune_hidden_kl(lm, d["h"], d["final"][:, n], w[:, n * dm : (n + 1) * dm],
                                                    b[n * dm : (n + 1) * dm], c.hidden_kl_steps, c.hidden_kl_lr, 64, c.seed)
                ws.append(wn)
                bs.append(bn)
                curves[f"kl_n{n}"] = losses
            w, b = torch.cat(ws, 1), torch.cat(bs)
    train_s = time.perf_counter() - t0
    test = read_block(s, l, s.test)
    pred = (test["h"] @ w + b).view(test["h"].shape[0], test["greedy"].shape[1], -1)
    metrics = decoded_scores(lm, pred, test["greedy"], tuple(c.ks), c.eval_batch)
    log_job(job, "linear_hidden", None if job.reuse_run_id else {"w": w, "b": b}, curves, params)
    return {"layer": l, "metrics": metrics, "train_s": train_s, "trained": not job.reuse_run_id}


def linear_vocab_job(job: LayerJob) -> dict:
    """Direct vocabulary probe (no model needed: a plain Ray task). Inputs standardised with streamed
    statistics of the training rows; see VocabProbe for the parameterisation."""
    s, c, l = job.samples, job.conf, job.layer
    t0 = time.perf_counter()
    curves: dict = {}
    if job.reuse_run_id:
        probe = VocabProbe.from_state(load_state(job, "linear_vocab"))
    else:
        n, s1, s2, targets = 0, 0.0, 0.0, []
        for sl in blocks(s.train, s.chunk_rows):
            d = read_block(s, l, sl)
            h = d["h"].double()
            n, s1, s2 = n + h.shape[0], s1 + h.sum(0), s2 + (h * h).sum(0)
            targets.append(d["greedy"])
        mu = s1 / n
        sd = (s2 / n - mu * mu).clamp_min(0).sqrt().clamp_min(1e-6)
        greedy = torch.cat(targets)
        vocab = torch.unique(greedy)
        counts = torch.stack([torch.bincount(torch.searchsorted(vocab, greedy[:, k].contiguous()), minlength=vocab.numel())
                              for k in range(greedy.shape[1])]).float()
        prior = torch.log(counts + 0.1) - torch.log(counts.sum(1, keepdim=True))
        batches = minibatches(s, l, s.train, c.vocab_batch, s.chunk_rows, c.seed + l)
        probe, losses = fit_vocab_probe(batches, vocab, mu.float(), sd.float(), greedy.shape[1], c.vocab_rank,
                                        c.vocab_steps, c.vocab_lr, c.vocab_weight_decay, prior, c.seed + l)
        curves["loss"] = losses
    train_s = time.perf_counter() - t0
    test = read_block(s, l, s.test)
    metrics = [score(probe.logprobs(test["h"], n, s.vocab_size), test["greedy"][:, n], tuple(c.ks))
               for n in range(test["greedy"].shape[1])]
    log_job(job, "linear_vocab", None if job.reuse_run_id else probe.state(), curves,
            {"rank": c.vocab_rank, "steps": c.vocab_steps, "vocab": int(probe.vocab.numel())})
    return {"layer": l, "metrics": metrics, "train_s": train_s, "trained": not job.reuse_run_id}
