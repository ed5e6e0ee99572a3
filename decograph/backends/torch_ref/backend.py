"""The ``torch`` backend: the reference interpreter itself (every op native; its kernels are
the interpreter's own code, defined for other backends to match in ``torch_ref.kernels``)."""
from __future__ import annotations

from decograph.backends.base import Backend
from decograph.ir import ops as O

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    name = "torch"
    description = "torch reference: eager PyTorch on the model's device (CPU or CUDA); every op native"
    devices = ("cpu", "cuda")

    @property
    def ops(self) -> frozenset[str]:
        return frozenset(O.OPS)
