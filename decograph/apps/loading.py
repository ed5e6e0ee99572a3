"""The model a tool's ``--model`` names, for ``decograph run``/``ner``, ``bench`` and ``viz``.

    adapter, tok, name = load_model(None)        # the embedded default model
    adapter, tok, name = load_model("mdm")       # the model `decograph train-mdm` trained
    adapter, tok, name = load_model("path/to/hf-model-dir")
    adapter, tok, name = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")   # a Hub id (local HF cache first)

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


def load_model(model: str | None, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """The adapter, tokenizer and display name of ``--model``: the embedded default when None,
    ``"mdm"`` for the model ``decograph train-mdm`` trained, else what ``resolve_model`` takes
    (``decograph.models.hub.model_dir``): a local directory, a packaged model's name, or a
    Hugging Face Hub id ``org/name[@revision]`` (the local Hugging Face cache first; downloaded
    unless the Hub is offline). ``ModelError`` names what is missing."""
    from decograph.api import resolve_model

    if model is None:
        from decograph.models.default import DEFAULT_MODEL_NAME, default_model_path

        default_model_path()  # converts the wheel's GGUF once, with a note on stderr
        with quiet_loading():
            adapter, tok = resolve_model(None)
        return adapter, tok, DEFAULT_MODEL_NAME
    path: str | os.PathLike[str] = model
    if model == "mdm":                  # the masked-diffusion model `decograph train-mdm` trained
        from decograph.apps.train_mdm import trained_mdm_dir

        path = trained_mdm_dir()
        if not (path / "train.json").is_file():
            raise ModelError(f"--model mdm: no trained model at {path}; run `decograph train-mdm` first")
    from decograph.models.hub import model_dir

    path = model_dir(path)      # a packaged model converts once (noted on stderr); a Hub id may download
    with quiet_loading():
        adapter, tok = resolve_model(str(path), trust_remote_code=trust_remote_code)
    return adapter, tok, model
