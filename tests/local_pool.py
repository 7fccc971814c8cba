"""ModelPool's interface over one in-process model, for tests of science that takes a pool: the stage logic runs as
the actors run it, without starting Ray (each flow's own test runs the real actors)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lensflow.tasks.core.models import LM, ModelInfo, describe


class LocalPool:
    """Counts the items it was asked to run, so a test can tell found work from recomputed work."""

    def __init__(self, lm: LM):
        self.lm, self.items = lm, 0

    def describe(self) -> ModelInfo:
        return describe(self.lm)

    def map(self, fn: Callable[[LM, Any], Any], items: Sequence[Any], desc: str = "", **_: Any) -> list[Any]:
        self.items += len(items)
        return [fn(self.lm, item) for item in items]
