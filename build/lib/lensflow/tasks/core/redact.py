"""Credentials never leave the process: URIs and query strings are redacted wherever lensflow writes text that
other people read (MLflow params and tags, printed lines, Prefect parameters, store attributes, error lines)."""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(?<=://)([^/@:\s]+):([^/@\s]+)@")  # scheme://user:password@host
_QUERY = re.compile(r"([?&][^=&\s#]+)=([^&\s#'\"]+)")  # ?X-Amz-Signature=..., &token=... (up to a closing quote)
MASK = "***"


def redact(text: str) -> str:
    """user:password@ -> user:***@, and every query value -> ***; other text is left as it is."""
    return _QUERY.sub(rf"\1={MASK}", _USERINFO.sub(rf"\1:{MASK}@", text))


def redact_tree(value: Any) -> Any:
    """redact() over every string in a JSON-like tree (a config dump, a parameter list)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value
