"""Program-to-program rewrites and the pass manager.

Passes are registered by kebab-case name with lazy loaders; a pipeline is a string of
comma-separated names with optional ``{key=value,...}`` options:

    canonicalize,speculative-batching{candidates=4},mask-fusion,cache-reuse,auto-tune

``DEFAULT_PIPELINES`` holds each backend's default; ``run_pipeline`` parses, runs and returns
the optimized program with the manager's per-pass report.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

from decograph.errors import PassError

__all__ = ["PASSES", "DEFAULT_PIPELINES", "get_pass", "parse_pipeline", "run_pipeline", "pass_names"]


def _lazy(module: str, cls: str) -> Callable[[], type]:
    return lambda: getattr(importlib.import_module(f"decograph.passes.{module}"), cls)


PASSES: dict[str, Callable[[], type]] = {
    "canonicalize": _lazy("canonicalize", "Canonicalize"),
    "speculative-batching": _lazy("speculative_batching", "SpeculativeBatching"),
    "mask-fusion": _lazy("mask_fusion", "MaskFusion"),
    "cache-reuse": _lazy("cache_reuse", "CacheReuse"),
    "auto-tune": _lazy("auto_tune", "AutoTune"),
}

# Why this order: tuning first sizes (or drops) drafts, canonicalize removes dead ones;
# batching widens what is left into candidate trees; fusion then makes each step one forward;
# cache reuse keeps the accepted KV that fused forward computed; a last clean-up.
DEFAULT_PIPELINES: dict[str, str] = {
    "torch": "auto-tune,canonicalize,speculative-batching,mask-fusion,cache-reuse,canonicalize",
}


def pass_names() -> list[str]:
    return sorted(PASSES)


def get_pass(name: str, **options: Any) -> Any:
    """An instance of the pass registered as ``name`` (an unknown name lists the known ones)."""
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}; known passes: {', '.join(pass_names())}")
    cls = PASSES[name]()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PassError(f"pass {name!r} has no option {key!r} (options: {known})")
    return cls(**options)


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def _value(text: str, kind: Any) -> Any:
    text = text.strip()
    if kind in (bool, "bool"):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() == "true"
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    return text


def parse_pipeline(text: str) -> list[Any]:
    """Pass instances from ``name{key=value,...},name,...``; errors name the item at fault."""
    text = text.strip()
    if text in ("", "none"):
        return []
    out, pos = [], 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PassError(f"pipeline {text!r}: cannot read a pass at column {pos + 1}: {text[pos:]!r}")
        name, opts = m.group(1), m.group(2)
        if name not in PASSES:
            raise PassError(f"pipeline {text!r}: unknown pass {name!r}; known passes: {', '.join(pass_names())}")
        fields = {f.name: f.type for f in dataclasses.fields(PASSES[name]())}
        options: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in (opts or "").split(","))):
            key, sep, val = item.partition("=")
            key = key.strip()
            if not sep:
                raise PassError(f"pipeline {text!r}: pass {name!r}: option {item!r} needs a value ({key}=...)")
            if key in options:
                raise PassError(f"pipeline {text!r}: pass {name!r}: option {key!r} given twice")
            if key not in fields:
                raise PassError(f"pipeline {text!r}: pass {name!r} has no option {item!r} "
                                f"(options: {', '.join(fields) or 'none'})")
            try:
                options[key] = _value(val, fields[key])
            except ValueError as exc:
                raise PassError(f"pipeline {text!r}: {name}{{{key}}}: {exc}") from None
        out.append(get_pass(name, **options))
        pos = m.end()
    return out


def run_pipeline(program: Any, pipeline: str | None = None, context: Any = None,
                 instruments: tuple[Any, ...] = ()) -> tuple[Any, list[Any]]:
    """(optimized program, per-pass report); ``pipeline`` None means the torch default."""
    from decograph.passes.manager import PassContext, PassManager

    ctx = context or PassContext()
    text = DEFAULT_PIPELINES.get(ctx.backend, DEFAULT_PIPELINES["torch"]) if pipeline in (None, "default") else pipeline
    pm = PassManager(parse_pipeline(text), ctx, instruments)
    return pm.run(program), pm.report
