"""The ``triton`` backend: Triton kernels for greedy verification, confidence unmasking and KV
compaction, and the model's attention under the structural tree / packed mask (installed into
Hugging Face models through transformers' attention registry), on a CUDA GPU or, under
``TRITON_INTERPRET=1``, on the CPU (Triton's interpreter: exact but slow, for tests). The
rest of a forward (embeddings, MLPs) is the model's own torch code. Ops without a kernel here
run on the torch reference (with a ``BackendFallbackWarning``): sampling and threshold
verification. ``kv.compact`` moves the kept slots when the runtime's slot cache compacts
(rarely with the default passes, whose rollback is in place; every step with rejected drafts
under ``rollback=copy``), in place in the cache's buffers."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

from decograph.backends.base import Backend

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1): tree attention, greedy verify, unmask"
    devices = ("cuda", "cpu-interpreter")

    def available(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install triton)"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU; set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter"
        return None

    def kernels(self) -> dict[str, Callable[..., Any]]:
        if importlib.util.find_spec("triton") is None:
            return {}
        from decograph.backends.triton import kernels as K

        return {"attention": K.tree_attention, "verify.greedy": K.verify_greedy,
                "unmask.confidence": K.unmask_confidence, "kv.compact": K.kv_compact}
