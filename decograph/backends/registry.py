"""The backend registry: built-in backends plus plugins from the entry point group
``decograph.backends``.

A plugin package declares, in its ``pyproject.toml``::

    [project.entry-points."decograph.backends"]
    mine = "my_package.backend:MyBackend"

and ``decograph backends`` lists it. A plugin that fails to import, is not a ``Backend``
subclass, cannot be constructed, or reuses a name already taken gets a named error in the
listing (``Registry.errors``); every other backend still loads.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

from decograph.backends.base import Backend
from decograph.errors import BackendError

__all__ = ["GROUP", "BUILTIN", "Registry", "discover", "get_backend", "registry"]

GROUP = "decograph.backends"
BUILTIN = {"torch": "decograph.backends.torch_ref.backend:TorchBackend",
           "triton": "decograph.backends.triton.backend:TritonBackend",
           "onnxruntime": "decograph.backends.onnxruntime.backend:OnnxRuntimeBackend",
           "onnxruntime-int4": "decograph.backends.onnxruntime.backend:OnnxRuntimeInt4Backend",
           "onnxruntime-int8": "decograph.backends.onnxruntime.backend:OnnxRuntimeInt8Backend"}


@dataclass
class Registry:
    backends: dict[str, Backend] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)          # name -> "built-in" or "plugin <dist>"
    errors: list[str] = field(default_factory=list)


def _load(value: str) -> Any:
    module, _, attr = value.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _add(reg: Registry, name: str, value: str, origin: str) -> None:
    where = f"backend {name!r} ({origin}, entry point {name} = {value!r})"
    try:
        cls = _load(value)
    except Exception as e:                                    # a broken plugin must not break the rest
        reg.errors.append(f"{where}: import failed: {type(e).__name__}: {e}")
        return
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        reg.errors.append(f"{where}: {value!r} is not a decograph.backends.Backend subclass")
        return
    try:
        backend = cls()
    except Exception as e:
        reg.errors.append(f"{where}: construction failed: {type(e).__name__}: {e}")
        return
    if backend.name != name:
        reg.errors.append(f"{where}: the class is named {backend.name!r}; the entry point must use that name")
        return
    if name in reg.backends:
        reg.errors.append(f"{where}: duplicate name, already provided by {reg.origin[name]}; skipped")
        return
    reg.backends[name], reg.origin[name] = backend, origin


def discover(entry_points: Iterable[Any] | None = None) -> Registry:
    """Built-ins, then every entry point of ``GROUP`` (default: the installed ones)."""
    reg = Registry()
    for name, value in BUILTIN.items():
        _add(reg, name, value, "built-in")
    eps = entry_points if entry_points is not None else metadata.entry_points(group=GROUP)
    for ep in sorted(eps, key=lambda e: (e.name, e.value)):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        _add(reg, ep.name, ep.value, f"plugin from {dist}")
    return reg


_REGISTRY: Registry | None = None


def registry(refresh: bool = False) -> Registry:
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = discover()
    return _REGISTRY


def get_backend(name: str | Backend) -> Backend:
    """The backend called ``name`` (a ``Backend`` instance passes through), ready to run here."""
    if isinstance(name, Backend):
        backend = name
    else:
        reg = registry()
        if name not in reg.backends:
            known = ", ".join(sorted(reg.backends))
            extra = "".join(f"\n  {e}" for e in reg.errors if f"backend {name!r}" in e)
            raise BackendError(f"unknown backend {name!r}; available: {known}{extra}")
        backend = reg.backends[name]
    why = backend.available()
    if why:
        raise BackendError(f"backend {backend.name!r} cannot run here: {why}")
    return backend
