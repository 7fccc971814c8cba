"""Future Lens samples (Pal et al., CoNLL 2023): prefixes of natural text and the model's own continuations.

A sample is a prefix whose last token is T; the hidden states of T (every layer, from the activation store) are
the input and the model's own greedy continuation g_0..g_{n_future-1} the targets for N = 0..n_future-1 (g_0 is
the next token). Only prefixes where the model predicts the true next token are kept (the paper's filter), so at
N=0 the greedy token and the text agree. Samples are split by text: no text gives both train and test samples.

The targets are one stage (`targets_stage`): a zarr group under `{store.root}/future_lens/targets/{key}`, chunked
like the activation store so training streams both with the same row blocks, and published by its `complete`
attribute, written last (a group without it was cut off and is rewritten).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from lensflow.tasks.core.actors import ModelPool
from lensflow.tasks.core.config import Config, ConfigError, with_overrides
from lensflow.tasks.core.hooks import Read, trace
from lensflow.tasks.core.models import LM, ModelInfo
from lensflow.tasks.core.stages import Stage, digest
from lensflow.tasks.core.store import Activations

VERSION = 1  # of the targets computed here; part of their key


# --------------------------------------------------------------------------------------------- model side


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
        lm.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
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
    n_future: int  # future_lens.n_future


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


# --------------------------------------------------------------------------------------------- split


@dataclass(frozen=True)
class TextSplit:
    """Candidate windows of the training and test texts (shuffled, a few more than needed) and the training texts."""

    train: list[Window]
    test: list[Window]
    train_texts: list[int]


def split_windows(windows: list[Window], n_texts: int, test_fraction: float, seed: int, n_train: int,
                  n_test: int) -> TextSplit:
    """Hold out a seeded share of whole texts (at least one), so no text gives both train and test samples;
    shuffle each side with the same generator and keep 5% + 2 more candidates than n_train / n_test: the
    re-tokenisation check after the model's continuation drops a few."""
    rng = random.Random(seed)
    order = list(range(n_texts))
    rng.shuffle(order)
    test_texts = set(order[: max(1, round(test_fraction * n_texts))])
    train = [w for w in windows if w.text_id not in test_texts]
    test = [w for w in windows if w.text_id in test_texts]
    rng.shuffle(train)
    rng.shuffle(test)
    return TextSplit(train[: int(n_train * 1.05) + 2], test[: int(n_test * 1.05) + 2],
                     sorted(set(range(n_texts)) - test_texts))


def kept_rows(keep: np.ndarray, n_candidates_train: int, n_train: int, n_test: int) -> tuple[list[int], list[int]]:
    """Rows (of train candidates, then test candidates) that passed the filter, capped at n_train / n_test."""
    rows = np.flatnonzero(keep)
    train = [int(i) for i in rows if i < n_candidates_train][:n_train]
    test = [int(i) for i in rows if i >= n_candidates_train][:n_test]
    if len(train) < 2 or len(test) < 1:
        raise ConfigError(f"future_lens: only {len(train)} train / {len(test)} test samples survive the filter "
                          f"(model predicts the next token); raise data.max_prompts or data.max_tokens")
    return train, test


# --------------------------------------------------------------------------------------------- targets stage


@dataclass(frozen=True)
class Samples:
    """Where a prepared sample set lives: hidden states (the extraction's zarr group, rows in sample order,
    train rows first) and the targets group. Picklable into Ray workers."""

    acts_url: str
    targets_url: str
    n_train: int
    n_test: int
    vocab_size: int
    chunk_rows: int  # store.chunk_size of the states

    @property
    def train(self) -> slice:
        return slice(0, self.n_train)

    @property
    def test(self) -> slice:
        return slice(self.n_train, self.n_train + self.n_test)


