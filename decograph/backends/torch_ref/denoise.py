"""The torch backend's uniform-noise diffusion engine: a ``DiffusionGemmaAdapter``'s model
behind the runtime's ``NoiseBatch`` protocol (``decograph.runtime.denoise`` runs the rule).

The model is called as transformers' ``DiffusionGemma`` ``generate`` calls it: prompts
left-padded with an attention mask and positions shared by the batch, the encoder over the
uncached tokens into a ``DynamicCache``, the decoder over the canvas with the model's own
bidirectional decoder mask and the last step's logits (at their temperature) as
self-conditioning. Random draws use torch's global generator in transformers' shapes and
order (``randint`` for a canvas and each renoising, one ``multinomial`` over the batch's
positions per step), so a seeded run takes transformers' draws.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from decograph.errors import UnsupportedError
from decograph.runtime.protocol import Engine, NoiseBatch, NoiseStep

__all__ = ["TorchNoiseEngine", "TorchNoiseBatch", "TorchNoiseStep"]


class TorchNoiseStep(NoiseStep):
    def __init__(self, batch: TorchNoiseBatch, logits: torch.Tensor) -> None:
        self.batch, self.logits = batch, logits
        self._t: float | None = None
        self._processed: torch.Tensor | None = None

    def processed(self, temperature: float) -> torch.Tensor:
        if self._t != temperature:
            self._t = temperature
            self._processed = self.logits / torch.tensor(temperature, dtype=torch.float32)
        assert self._processed is not None
        return self._processed

    def entropy(self, temperature: float) -> np.ndarray:
        return torch.distributions.Categorical(logits=self.processed(temperature)).entropy().numpy()

    def argmax(self, temperature: float) -> np.ndarray:
        return torch.argmax(self.processed(temperature), dim=-1).numpy()

    def confidence(self, temperature: float) -> np.ndarray:
        return torch.softmax(self.processed(temperature), dim=-1, dtype=torch.float32).amax(-1).numpy()

    def sample(self, temperature: float) -> np.ndarray:
        p = self.processed(temperature)
        b, n, v = p.shape
        probs = torch.softmax(p, dim=-1, dtype=torch.float32)
        return torch.multinomial(probs.view(-1, v), num_samples=1).squeeze(-1).view(b, n).numpy()

    def condition(self, keep: np.ndarray) -> None:
        assert self._t is not None, "condition() before the step's temperature was asked"
        new = self.processed(self._t)
        old = self.batch.signal
        if old is not None and keep.any():
            new = torch.where(torch.from_numpy(keep)[:, None, None], old, new)
        self.batch.signal = new.to(self.batch.model.model.decoder.embed_tokens.weight.dtype)


class TorchNoiseBatch(NoiseBatch):
    def __init__(self, adapter: Any, prompts: list[list[int]]) -> None:
        from transformers import DynamicCache

        self.adapter, self.model = adapter, adapter.model
        self.canvas_length, self.vocab_size = adapter.canvas_length, adapter.vocab_size
        self.pad_id = adapter.pad_token_id
        b, width = len(prompts), max(len(p) for p in prompts)
        fill = self.pad_id if self.pad_id is not None else 0
        ids = torch.full((b, width), fill, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.bool)
        for i, p in enumerate(prompts):                     # left padding, as transformers' batches
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = True
        self.ids, self.mask = ids, mask
        self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        self.length = width
        self.signal: torch.Tensor | None = None
        self._encode(ids, prefill=True)

    def _encode(self, ids: torch.Tensor, prefill: bool) -> None:
        m, n = self.model, ids.shape[1]
        pos = torch.arange(self.length - n, self.length, dtype=torch.int32).unsqueeze(0)
        with torch.inference_mode():
            uncached, enc_mask = m._prepare_encoder_inputs(input_ids=self.ids, attention_mask=self.mask,
                                                           encoder_position_ids=pos, cache=self.cache,
                                                           is_prefill=prefill, canvas_length=self.canvas_length,
                                                           batch_size=self.ids.shape[0])
            self.cache = m.model.encoder(input_ids=uncached, attention_mask=enc_mask, cache=self.cache,
                                         position_ids=pos).cache
            dec_mask = torch.nn.functional.pad(self.mask, (0, self.canvas_length), value=True)
            dummy = torch.zeros((self.ids.shape[0], self.canvas_length, 1), dtype=torch.long)
            self.dec_mask = m.model.decoder.create_diffusion_decoder_attention_mask(
                config=m.config, inputs_embeds=dummy, cache=self.cache, decoder_attention_mask=dec_mask)
        self.dec_pos = torch.arange(self.length, self.length + self.canvas_length, dtype=torch.int32).unsqueeze(0)

    def noise(self) -> np.ndarray:
        return torch.randint(low=0, high=self.vocab_size, size=(self.ids.shape[0], self.canvas_length)).numpy()

    def forward(self, canvas: np.ndarray) -> TorchNoiseStep:
        with torch.inference_mode():
            logits = self.model(decoder_input_ids=torch.from_numpy(np.ascontiguousarray(canvas)),
                                self_conditioning_logits=self.signal, decoder_attention_mask=self.dec_mask,
                                cache=self.cache, decoder_position_ids=self.dec_pos).logits
        return TorchNoiseStep(self, logits)

    def append(self, canvas: np.ndarray) -> None:
        new = torch.from_numpy(np.ascontiguousarray(canvas)).long()
        self.ids = torch.cat([self.ids, new], dim=-1)
        self.mask = torch.nn.functional.pad(self.mask, (0, self.canvas_length), value=True)
        self.length += self.canvas_length
        self.signal = None
        self._encode(new, prefill=False)


class TorchNoiseEngine(Engine):
    """Uniform-noise diffusion batches over a ``DiffusionGemmaAdapter``."""

    denoiser = True

    def __init__(self, adapter: Any) -> None:
        self.adapter, self.tokenizer = adapter, adapter.tokenizer
        self.max_positions, self.name = adapter.max_positions, adapter.name

    def start(self, rows: list[Any]) -> Any:
        raise UnsupportedError(f"{self.name} is a uniform-noise diffusion model: it runs draft.noise strategies "
                               f"only (the built-in diffusion_gemma)")

    def start_noise(self, prompts: list[list[int]]) -> TorchNoiseBatch:
        return TorchNoiseBatch(self.adapter, prompts)
