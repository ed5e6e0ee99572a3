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

import warnings
from typing import Any

import numpy as np

from decograph.errors import ModelError, UnsupportedError
from decograph.ir import ops as O

__all__ = ["corpora", "head_runners", "model_corpus", "model_head", "model_name"]


def _numpy(weight: Any) -> np.ndarray:
    return weight.detach().to("cpu").float().numpy()


def model_name(model: Any) -> str:
    """A readable name of a Hugging Face model, for messages."""
    return (getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
            or type(model).__name__)


def _fingerprint(adapter: Any) -> str:
    from decograph.heads.store import model_fingerprint

    if getattr(adapter, "_head_fingerprint", None) is None:
        adapter._head_fingerprint = model_fingerprint(adapter.model.config,
                                                      _numpy(adapter.model.get_input_embeddings().weight))
    return adapter._head_fingerprint


def model_corpus(adapter: Any, spec: str) -> Any:
    """The corpus of the model's answers ``spec`` names (``resolve_corpus``: checked against the
    model's fingerprint; an adapter without a Hugging Face model, such as a test oracle, takes a
    corpus file as given), loaded once per model (kept on its adapter). ``default`` for a model
    that has none is an empty corpus (it drafts nothing), with a warning that says how to get one."""
    from decograph.heads.corpus import build_corpus, load_corpus
    from decograph.heads.store import resolve_corpus

    cache = adapter.__dict__.setdefault("_corpora", {})
    if spec not in cache:
        model = getattr(adapter, "model", None)
        hf = model is not None and hasattr(model, "get_input_embeddings")
        try:
            if hf:
                cache[spec] = resolve_corpus(spec, _fingerprint(adapter), model_name(model))
            elif spec and spec != "default":
                cache[spec] = load_corpus(spec)
            else:
                raise ModelError(f"no corpus of answers for {type(adapter).__name__} (not a Hugging Face model): "
                                 f"name a corpus file with corpus=PATH")
        except ModelError as e:
            if spec not in ("", "default") or "no corpus" not in str(e):
                raise
            warnings.warn(f"{e}; draft.corpus drafts nothing meanwhile", RuntimeWarning, stacklevel=4)
            cache[spec] = build_corpus([], int(adapter.vocab_size), _fingerprint(adapter) if hf else "",
                                       model_name(model) if hf else "")
    return cache[spec]


def corpora(program: O.Program, adapter: Any) -> dict[str, Any]:
    """``RunConfig.corpora`` for ``program``'s ``draft.corpus`` ops on ``adapter``'s model."""
    return {op.corpus: model_corpus(adapter, op.corpus) for op in program.walk() if isinstance(op, O.DraftCorpus)}


def model_head(adapter: Any, spec: str) -> Any:
    """The head ``spec`` names for ``adapter``'s model, bound to its weights (the torch
    backend's ``TorchHead``: ``NumpyHead``'s math on torch's threads, int8 weights); cached on
    the adapter."""
    from decograph.backends.torch_ref.head import bind_torch_head
    from decograph.heads.store import resolve_head

    model = getattr(adapter, "model", None)
    if model is None or not hasattr(model, "get_input_embeddings"):
        raise UnsupportedError(f"draft.head(head={spec}) needs a Hugging Face causal LM to bind its head to "
                               f"(got {type(adapter).__name__}); or pass draft_heads={{'{spec}': runner}}")
    cache = adapter.__dict__.setdefault("_draft_heads", {})
    if spec not in cache:
        cache[spec] = bind_torch_head(resolve_head(spec, _fingerprint(adapter), model_name(model)), model,
                                      quant="int8")
    return cache[spec]


def head_runners(program: O.Program, adapter: Any, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``RunConfig.draft_heads`` for ``program`` on ``adapter``'s model (``given`` runners first)."""
    out = dict(given or {})
    for op in program.walk():
        if isinstance(op, O.DraftHead) and op.head not in out:
            out[op.head] = model_head(adapter, op.head)
    return out