@dataclass(frozen=True)
class SampleTargets:
    """The published targets stage and what the run logs about it; computed: this call made it."""

    url: str
    key: str
    n_train: int
    n_test: int
    candidates: int  # positions scanned
    model_correct: int  # of those, where the model predicts the text's next token
    train_texts: list[int]
    computed: bool

    @property
    def keep_rate(self) -> float:
        return self.model_correct / max(1, self.candidates)

    def prefixes(self) -> list[str]:
        """The samples' prefix texts, train rows first: what the activation store is extracted from."""
        return [str(p) for p in zarr.open_group(self.url, mode="r")["prefix"][:]]

    def samples(self, acts_url: str, vocab_size: int, chunk_rows: int) -> Samples:
        return Samples(acts_url, self.url, self.n_train, self.n_test, vocab_size, chunk_rows)


def targets_stage(conf: Config, texts: list[str], info: ModelInfo) -> Stage:
    """Key: the model, the texts, data.max_tokens and the sample settings; store.dtype (the final states are
    stored in it) and store.chunk_size (the batch of each model call, which moves the states' last bits)."""
    fc = conf.future_lens
    params = {"texts": digest(texts), "max_tokens": conf.data.max_tokens, "dtype": conf.store.dtype,
              "batch": conf.store.chunk_size,
              **fc.model_dump(mode="json", include={"min_prefix_tokens", "n_train", "n_test", "test_fraction",
                                                    "n_future", "seed"})}
    return Stage.of(conf.store.root, "future_lens/targets", info.id, params, version=VERSION)


def make_targets(conf: Config, texts: list[str], pool: ModelPool) -> SampleTargets:
    """Filtered, split samples with the model's own continuation (model actors), found again when published."""
    stage = targets_stage(conf, texts, pool.describe())
    with stage.claim():
        attrs = read_targets(stage.url)
        computed = not attrs
        if computed:
            write_targets(stage.url, *_compute_targets(conf, texts, pool), conf.store.chunk_size)
            attrs = read_targets(stage.url)
    return SampleTargets(stage.url, stage.key, attrs["n_train"], attrs["n_test"], attrs["candidates"],
                         attrs["model_correct"], attrs["train_texts"], computed)


def _compute_targets(conf: Config, texts: list[str], pool: ModelPool) -> tuple[dict[str, np.ndarray], dict]:
    fc, max_tokens, step = conf.future_lens, conf.data.max_tokens, conf.store.chunk_size
    parts = pool.map(scan_texts, [(texts[i : i + step], max_tokens, fc.min_prefix_tokens)
                                  for i in range(0, len(texts), step)], desc="future lens: scan texts")
    scans = [sc for part in parts for sc in part]
    windows = candidate_windows(scans)
    split = split_windows(windows, len(texts), fc.test_fraction, fc.seed, fc.n_train, fc.n_test)
    chosen = split.train + split.test
    items = [PrepItem(chosen[i : i + step], max_tokens, fc.n_future) for i in range(0, len(chosen), step)]
    preps = pool.map(prepare_windows, items, desc="future lens: model continuations")
    arr = {k: np.concatenate([p[k] for p in preps]) for k in preps[0]}
    train, test = kept_rows(arr["keep"], len(split.train), fc.n_train, fc.n_test)
    rows = np.array(train + test)
    out = {"greedy": arr["greedy"][rows], "final": arr["final"][rows].astype(conf.store.dtype),
           "x_last": arr["x_last"][rows], "text_id": np.array([chosen[i].text_id for i in rows]),
           "prefix": arr["prefix"][rows]}
    n_pos = sum(max(0, min(len(sc["ids"]) - 1, max_tokens) - fc.min_prefix_tokens + 1) for sc in scans)
    attrs = {"n_train": len(train), "n_test": len(test), "candidates": n_pos, "model_correct": len(windows),
             "train_texts": split.train_texts}
    return out, attrs


def states_conf(conf: Config) -> Config:
    """The activation store Future Lens reads: every resid layer at the last prefix token."""
    return with_overrides(conf, {"store.positions": "last", "store.layers": None, "store.sites": ["resid"]})


