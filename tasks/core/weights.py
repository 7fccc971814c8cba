"""Model weights once per cluster: the loadable model (the embedded GGUF's conversion, a local folder, or a Hub
checkpoint as the first actor downloaded it) is kept under ray.weights_cache (default {store.root}/models) by its
identity, and every actor copies it to its node once and loads it from there.

Why: a Hub id made every actor download the checkpoint on every start (about 24 GB per GPT-J actor, with no token
on the workers), a local folder exists only on the driver's machine, and a node-local cache is lost with its pod.
The copy keeps `weights_hash`, so stage fingerprints are the same whichever way an actor loaded the model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from lensflow.tasks.core.config import Config, ModelConf
from lensflow.tasks.core.redact import redact

MARKER = "COMPLETE"  # written last: a copy without it is partial (an upload that died) and is not used
CLAIM = "CLAIMED"  # a Hub checkpoint: the actor that writes it first says so; the others load from the Hub meanwhile


def identity(conf: ModelConf) -> str | None:
    """A folder name that changes whenever the weights may: None for the tiny models (built from a seed)."""
    from lensflow.tasks.core.models import EMBEDDED, TINY_PREFIX, embedded_dir

    name = conf.name
    if name.startswith(TINY_PREFIX) or conf.trust_remote_code:
        return None
    if name in EMBEDDED:
        return f"{name}-{(embedded_dir(name) / 'weights_hash').read_text().strip()[:16]}"
    if Path(name).is_dir():
        return f"{Path(name).name}-{folder_hash(Path(name))[:16]}"
    return f"{name.replace('/', '--')}-{(conf.revision or 'main')[:40]}-{conf.dtype}"


def folder_hash(folder: Path) -> str:
    """Over file names, sizes and modification times: cheap for tens of GB, and any rewrite changes it."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def url_for(conf: Config) -> str | None:
    """Where this model's shared copy lives; None when weights are not shared (tiny model, ray.weights_cache=none, a
    private local Ray)."""
    if conf.ray.weights_cache == "none" or not conf.ray.address:  # a private local Ray: this machine's cache serves
        return None
    ident = identity(conf.model)
    if ident is None:
        return None
    base = conf.ray.weights_cache or f"{conf.store.root.rstrip('/')}/models"
    return f"{base.rstrip('/')}/{ident}"


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url, skip_instance_cache=True)  # the credentials of now, not of a cached instance


def complete(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(f"{path}/{MARKER}")


def upload(src: Path, url: str) -> None:
    """Every file of `src` under `url`, the marker last."""
    fs, path = _fs(url)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = f"{path}/{f.relative_to(src).as_posix()}"
        fs.makedirs(target.rpartition("/")[0], exist_ok=True)
        fs.put_file(str(f), target)
    fs.pipe_file(f"{path}/{MARKER}", b"ok")


def publish(conf: Config) -> str | None:
    """Driver side, before actors start: the shared copy's URL, uploaded now when the source is on this machine (the
    embedded conversion, a local folder). A Hub checkpoint is written by the first actor that downloads it."""
    from lensflow.tasks.core.models import EMBEDDED, embedded_dir

    url = url_for(conf)
    if url is None or complete(url):
        return url
    name = conf.model.name
    src = embedded_dir(name) if name in EMBEDDED else Path(name) if Path(name).is_dir() else None
    if src is not None:
        print(f"model weights: writing {name} to {redact(url)} once for the cluster")
        upload(src, url)
    return url


def fetch(url: str, cache: Path) -> Path | None:
    """Actor side: this node's copy of the shared weights, made once per node (actors of a node wait for one
    copier); None while nothing complete is there."""
    from lensflow.tasks.core.models import _locked

    if not complete(url):
        return None
    local = cache / "shared" / url.rstrip("/").rpartition("/")[2]
    if (local / MARKER).is_file():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    with _locked(local.parent / f".{local.name}.lock"):
        if not (local / MARKER).is_file():
            fs, path = _fs(url)
            tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}-"))
            try:
                for remote in fs.find(path):
                    rel = remote[len(path.rstrip("/")) + 1:]
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(remote, str(tmp / rel))
                shutil.rmtree(local, ignore_errors=True)
                os.replace(tmp, local)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return local


def claim(url: str, who: str) -> bool:
    """Whether this actor writes the Hub checkpoint's copy (the first to ask; a rare tie writes the same files
    twice)."""
    fs, path = _fs(url)
    if fs.exists(f"{path}/{CLAIM}"):
        return False
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/{CLAIM}", who.encode())
    return True
