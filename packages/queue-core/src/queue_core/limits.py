"""Bounds shared by options, control exceptions and the worker (no imports: used by both)."""

from __future__ import annotations

import math

__all__ = ["MAX_DELAY_MS", "checked_delay"]

# Any delay, backoff or hold: ten years. Lua computes `now + delay` in doubles and msgpack carries
# 64-bit integers; a bound far inside both keeps a bad value from overflowing into "at once".
MAX_DELAY_MS = 10 * 365 * 24 * 3600 * 1000


def checked_delay(value: object) -> int | None:
    """`value` as a delay in ms when it is one (a finite, non-negative number of at most
    MAX_DELAY_MS); None otherwise. For values that come from user code at run time."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0 or value > MAX_DELAY_MS:
        return None
    return int(value)
