"""decograph as a transformers ``custom_generate``: ``model.generate`` decodes with a strategy.

    from decograph.hf_generate import CUSTOM_GENERATE_DIR, custom_generate
    out = model.generate(**inputs, custom_generate=custom_generate, strategy="anpd", max_new_tokens=64)
    out = model.generate(**inputs, custom_generate=str(CUSTOM_GENERATE_DIR), trust_remote_code=True,
                         tokenizer=tok, stop_strings=["\\n\\n"], strategy="anpd")

Both return what ``generate`` returns: the prompt ids (padding as given) followed by the new
ids, rows that finished early padded with ``pad_token_id`` (the ``GenerationConfig``'s, else
its first EOS id), or with ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput``
with ``.sequences``. The model's ``GenerationConfig`` and the call's overrides are honoured:
``max_new_tokens`` / ``max_length``, EOS lists, ``pad_token_id``, ``stop_strings``,
``do_sample`` with ``temperature`` / ``top_k`` / ``top_p``, ``num_return_sequences`` (with
sampling), streamers; padded batches (``attention_mask``, left or right) decode each row as if
alone. What decograph does not do (beam search, penalties, scores, ...) is an
``UnsupportedError`` naming the option, never silently ignored.

Two forms, as transformers 5.25 calls them:

- the callable ``custom_generate``: transformers prepares the generation config, the length
  and the stopping criteria, then calls it with the (expanded) ``input_ids``. It hands a custom
  function neither the tokenizer nor the streamer, so ``stop_strings`` fail inside
  transformers before decograph runs; the streamer is read from transformers' own frame.
- the directory ``CUSTOM_GENERATE_DIR`` (``custom_generate/generate.py``, which imports
  ``generate`` below; ``trust_remote_code=True`` as for any such directory): called with the
  arguments of ``generate`` as given, the tokenizer and the streamer included.
  ``install_custom_generate(model_dir)`` writes the same file into a model directory, so
  ``from_pretrained(model_dir, trust_remote_code=True)`` makes decograph its ``generate``.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from decograph.api import generate as decode
from decograph.errors import InputError, UnsupportedError

__all__ = ["CUSTOM_GENERATE_DIR", "custom_generate", "generate", "install_custom_generate"]

CUSTOM_GENERATE_DIR = Path(__file__).resolve().parent     # holds custom_generate/generate.py

# GenerationConfig options decograph does not honour, with the value that means "off"
# (None is off for each too): a call that sets one is refused rather than decoded without it.
_OFF: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None, "dola_layers": None,
    "constraints": None, "force_words_ids": None, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_new_tokens": None,
    "min_length": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
    "top_h": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "watermarking_config": None, "token_healing": False, "max_time": None,
    "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "use_mtp": False, "output_scores": False,
    "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "remove_invalid_values": False,
}
_WHY = {"num_beams": "beam search is not a decograph strategy",
        "prompt_lookup_num_tokens": "prompt lookup is decograph's strategy='ngram'",
        "output_scores": "decograph returns ids, not per-step scores",
        "output_logits": "decograph returns ids, not per-step logits"}
_PROCESSORS = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"}
_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria"}


def custom_generate(model: Any, input_ids: torch.Tensor, logits_processor: Any = None, stopping_criteria: Any = None,
                    generation_config: Any = None, synced_gpus: bool = False, streamer: Any = None, *,
                    strategy: Any = "anpd", passes: str | None = "default", backend: Any = "torch",
                    overrides: dict[str, Any] | None = None, seed: int | None = None,
                    **model_kwargs: Any) -> Any:
    """The callable form: ``model.generate(..., custom_generate=custom_generate, strategy=...)``.
    transformers has prepared ``generation_config`` (length, EOS, padding), expanded the rows for
    ``num_return_sequences`` and put the prompt into the streamer; the decograph options
    (``strategy``, ``passes``, ``backend``, ``overrides``, ``seed``) are keywords of the call."""
    _check(generation_config, model_kwargs)
    names = [type(p).__name__ for p in logits_processor or []] + [type(c).__name__ for c in stopping_criteria or []]
    odd = [n for n in names if n not in _PROCESSORS | _CRITERIA]
    if odd:
        raise UnsupportedError(f"custom_generate (decograph): {odd[0]} (from a generation option or "
                               "logits_processor/stopping_criteria/prefix_allowed_tokens_fn) is not supported")
    streamer = streamer if streamer is not None else _streamer_of_caller()
    return _run(model, input_ids, model_kwargs.get("attention_mask"), generation_config, None,
                _AfterPrompt(streamer) if streamer is not None else None,
                dict(strategy=strategy, passes=passes, backend=backend, overrides=overrides, seed=seed))


def generate(model: Any, inputs: torch.Tensor | None = None, generation_config: Any = None,
             logits_processor: Any = None, stopping_criteria: Any = None, prefix_allowed_tokens_fn: Any = None,
             synced_gpus: bool | None = None, assistant_model: Any = None, streamer: Any = None,
             negative_prompt_ids: Any = None, negative_prompt_attention_mask: Any = None, *,
             strategy: Any = "anpd", passes: str | None = "default", backend: Any = "torch",
             overrides: dict[str, Any] | None = None, seed: int | None = None, tokenizer: Any = None,
             **kwargs: Any) -> Any:
    """The directory form (``custom_generate/generate.py``): ``generate``'s own arguments, as
    the caller gave them. The generation config is merged as transformers merges it (the
    model's, then the call's ``generation_config``, then keyword overrides)."""
    given = {"logits_processor": logits_processor, "stopping_criteria": stopping_criteria,
             "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn, "assistant_model": assistant_model,
             "negative_prompt_ids": negative_prompt_ids, "inputs_embeds": kwargs.pop("inputs_embeds", None),
             "negative_prompt_attention_mask": negative_prompt_attention_mask}
    for name, value in given.items():
        if value is not None and not (isinstance(value, list) and not value):
            raise UnsupportedError(f"custom_generate (decograph): {name} is not supported")
    input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    if input_ids is None:
        raise InputError("custom_generate (decograph): give input_ids (or inputs)")
    mask = kwargs.pop("attention_mask", None)
    kwargs.pop("use_cache", None)
    config, unused = model._prepare_generation_config(generation_config, **kwargs)
    if unused:
        raise InputError(f"custom_generate (decograph): unexpected arguments {sorted(unused)}")
    _check(config, {})
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError(f"input_ids must be a 2-D tensor [batch, tokens], got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    n = int(config.num_return_sequences or 1)
    if n > 1:
        input_ids = input_ids.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0) if isinstance(mask, torch.Tensor) else mask
    return _run(model, input_ids, mask, config, tokenizer, streamer,
                dict(strategy=strategy, passes=passes, backend=backend, overrides=overrides, seed=seed))


def install_custom_generate(model_dir: str | os.PathLike[str]) -> Path:
    """Write ``custom_generate/generate.py`` (decograph's) into ``model_dir``; returns its path.
    A model loaded from there with ``trust_remote_code=True`` then generates with decograph."""
    out = Path(model_dir) / "custom_generate" / "generate.py"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CUSTOM_GENERATE_DIR / "custom_generate" / "generate.py", out)
    return out


def _check(config: Any, model_kwargs: dict[str, Any]) -> None:
    """Refuse generation options decograph would otherwise drop silently."""
    if config is None:
        raise InputError("custom_generate (decograph): no generation_config")
    for name, off in _OFF.items():
        value = getattr(config, name, None)
        if value is not None and value != off and not (value is False and off is None):
            why = _WHY.get(name, "decograph does not apply it")
            raise UnsupportedError(f"custom_generate (decograph): {name}={value!r} is not supported ({why}); "
                                   "use transformers' own generate for it")
    if (config.num_return_sequences or 1) > 1 and not config.do_sample:
        raise UnsupportedError("custom_generate (decograph): num_return_sequences > 1 needs do_sample=True "
                               "(greedy rows would be identical)")
    for key in ("output_attentions", "output_hidden_states", "inputs_embeds"):
        if model_kwargs.get(key) is not None and model_kwargs.get(key) is not False:
            raise UnsupportedError(f"custom_generate (decograph): {key} is not supported")
    for key in ("cache", "past_key_values"):        # transformers' fresh cache is empty; a given one is not
        cache = model_kwargs.get(key)
        if cache is not None and getattr(cache, "get_seq_length", lambda: 0)() > 0:
            raise UnsupportedError(f"custom_generate (decograph): continuing from a filled {key} is not "
                                   "supported; pass the whole sequence as input_ids")


def _run(model: Any, input_ids: torch.Tensor, mask: Any, config: Any, tokenizer: Any, streamer: Any,
         options: dict[str, Any]) -> Any:
    """Decode ``input_ids`` (rows unpadded by ``mask``) under ``config``; the sequences as
    transformers lays them out, or its output object."""
    width = int(input_ids.shape[1])
    budget = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20) - width
    if budget < 0:
        raise InputError(f"input_ids has {width} positions, more than max_length={config.max_length}: "
                         "raise max_length or set max_new_tokens")
    eos = config.eos_token_id
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    sample = bool(config.do_sample)
    seed = options.pop("seed")
    if sample and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))   # torch.manual_seed makes runs repeatable, as in transformers
    temperature, top_k, top_p = (_or(config.temperature, 1.0), _or(config.top_k, 0), _or(config.top_p, 1.0)) \
        if sample else (1.0, 0, 1.0)
    results = decode(model, tokenizer, input_ids, max_new_tokens=int(budget), attention_mask=mask, do_sample=sample,
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=seed, eos_token_id=eos, stop_strings=config.stop_strings or None, streamer=streamer,
                     **options)
    longest = max(len(r.new_token_ids) for r in results)
    out = torch.full((len(results), width + longest), int(pad), dtype=torch.long)
    out[:, :width] = input_ids.to("cpu", torch.long)
    for i, r in enumerate(results):
        out[i, width: width + len(r.new_token_ids)] = torch.tensor(r.new_token_ids, dtype=torch.long)
    out = out.to(input_ids.device)
    if not config.return_dict_in_generate:
        return out
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=out)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class _AfterPrompt:
    """A streamer that already has the prompt (transformers put it): the first ``put`` is dropped."""

    def __init__(self, streamer: Any) -> None:
        self.streamer, self.started = streamer, False

    def put(self, value: Any) -> None:
        if self.started:
            self.streamer.put(value)
        self.started = True

    def end(self) -> None:
        self.streamer.end()


def _streamer_of_caller() -> Any:
    """The streamer transformers' ``generate`` was given: it puts the prompt into it but does
    not pass it on to a callable ``custom_generate`` (5.25), so it is read from that frame."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "generate" and frame.f_globals.get("__name__") == "transformers.generation.utils":
            return frame.f_locals.get("streamer")
        frame = frame.f_back
    return None
