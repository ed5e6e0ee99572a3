"""What a server serves: a model with its tokenizer, chat template and strategy, behind one
small interface over an in-process ``decograph.api.Decoder`` (any backend) or an exported
decoder directory (``decograph.exported.ExportedDecoder``, no torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable

from decograph.chat import check_messages, render_chat
from decograph.errors import InputError
from decograph.runtime import Interpreter, RunConfig

__all__ = ["ServedModel", "lane_key", "load_served", "row_sampling"]


def lane_key(temperature: float | None, top_p: float, seed: int | None, request_id: str) -> Hashable:
    """Which lane a request decodes in: the strategy as written (greedy for the lossless
    built-ins), whose rows may carry their own sampling parameters (``row_sampling``), unless
    the request is seeded: then alone in a lane of its own, sampling at (temperature, top_p),
    so that its random stream is its own."""
    if not temperature or seed is None:
        return "greedy"
    return ("seeded", float(temperature), float(top_p), int(seed), request_id)


def row_sampling(temperature: float | None, top_p: float, seed: int | None) -> Any:
    """The row's own verification in the shared lane: sampling at (temperature, top_p) for an
    unseeded sampling request; None (the strategy as written) otherwise."""
    if not temperature or seed is not None:
        return None
    from decograph.runtime.verify import RowSampling

    return RowSampling(float(temperature), float(top_p))


class ServedModel:
    """``name``; ``encode``/``decode``; ``chat(messages)`` (the model's own template);
    ``max_positions`` (0: unbounded); ``interpreter(lane, config)`` for the scheduler;
    ``continuous``: whether its program can take requests into a running batch."""

    def __init__(self, name: str, decoder: Any, *, tokenizer: Any, template: str | None, bos: str, eos: str,
                 hf_tokenizer: Any = None, exported: bool = False) -> None:
        self.name, self.decoder, self.tokenizer, self.template = name, decoder, tokenizer, template
        self.bos, self.eos, self.hf_tokenizer, self.exported = bos, eos, hf_tokenizer, exported
        self.max_positions = int(getattr(decoder, "max_positions", 0) or 0)
        self.program = decoder.program
        from decograph.ir import ops as O

        self.continuous = not any(isinstance(op, (O.Fork, *O.UNMASK_OPS)) for op in self.program.walk())
        self._programs: dict[Hashable, Any] = {}

    # -- text -----------------------------------------------------------------------------

    def encode(self, text: str, special: bool = True) -> list[int]:
        """A completion prompt's ids, with the tokenizer's own special tokens (Gemma's ``<bos>``)
        as ``tokenizer(text)`` gives them; ``special=False`` for a rendered chat template,
        which writes its special tokens itself."""
        if self.exported:
            return list(self.tokenizer.encode(text, add_special_tokens=special).ids)
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, messages: Any) -> list[int]:
        msgs = check_messages(messages)
        if not self.template:
            raise InputError(f"model {self.name!r} has no chat template: use /v1/completions with a prompt")
        return self.encode(render_chat(self.template, msgs, bos_token=self.bos, eos_token=self.eos), special=False)

    # -- decoding -------------------------------------------------------------------------

    def program_for(self, lane: Hashable) -> Any:
        if lane == "greedy":
            return self.program
        _, temperature, top_p = lane[:3]
        key = (temperature, top_p)
        if key not in self._programs:
            self._programs[key] = self.decoder.sampling_program(temperature, top_p)
        return self._programs[key]

    def lane_context(self) -> Any:
        """What a lane thread runs its interpreter under: torch's inference mode in process."""
        if self.exported:
            return None
        import torch

        return torch.inference_mode

    def interpreter(self, lane: Hashable, config: RunConfig) -> Interpreter:
        if isinstance(lane, tuple) and lane[0] == "seeded":
            config.seed = lane[3]
        return self.decoder.interpreter(config, self.program_for(lane))


def _special(tokenizer: Any, ids: Any) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=False) if ids else ""
    except Exception:                       # noqa: BLE001 -- a template without it still renders
        return ""


def load_served(*, model: str | None = None, exported: str | None = None, strategy: str | None = None,
                backend: str = "torch", name: str | None = None, threads: int | None = None) -> ServedModel:
    """The model a ``serve`` command names: an exported decoder directory (torch never
    imported; ``strategy`` None: the one it was exported with), else ``model`` (a Hugging Face
    directory or Hub id, default the embedded SmolLM2-135M-Instruct) on ``backend`` with
    ``strategy`` (default ``anpd``)."""
    if exported is not None:
        from decograph.exported import ExportedDecoder

        dec = ExportedDecoder(exported, threads=threads)
        if strategy:                        # another strategy than the one exported with it
            from decograph.frontends.strategies import load_strategy

            dec = dec.with_program(load_strategy(strategy).program)
        m = dec.manifest
        dec.max_positions = m.target.max_positions
        eos = sorted(dec.eos)
        return ServedModel(name or m.model or Path(exported).name, dec, tokenizer=dec.tokenizer,
                           template=m.chat_template, bos="", eos=_special(dec.tokenizer, eos[:1]), exported=True)
    from decograph.api import Decoder

    if threads:
        import torch

        torch.set_num_threads(threads)
    dec = Decoder(model, None, strategy or "anpd", backend=backend)
    tok = dec.tokenizer
    if tok is None:
        raise InputError(f"model {model!r} has no tokenizer: a server needs one to read prompts")
    template = getattr(tok, "chat_template", None)
    return ServedModel(name or (Path(model).name if model else "SmolLM2-135M-Instruct"), dec, tokenizer=tok,
                       template=template if isinstance(template, str) else None,
                       bos=getattr(tok, "bos_token", None) or "", eos=getattr(tok, "eos_token", None) or "",
                       hf_tokenizer=tok)
