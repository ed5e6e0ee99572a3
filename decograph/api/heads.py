"""Draft heads for a program's ``draft.head`` ops, bound to a torch model.

``head_runners(program, adapter, given)`` returns ``RunConfig.draft_heads``: for each head name
the program uses, the runner the caller passed (``generate(..., draft_heads={NAME: runner})``)
or the model's own head, found by ``decograph.heads.store.resolve_head`` (a file path, or
``default``: the shipped head for the model's fingerprint, else the one ``decograph
train-draft`` cached) and bound over the model's input embedding and LM head (the torch
backend's ``TorchHead``: ``NumpyHead``'s math, on int8 weights: a head call costs a third to a
fifth of the float32 one, and drafts never change the output). Bound once per model (kept on its
adapter).
A model without a head gets ``resolve_head``'s ``ModelError``, which says how to train one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from decograph.errors import UnsupportedError
from decograph.ir import ops as O

__all__ = ["head_runners", "model_head", "model_name"]


def _numpy(weight: Any) -> np.ndarray:
    return weight.detach().to("cpu").float().numpy()


def model_name(model: Any) -> str:
    """A readable name of a Hugging Face model, for messages."""
    return (getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
            or type(model).__name__)


def model_head(adapter: Any, spec: str) -> Any:
    """The head ``spec`` names for ``adapter``'s model, bound to its weights (the torch
    backend's ``TorchHead``: ``NumpyHead``'s math on torch's threads, int8 weights); cached on
    the adapter."""
    from decograph.backends.torch_ref.head import bind_torch_head
    from decograph.heads.store import model_fingerprint, resolve_head

    model = getattr(adapter, "model", None)
    if model is None or not hasattr(model, "get_input_embeddings"):
        raise UnsupportedError(f"draft.head(head={spec}) needs a Hugging Face causal LM to bind its head to "
                               f"(got {type(adapter).__name__}); or pass draft_heads={{'{spec}': runner}}")
    cache = adapter.__dict__.setdefault("_draft_heads", {})
    if spec not in cache:
        if getattr(adapter, "_head_fingerprint", None) is None:
            adapter._head_fingerprint = model_fingerprint(model.config, _numpy(model.get_input_embeddings().weight))
        cache[spec] = bind_torch_head(resolve_head(spec, adapter._head_fingerprint, model_name(model)), model,
                                      quant="int8")
    return cache[spec]


def head_runners(program: O.Program, adapter: Any, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``RunConfig.draft_heads`` for ``program`` on ``adapter``'s model (``given`` runners first)."""
    out = dict(given or {})
    for op in program.walk():
        if isinstance(op, O.DraftHead) and op.head not in out:
            out[op.head] = model_head(adapter, op.head)
    return out