def write_targets(url: str, arrays: dict[str, np.ndarray], attrs: dict, chunk_rows: int) -> None:
    """Greedy tokens, final-layer states, last prefix token, prefix text of every sample, chunked like the
    activation store; `complete` is written last, so a reader never takes a cut-off group for finished."""
    g = zarr.open_group(url, mode="w")
    for name, value in arrays.items():
        chunks = (chunk_rows, *value.shape[1:]) if value.ndim else None
        g.create_array(name, shape=value.shape, chunks=chunks, dtype=value.dtype if value.dtype != object else str)
        g[name][...] = value
    g.attrs.update(attrs)
    g.attrs["complete"] = True


def read_targets(url: str) -> dict:
    """attrs of a finished targets group, or {} when absent or unfinished (then it is computed again)."""
    try:
        g = zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return {}
    return dict(g.attrs) if g.attrs.get("complete") else {}


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Block:
    """Rows of a sample set as CPU tensors (a field is None where it was not read)."""

    greedy: torch.Tensor  # [rows, n_future] the model's own next tokens at T+1..T+N
    h: torch.Tensor | None = None  # [rows, d] the source layer's state at T
    final: torch.Tensor | None = None  # [rows, n_future, d] final-layer states at T..T+N-1 (float32)
    x_last: torch.Tensor | None = None  # [rows] the prefix's last token

    def take(self, idx: torch.Tensor) -> Block:
        return Block(*(None if v is None else v[idx] for v in (self.greedy, self.h, self.final, self.x_last)))

    @property
    def rows(self) -> int:
        return self.greedy.shape[0]


def read_block(s: Samples, layer: int | None, rows: slice) -> Block:
    """One contiguous block of rows; the source layer's states where `layer` is given."""
    g = zarr.open_group(s.targets_url, mode="r")
    got = {k: torch.from_numpy(np.asarray(g[k][rows])) for k in ("greedy", "final", "x_last")}
    h = torch.from_numpy(Activations(s.acts_url).layer(layer, rows)) if layer is not None else None
    return Block(got["greedy"], h, got["final"].float(), got["x_last"])


def blocks(rows: slice, size: int):
    for st in range(rows.start, rows.stop, size):
        yield slice(st, min(rows.stop, st + size))


def row_blocks(rows: slice, block: int, seed: int):
    """Endless random order of contiguous row blocks (chunk-level shuffling: each read is whole chunks)."""
    starts = list(range(rows.start, rows.stop, block))
    rng = random.Random(seed)
    while True:
        rng.shuffle(starts)
        for st in starts:
            yield slice(st, min(rows.stop, st + block))


KEEP_BYTES = 256 << 20  # training rows of one layer up to this size are read once and kept, not re-read per epoch


def minibatches(s: Samples, layer: int, rows: slice, batch: int, block: int, seed: int):
    """Endless shuffled minibatches (Blocks), streamed from the stores block by block; where the rows are small
    enough (KEEP_BYTES) each block is read once (a 300-step probe re-read and decompressed its blocks every step)."""
    g = torch.Generator().manual_seed(seed)
    kept: dict[int, Block] | None = {} if _row_bytes(s) * (rows.stop - rows.start) <= KEEP_BYTES else None
    for sl in row_blocks(rows, max(block, batch), seed):
        data = kept.get(sl.start) if kept is not None else None
        if data is None:
            data = read_block(s, layer, sl)
            if kept is not None:
                kept[sl.start] = data
        perm = torch.randperm(sl.stop - sl.start, generator=g)
        for i in range(0, perm.numel() - batch + 1 if perm.numel() >= batch else 1, batch):
            idx = perm[i : i + batch]
            yield data.take(idx)


def _row_bytes(s: Samples) -> int:
    """Bytes of one row of a Block: the source state, the final-layer states at every N, tokens."""
    g = zarr.open_group(s.targets_url, mode="r")
    n_future, d = g["final"].shape[1:]
    return 4 * d * (1 + n_future) + 8 * (n_future + 1)


def memory_batches(data: Block, batch: int, seed: int = 0):
    """Endless random minibatches from a Block in memory (tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data.take(torch.randint(0, data.rows, (min(batch, data.rows),), generator=g))
