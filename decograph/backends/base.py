"""The backend protocol: what a backend declares and how a program runs on it.

Every backend runs the runtime's one interpreter (``decograph.runtime``): the control flow,
drafting, verification and fork/join rules are the runtime's; the backend executes the step
protocol (``decograph.runtime.protocol``): a batch's forward (per row its query tokens,
positions and a tree of parent pointers) and the cache operations (keep the accepted slots,
roll back, fork, free), owning the KV storage. ``engine(adapter, config)`` returns the
backend's ``Engine``; the default is the torch engine over the (prepared) adapter, with the
backend's *kernel slots* as accelerations of its protocol calls:

    class MyBackend(Backend):
        name = "mine"
        description = "numpy greedy verification"
        devices = ("cpu",)
        def kernels(self): return {"verify.greedy": my_verify}

A backend that runs the model on its own device overrides ``engine`` (see the ONNX Runtime
backends, and ``tests/plugin_example`` for an out-of-tree one).

Kernel slots (signatures; tensors on the model's device):

- ``verify.greedy(logits [N, V], tokens [N], parents [N]) -> (argmax [N], ok [N] bool)``:
  node 0 is the root (the last committed token; its ``tokens``/``parents`` entries are
  ignored), ``parents[i] < i`` for the others; ``ok[i]``: node i's token equals the argmax
  after its parent and its parent is ok (the root is ok).
- ``unmask.confidence(logits [M, V], mask_id) -> (confidence [M], token [M])``: the max
  softmax probability and the argmax, the mask token excluded.
- ``kv.compact(cache [R, S, W], row, keep [K]) -> None``: moves slots ``keep`` (ascending)
  of cache row ``row`` to slots ``0..K-1`` in place.
- ``attention``: the model's attention under a structural tree / packed mask (backends that
  provide it install it into the model; see the Triton backend).

A program op is *native* on a backend when its ``ops`` lists the op's name; the names a
kernel slot serves are in ``SLOT_OPS``.
"""
from __future__ import annotations

import warnings
from abc import ABC
from typing import Any, Callable, ClassVar

from decograph.ir import ops as O

__all__ = ["Backend", "BackendFallbackWarning", "KERNEL_SLOTS", "SLOT_OPS", "HOST_OPS", "plan"]

KERNEL_SLOTS = ("attention", "verify.greedy", "unmask.confidence", "kv.compact")
SLOT_OPS = {"attention": ("forward",), "verify.greedy": ("verify.greedy",),
            "unmask.confidence": ("unmask.threshold", "unmask.factor", "unmask.topk_per_step")}
# host-side steps every backend runs itself: control flow, and drafting (n-gram lookups on the host)
HOST_OPS = ("prefill", "iterate", "yield", "emit", "commit", "fork", "join")


class BackendFallbackWarning(UserWarning):
    """An op of the program runs on the torch reference because the backend has no kernel."""


class Backend(ABC):
    """Base of every backend (built-in or plugin)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    masks: ClassVar[tuple[str, ...]] = O.MASKS

    def kernels(self) -> dict[str, Callable[..., Any]]:
        """Kernel slot -> function (see the module docstring); none: everything falls back."""
        return {}

    def available(self) -> str | None:
        """None when the backend can run here, else why not (a missing package, no GPU)."""
        return None

    def prepare(self, adapter: Any) -> Any:
        """The model adapter to run on (a backend that runs the model elsewhere, such as ONNX
        Runtime, returns its own); default: ``adapter`` unchanged."""
        return adapter

    def engine(self, adapter: Any, config: Any) -> Any:
        """This backend's side of the step protocol (a ``decograph.runtime.protocol.Engine``)
        for ``adapter`` (as ``prepare`` returned it) and the run's ``RunConfig``, which it may
        adjust (its cost curve, whether drafts run). Default: the torch engine over the
        adapter (its canvas engine for a masked-diffusion model), this backend's kernels
        accelerating its calls."""
        from decograph.backends.torch_ref.step import TorchEngine
        from decograph.models.diffusion import MaskedDiffusionAdapter

        if isinstance(adapter, MaskedDiffusionAdapter):
            from decograph.backends.torch_ref.canvas import TorchCanvasEngine

            return TorchCanvasEngine(adapter, self.kernels(), config.pad_token_id)
        from decograph.models.diffusion_gemma import DiffusionGemmaAdapter

        if isinstance(adapter, DiffusionGemmaAdapter):
            from decograph.backends.torch_ref.denoise import TorchNoiseEngine

            return TorchNoiseEngine(adapter)

        return TorchEngine(adapter, self.kernels(), config.cost_curve, config.tokenizer)

    def draft_runner(self, model: Any) -> Any:
        """The runner of ``draft.model`` for ``model`` (a causal LM, or a runner already):
        default, the torch draft runner."""
        from decograph.backends.torch_ref.interp import draft_runners

        return draft_runners({"draft": model})["draft"]

    def interpreter(self, program: Any, adapter: Any, config: Any) -> Any:
        """The runtime's interpreter for ``program`` on this backend."""
        from decograph.runtime.interp import Interpreter

        return Interpreter(program, self.engine(adapter, config), config)

    @property
    def ops(self) -> frozenset[str]:
        """The IR ops this backend runs natively: the control ops plus those its kernels serve."""
        served = {name for slot in self.kernels() for name in SLOT_OPS.get(slot, ())}
        return frozenset(HOST_OPS) | served

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "devices": list(self.devices),
                "kernels": sorted(self.kernels()), "masks": list(self.masks), "available": self.available()}


def plan(backend: Backend, program: O.Program, *, warn: bool = True) -> dict[str, str]:
    """Op name -> ``"native"`` or ``"fallback"`` for every op in ``program``; each fallback op
    gives one ``BackendFallbackWarning`` (when ``warn``)."""
    out: dict[str, str] = {}
    native = backend.ops
    for op in program.walk():
        name = op.NAME
        if name in out:
            continue
        out[name] = "native" if name in native or name.startswith("draft.") else "fallback"
        if out[name] == "fallback" and warn:
            warnings.warn(f"backend {backend.name!r} has no kernel for `{name}`: it runs on the torch reference",
                          BackendFallbackWarning, stacklevel=3)
    return out
