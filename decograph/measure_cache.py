"""A JSON file of measurements keyed by what they depend on (graph, machine, threads, ...).

``cached(name, key, measure)`` returns the stored value for ``key`` in
``$XDG_CACHE_HOME/decograph/NAME``, or calls ``measure()`` (seconds of timing) and stores its
JSON-ready result. The file is rewritten atomically; a read-only or broken cache only costs a
re-measurement. Standard library only: the torch-free exported decoder uses it too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["cache_path", "cached"]


def cache_path(name: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decograph" / name


def cached(name: str, key: str, measure: Callable[[], Any]) -> Any:
    path = cache_path(name)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key in table:
        return table[key]
    table[key] = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass                        # a read-only cache only costs a re-measurement next time
    return table[key]
