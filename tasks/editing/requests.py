"""Edit requests in CounterFact's fields, one JSON object a line: {"prompt", "subject", "target_true",
"target_new", "paraphrases": [...], "neighborhood": [...]} (other keys ignored). The shipped ones were written
for lensflow from the causal-tracing facts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lensflow.tasks.core.config import ConfigError
from lensflow.tasks.core.stages import digest
from lensflow.tasks.data import DATA_DIR

REQUESTS_FILE = DATA_DIR / "edits" / "requests.jsonl"


@dataclass(frozen=True)
class Request:
    prompt: str  # ends where the object starts; holds the subject
    subject: str
    target_true: str  # continuations, with their leading space
    target_new: str
    paraphrases: tuple[str, ...]
    neighborhood: tuple[str, ...]  # other subjects' prompts whose answer is target_true

    @property
    def key(self) -> str:
        return digest([self.prompt, self.subject, self.target_true, self.target_new])[:16]


def load_requests(path: str | None = None) -> list[Request]:
    source = Path(REQUESTS_FILE if path is None else path)
    name = f"edit.requests {source}"
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{name}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot be read ({type(exc).__name__})") from None
    out: dict[Request, None] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            req = Request(row["prompt"], row["subject"], row["target_true"], row["target_new"],
                          tuple(row.get("paraphrases", ())), tuple(row.get("neighborhood", ())))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f'{name}: line {i} is not a JSON object with "prompt", "subject", "target_true" and '
                              '"target_new"') from None
        texts = (req.prompt, req.subject, req.target_true, req.target_new, *req.paraphrases, *req.neighborhood)
        if not all(isinstance(x, str) and x.strip() for x in texts):
            raise ConfigError(f"{name}: line {i}: every prompt, subject and target must be a non-empty string")
        if req.subject not in req.prompt:
            raise ConfigError(f"{name}: line {i}: subject {req.subject!r} does not occur in the prompt")
        if req.target_true.strip() == req.target_new.strip():
            raise ConfigError(f"{name}: line {i}: target_new equals target_true")
        bad = [p for p in req.paraphrases if req.subject not in p]
        if bad:
            raise ConfigError(f"{name}: line {i}: subject {req.subject!r} does not occur in paraphrase {bad[0]!r}")
        out[req] = None
    if not out:
        raise ConfigError(f"{name}: no requests")
    return list(out)
