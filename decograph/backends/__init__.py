"""Backends: the protocol (``Backend``), the registry (built-ins and ``decograph.backends``
entry-point plugins), the torch reference and the Triton kernels.

    from decograph.backends import Backend, get_backend, registry
"""
from __future__ import annotations

from decograph.backends.base import KERNEL_SLOTS, SLOT_OPS, Backend, BackendFallbackWarning, plan
from decograph.backends.registry import GROUP, discover, get_backend, registry

__all__ = ["Backend", "BackendFallbackWarning", "KERNEL_SLOTS", "SLOT_OPS", "plan", "GROUP", "discover",
           "get_backend", "registry"]
