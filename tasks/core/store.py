"""The zarr v3 activation store: one group per extraction, chunked along samples, compressed.

Layout of a group (n prompts, T = data.max_tokens, L = stored resid layers, B = stored blocks):
  resid      [n, L, d]            positions=last   chunks (chunk_size, 1, d): one layer of one chunk per object
             [n, T, L, d]         positions=all    (padding positions are zeros; see token_ids)
  attn_head  [n, B, H, Dh] / [n, T, B, H, Dh]      per-head attention outputs (optional site)
  mlp_in     [n, B, d] / [n, T, B, d]              what each block's MLP reads, after its pre-MLP norm (optional)
  mlp_out    [n, B, d] / [n, T, B, d]              what each block's MLP adds to the residual stream (optional):
                                                   with mlp_in, a transcoder's training pairs, read like resid
  token_ids  [n, T] int32, -1 = padding;  lengths [n] int32;  text [n] str
  done       [n_chunks] uint8, one chunk each: a writer marks its chunk when every array of it is written
attrs: model, weights_hash, store (the keyed settings), label, layers, blocks, positions, fingerprint, complete.

Concurrency rule (measured: writers sharing a chunk lose rows): each writer owns whole chunks, every array is
pre-allocated, nothing is appended. Rerunning the same extraction reuses the group and skips done chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.codecs import BloscCodec


@dataclass(frozen=True)
class StoreSpec:
    n: int
    max_tokens: int
    d_model: int
    n_heads: int
    head_dim: int
    layers: list[int]
    blocks: list[int]
    positions: str
    sites: list[str]
    dtype: str
    chunk_size: int
    compression_level: int
    attrs: dict = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def rows(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_size, min(self.n, (chunk + 1) * self.chunk_size))


BLOCK_SITES = ("attn_head", "mlp_in", "mlp_out")  # stored per block (0-based), beside resid's layers


def site_inner(spec: StoreSpec, site: str) -> tuple[int, ...]:
    """A site's shape after the token axes: its layer (resid) or block axis first, then the vector."""
    if site == "resid":
        return len(spec.layers), spec.d_model
    if site == "attn_head":
        return len(spec.blocks), spec.n_heads, spec.head_dim
    if site in ("mlp_in", "mlp_out"):
        return len(spec.blocks), spec.d_model
    raise ValueError(f"unknown store site '{site}' (resid, {', '.join(BLOCK_SITES)})")


