"""Progress of long work, shown twice from one counter: a terminal bar (tqdm) and, inside a Prefect run, a
progress artifact on that run's page in the Prefect UI, so a scheduled run on a worker is followed without a
terminal. Artifact updates are API calls, so they are throttled; the last one always says 100."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from tqdm.auto import tqdm

UPDATE_EVERY_S = 2.0  # at most one artifact update per this many seconds (and one per whole percent)


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def artifact_key(desc: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", desc.lower())).strip("-") or "progress"


class Progress:
    """One counter behind a tqdm bar and, in a Prefect run, a progress artifact (percent of `total`)."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.done = max(total, 0), desc, 0
        self.bar = tqdm(total=total, desc=desc, unit=unit)
        self._artifact: UUID | None = None
        self._sent_at, self._sent_pct = 0.0, -1
        if _in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(0.0, key=artifact_key(desc), description=desc)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        self._send(final=False)

    def _send(self, final: bool) -> None:
        if self._artifact is None:
            return
        pct = 100 if self.total == 0 else int(100 * self.done / self.total)
        now = time.monotonic()
        if final or (pct > self._sent_pct and now - self._sent_at >= UPDATE_EVERY_S):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, float(pct))
            self._sent_at, self._sent_pct = now, pct

    def close(self) -> None:
        self.bar.close()
        if self.done >= self.total:
            self._send(final=True)


@contextmanager
def progress(total: int, desc: str, unit: str = "item") -> Iterator[Progress]:
    """`with progress(len(items), "extract") as bar: ... bar.update(1)`."""
    p = Progress(total, desc, unit)
    try:
        yield p
    finally:
        p.close()
