"""JSON for job data, return values and progress: strict where orjson is lenient."""

from __future__ import annotations

import math
from typing import Any

import orjson

from queue_core.errors import SerializationError

__all__ = ["dumps"]


def dumps(value: Any, what: str) -> bytes:
    """`value` as JSON bytes. Raises `SerializationError` for what JSON cannot carry, including
    NaN and ±Infinity, which orjson would silently turn into null."""
    try:
        out = orjson.dumps(value)
    except TypeError as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}") from exc
    # Only a payload containing null can hide a non-finite float: the walk is skipped otherwise.
    if b"null" in out and _has_nonfinite(value):
        raise SerializationError(f"{what} contains NaN or Infinity, which JSON cannot carry")
    return out


def _has_nonfinite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif hasattr(item, "__dataclass_fields__"):
            stack.extend(getattr(item, f) for f in item.__dataclass_fields__)
    return False
