"""The model a tool's ``--model`` names, for ``decograph run``/``ner``, ``bench`` and ``viz``.

    adapter, tok, name = load_model(None)        # the embedded default model
    adapter, tok, name = load_model("mdm")       # the model `decograph train-mdm` trained
    adapter, tok, name = load_model("path/to/hf-model-dir")

It sits with the apps because ``"mdm"`` is the training app's checkpoint; the tools above
(bench, viz, cli) share it instead of importing one another's helpers. transformers and torch
are imported only when a model loads.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

from decograph.errors import ModelError

__all__ = ["load_model", "quiet_loading"]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bars (the one-time conversion note stays)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(model_dir: str | None) -> tuple[Any, Any, str]:
    """The adapter, tokenizer and display name of ``--model``: the embedded default when None,
    ``"mdm"`` for the model ``decograph train-mdm`` trained, else a local Hugging Face causal-LM
    or masked-diffusion model directory. ``ModelError`` names what is missing."""
    from decograph.api import resolve_model

    if model_dir is None:
        from decograph.models.default import DEFAULT_MODEL_NAME, default_model_path

        default_model_path()  # converts the wheel's GGUF once, with a note on stderr
        with quiet_loading():
            adapter, tok = resolve_model(None)
        return adapter, tok, DEFAULT_MODEL_NAME
    if model_dir == "mdm":              # the masked-diffusion model `decograph train-mdm` trained
        from decograph.apps.train_mdm import trained_mdm_dir

        path = trained_mdm_dir()
        if not (path / "train.json").is_file():
            raise ModelError(f"--model mdm: no trained model at {path}; run `decograph train-mdm` first")
        model_dir = str(path)
    from decograph.models.packaged import packaged_model_path

    packaged = None if os.path.isdir(model_dir) else packaged_model_path(model_dir)  # converts once, noted on stderr
    if packaged is not None:
        with quiet_loading():
            adapter, tok = resolve_model(str(packaged))
        return adapter, tok, model_dir
    if not os.path.isdir(model_dir):
        raise ModelError(f"--model {model_dir}: no such directory; give a local Hugging Face model directory")
    with quiet_loading():
        adapter, tok = resolve_model(model_dir)
    return adapter, tok, model_dir
