"""Strategy parameter overrides given as text: ``--set KEY=VALUE`` on the command line.

    parse_overrides(["k=8", "adaptive=true", "kv=block_approx"])
    # {"k": 8, "adaptive": True, "kv": "block_approx"}: what ``load_strategy(..., overrides=)`` takes

Only the standard library is imported: the CLI, ``bench`` and ``viz`` parse ``--set`` before
any model loads.
"""
from __future__ import annotations

from typing import Any, Sequence

from decograph.errors import InputError

__all__ = ["parse_value", "parse_overrides"]


def parse_value(text: str) -> Any:
    """A ``--set`` value: ``true``/``false`` (any case) as bool, then int, then float, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """``["k=8", "adaptive=true"]`` -> ``{"k": 8, "adaptive": True}``; ``None`` when none given.
    ``InputError`` for a pair without ``=`` or with an empty key."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = parse_value(value)
    return out
