"""The built-in strategies, shipped as package data in ``decograph/frontends/strategies/``,
and ``load_strategy``, which takes a built-in name or a strategy file path.

    >>> [name for name, _ in list_strategies()]
    ['anpd', 'greedy', 'gs_jacobi', 'jacobi', 'lookahead', 'ngram']
    >>> load_strategy("jacobi", overrides={"window": 6}).source
    'builtin:jacobi'

Assumption: a built-in's name is its file's stem (the ``strategy:`` field says the same); files
are read with ``importlib.resources``, so this works from a wheel or a zip too. Every failure
is a ``StrategyFileError``.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import TYPE_CHECKING, Any, Mapping

from decograph.errors import StrategyFileError
from decograph.frontends.strategy_file import FORMATS, Strategy, load_strategy_file, load_strategy_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["list_strategies", "load_strategy", "builtin_path", "builtin_names"]


def _builtins() -> dict[str, Traversable]:
    folder = resources.files("decograph.frontends").joinpath("strategies")
    out: dict[str, Traversable] = {}
    for entry in folder.iterdir():
        stem, dot, suffix = entry.name.rpartition(".")
        if dot and "." + suffix in FORMATS and entry.is_file():
            out[stem] = entry
    return out


def builtin_names() -> list[str]:
    """The names of the built-in strategies, sorted."""
    return sorted(_builtins())


def builtin_path(name: str) -> Traversable:
    """The packaged file of built-in strategy ``name`` (a ``pathlib.Path`` for an installed or
    source-tree package). Unknown names raise ``StrategyFileError`` listing the built-ins."""
    files = _builtins()
    if name not in files:
        raise StrategyFileError(f"unknown built-in strategy {name!r}; built-in strategies: {', '.join(sorted(files))}")
    return files[name]


def list_strategies() -> list[tuple[str, str]]:
    """``(name, description)`` of every built-in strategy, sorted by name (each one is loaded
    and verified, so a broken built-in fails here)."""
    return sorted((s.name, s.description) for s in map(load_strategy, builtin_names()))


def load_strategy(name_or_path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Strategy:
    """A built-in strategy by name (``source`` is ``builtin:NAME``), or a strategy file by path
    (anything ending in .yaml/.yml/.toml or containing a path separator). ``overrides``
    replace the strategy's params. Raises ``StrategyFileError``."""
    files = _builtins()
    if isinstance(name_or_path, str) and name_or_path in files:
        entry = files[name_or_path]
        fmt = FORMATS["." + entry.name.rpartition(".")[2]]
        try:
            text = entry.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StrategyFileError(f"{entry.name}: cannot read the built-in strategy: {exc}") from None
        return load_strategy_text(text, entry.name, fmt, overrides, source=f"builtin:{name_or_path}")
    text_name = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if isinstance(text_name, str) and (text_name.lower().endswith(tuple(FORMATS)) or "/" in text_name or os.sep in text_name):
        return load_strategy_file(text_name, overrides)
    raise StrategyFileError(f"unknown strategy {name_or_path!r}; built-in strategies: {', '.join(sorted(files))}; "
                            "or give the path of a .yaml, .yml or .toml file")
