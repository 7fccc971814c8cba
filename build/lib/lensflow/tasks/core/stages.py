"""One identity and one home for every expensive stage output.

A stage output (an activation store, Future Lens targets, one layer's probe / soft prompt / translator / SAE, one
ICL task's head sweep, neuron thresholds) is named by `fingerprint` over everything it depends on: the code's
format version, the model identity (name, revision, dtype, weights hash, tokenizer hash), the stage's own settings
and the fingerprints of the stages it reads. It lives at `{store.root}/{stage}/{key}`, a local folder or an fsspec
URL, so any run on any node finds it again: a rerun recomputes nothing, a sweep point reuses what another point
made, a changed input moves exactly the downstream keys.

Write, then publish: an item is written whole to a temporary name and renamed into place (local) or put as one
object (object stores), so a reader sees either nothing or the finished item, and a crash leaves nothing that a
later run mistakes for finished. Two runs that need the same item share it: on a local store the second waits on a
file lock and then finds it; on an object store both may compute it and write identical bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = 1  # bump when a stored layout changes: every key moves, nothing old is misread


@dataclass(frozen=True)
class ModelId:
    """What makes two models the same model for every stage that runs it."""

    name: str
    revision: str | None
    dtype: str
    weights_hash: str
    tokenizer_hash: str


def fingerprint(stage: str, model: ModelId | None, params: Mapping[str, Any], inputs: Sequence[str] = (),
                version: int = 1) -> str:
    """THE identity of a stage output. `version` is the stage's own code version (bump it when its results
    change for the same inputs); `inputs` are the keys of the stage outputs it reads."""
    payload = {"format": FORMAT, "stage": stage, "version": version, "model": asdict(model) if model else None,
               "params": params, "inputs": list(inputs)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def digest(texts: Sequence[str]) -> str:
    """Content hash of a list of texts (prompts, paragraphs): a stage parameter in place of the texts."""
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


@dataclass
class Item:
    """One published item: tensors (may be empty) and JSON-able metadata (metrics, settings, curves)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A fingerprinted folder of published items under the store root. Picklable into Ray workers."""

    root: str
    name: str
    key: str

    @classmethod
    def of(cls, root: str, name: str, model: ModelId | None, params: Mapping[str, Any], inputs: Sequence[str] = (),
           version: int = 1) -> Stage:
        return cls(root.rstrip("/"), name, fingerprint(name, model, params, inputs, version))

    @property
    def url(self) -> str:
        return f"{self.root}/{self.name}/{self.key}"

    def item_url(self, item: str) -> str:
        return f"{self.url}/{item}.safetensors"

    def done(self, item: str) -> bool:
        fs, path = _fs(self.item_url(item))
        return fs.exists(path)

    def load(self, item: str) -> Item | None:
        """The published item, or None when it has not been published (never a half-written one)."""
        fs, path = _fs(self.item_url(item))
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            return None
        return _decode(raw)

    def save(self, item: str, value: Item) -> None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in value.tensors.items()}
        raw = save(tensors, metadata={"lensflow": json.dumps(value.meta, default=_jsonable)})
        url = self.item_url(item)
        if is_remote(url):
            fs, path = _fs(url)
            fs.pipe_file(path, raw)  # one PUT: the object appears whole or not at all
            return
        path = Path(_local(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            f.write(raw)
        os.chmod(f.name, 0o666 & ~_umask())  # temporary files are private (0600); a shared store is not
        os.replace(f.name, path)

    @contextmanager
    def claim(self, item: str = "stage") -> Iterator[None]:
        """Exclusive right to compute `item` among processes sharing a local store (released by the kernel
        if the holder dies, so a killed run never leaves a stale lock); a no-op on object stores."""
        if is_remote(self.url):
            yield
            return
        path = Path(_local(self.root)) / ".locks" / f"{self.name.replace('/', '.')}-{self.key}-{item}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get_or_compute(self, item: str, compute: Callable[[], Item]) -> tuple[Item, bool]:
        """(the item, whether this call computed it): found, or computed under the claim and published."""
        found = self.load(item)
        if found is not None:
            return found, False
        with self.claim(item):
            found = self.load(item)  # another run may have published it while we waited
            if found is not None:
                return found, False
            value = compute()
            self.save(item, value)
            return value, True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _decode(raw: bytes) -> Item:
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.get("__metadata__", {}).get("lensflow", "{}"))
    return Item(dict(load(raw)), meta)


def _local(url: str) -> str:
    return url.removeprefix("file://")


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)