def _shape(spec: StoreSpec, inner: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, chunks): samples x [tokens] x layer x inner, one layer per chunk so per-layer reads stay cheap."""
    lead, lead_chunk = ((spec.n, spec.max_tokens), (spec.chunk_size, spec.max_tokens)) if spec.positions == "all" \
        else ((spec.n,), (spec.chunk_size,))
    return (*lead, *inner[:1], *inner[1:]), (*lead_chunk, 1, *inner[1:])


def create(url: str, spec: StoreSpec, texts: list[str]) -> zarr.Group:
    """Create the group, or return it untouched when a run of the same extraction (same URL = same key) left it.
    The attributes are written last, so a group without them was cut off while being created: it is recreated.
    Callers hold the stage's claim, so two runs never create the same group at once."""
    try:
        g = zarr.open_group(url, mode="r+")
        if g.attrs.get("fingerprint") == spec.attrs.get("fingerprint"):
            return g
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        pass
    g = zarr.open_group(url, mode="w")
    codec = [BloscCodec(cname="zstd", clevel=spec.compression_level, shuffle="shuffle")]
    for site in spec.sites:
        shape, chunks = _shape(spec, site_inner(spec, site))
        g.create_array(site, shape=shape, chunks=chunks, dtype=spec.dtype, compressors=codec, fill_value=0)
    g.create_array("token_ids", shape=(spec.n, spec.max_tokens), chunks=(spec.chunk_size, spec.max_tokens), dtype="int32",
                   compressors=codec, fill_value=-1)
    g.create_array("lengths", shape=(spec.n,), chunks=(spec.chunk_size,), dtype="int32", fill_value=0)
    g.create_array("text", shape=(spec.n,), chunks=(max(spec.n, 1),), dtype=str)
    g["text"][:] = np.array(texts, dtype=object).astype(str)
    g.create_array("done", shape=(spec.n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
    g.attrs.update({**spec.attrs, "layers": spec.layers, "blocks": spec.blocks, "positions": spec.positions,
                    "chunk_size": spec.chunk_size, "complete": False})
    return g


def pending_chunks(g: zarr.Group) -> list[int]:
    return [int(i) for i in np.flatnonzero(g["done"][:] == 0)]


def write_chunk(url: str, chunk: int, rows: slice, arrays: dict[str, np.ndarray]) -> None:
    """Write every array of one chunk, then mark it done: a crash mid-write leaves it pending, never half-done."""
    g = zarr.open_group(url, mode="r+")
    for name, value in arrays.items():
        g[name][rows] = value
    g["done"][chunk] = 1


def mark_complete(url: str) -> None:
    g = zarr.open_group(url, mode="r+")
    if pending_chunks(g):
        raise RuntimeError(f"{url}: chunks {pending_chunks(g)} are missing; rerun to resume")
    g.attrs["complete"] = True


class Activations:
    """Read side of a finished extraction; layers stream from the store one chunk of rows at a time."""

    def __init__(self, url: str, allow_partial: bool = False):
        self.url = url
        self.group = zarr.open_group(url, mode="r")
        if not allow_partial and not self.group.attrs.get("complete"):
            raise ValueError(f"{url} is an unfinished extraction; rerun the flow with the same config to resume it")
        self.attrs = dict(self.group.attrs)
        self.layers: list[int] = list(self.attrs["layers"])
        self.blocks: list[int] = list(self.attrs["blocks"])
        self.positions: str = self.attrs["positions"]

    @property
    def n(self) -> int:
        return self.group["token_ids"].shape[0]

    @property
    def sites(self) -> list[str]:
        return [s for s in ("resid", *BLOCK_SITES) if s in self.group]

    @property
    def d_model(self) -> int:
        site = next(s for s in ("resid", "mlp_in", "mlp_out") if s in self.group)
        return self.group[site].shape[-1]

    @property
    def resid(self) -> zarr.Array:
        return self.group["resid"]

    @property
    def token_ids(self) -> zarr.Array:
        return self.group["token_ids"]

    @property
    def lengths(self) -> np.ndarray:
        return self.group["lengths"][:]

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_size"])

    def texts(self) -> list[str]:
        return [str(t) for t in self.group["text"][:]]

    def _index(self, layer: int, site: str) -> int:
        pool = self.layers if site == "resid" else self.blocks
        if layer not in pool:
            raise KeyError(f"{site} layer {layer} is not in this store (stored: {pool})")
        return pool.index(layer)

    def layer(self, layer: int, rows: slice | np.ndarray | None = None, site: str = "resid") -> np.ndarray:
        """float32 [rows, d] (positions=last) or [rows, T, d] (positions=all); heads add [H, Dh]. `layer` is a resid
        layer for site resid, a block index for the block sites."""
        arr, i = self.group[site], self._index(layer, site)
        sel = slice(None) if rows is None else rows
        out = arr[sel, i] if self.positions == "last" else arr[sel, :, i]
        return np.asarray(out, dtype=np.float32)

    def iter_layer(self, layer: int, batch_rows: int | None = None, rows: slice | None = None,
                   site: str = "resid") -> Iterator[np.ndarray]:
        """Blocks of rows of one layer, aligned to the store's chunks so each object is read once."""
        step = batch_rows or self.chunk_rows
        lo, hi = (0, self.n) if rows is None else (rows.start or 0, min(self.n, rows.stop or self.n))
        for start in range(lo, hi, step):
            yield self.layer(layer, slice(start, min(hi, start + step)), site)
