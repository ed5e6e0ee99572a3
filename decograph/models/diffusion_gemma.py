"""transformers' ``DiffusionGemma`` (``DiffusionGemmaForBlockDiffusion``) as a decograph model:
a uniform-noise block-diffusion LM. Its encoder caches the committed tokens (the prompt, then
each committed canvas); its decoder denoises a canvas of ``config.canvas_length`` tokens after
them, bidirectionally, fed the last step's logits as a self-conditioning signal. decograph runs
it with the strategies built on ``draft.noise`` and ``unmask.entropy_bound`` (the built-in
``diffusion_gemma`` is transformers' own ``generate``), on the torch backend
(``decograph.backends.torch_ref.denoise``) and on the ``onnxruntime`` backend (its encoder and
decoder as ONNX graphs, ``decograph.backends.onnxruntime.noise``).

    adapter = DiffusionGemmaAdapter(model, tokenizer)      # a model object
    adapter = load_diffusion_model("path/to/dir")          # a directory (decograph.models.diffusion)
"""
from __future__ import annotations

from typing import Any

from decograph.errors import ModelError

__all__ = ["DIFFUSION_GEMMA_TYPE", "DiffusionGemmaAdapter", "is_diffusion_gemma"]

DIFFUSION_GEMMA_TYPE = "diffusion_gemma"


def is_diffusion_gemma(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == DIFFUSION_GEMMA_TYPE


class DiffusionGemmaAdapter:
    """What the runtime needs of a ``DiffusionGemmaForBlockDiffusion``: its vocabulary, canvas
    length, EOS and pad ids (the generation config's, else the text config's EOS), and the
    model for the backend's ``NoiseBatch``."""

    supports_kv = True          # its encoder cache: committed canvases are never recomputed
    shift_logits = False

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        if not is_diffusion_gemma(model) or not hasattr(model, "model") or not hasattr(model.model, "encoder"):
            raise ModelError(f"{type(model).__name__} is not a DiffusionGemmaForBlockDiffusion (config.model_type "
                             f"{getattr(getattr(model, 'config', None), 'model_type', None)!r})")
        cfg, text = model.config, model.config.text_config
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = type(model).__name__
        self.vocab_size = int(text.vocab_size)
        self.canvas_length = int(cfg.canvas_length)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = text.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        self.pad_token_id = getattr(gen, "pad_token_id", None)
        self.max_positions = int(getattr(text, "max_position_embeddings", 0) or 0)
