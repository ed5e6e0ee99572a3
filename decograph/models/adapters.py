"""Model adapters: the one interface the runtime drives a model through.

The runtime never calls a model directly. It hands an adapter a block of query tokens with
explicit position ids and an explicit boolean attention pattern over the cache slots plus the
new tokens, and gets logits for every query token back. The new tokens' keys and values are
appended to the cache as new *slots*; which slots stay valid is the runtime's business (it
keeps a per-row validity mask), so rejecting a draft never copies the cache: the rejected
slots are simply masked out, and the tail is cropped.

Guarantees of every adapter:
- ``forward`` appends exactly ``T`` slots to the cache, in query order;
- a query may attend only to slots where ``attend`` is True (including itself);
- ``truncate``/``select_rows``/``gather_slots`` edit the cache in place.

``HFCausalLM`` also keeps each slot's position (``SlotCache.positions``), so that
sliding-window layers (``decograph.models.sliding``) can hide slots too old for a query.
"""
from __future__ import annotations

import inspect
import weakref
from abc import ABC, abstractmethod
from typing import Any

import torch

from decograph.errors import ModelError

__all__ = ["CausalLMAdapter", "HFCausalLM", "SlotCache", "as_adapter"]


class CausalLMAdapter(ABC):
    """What the torch reference backend needs from a causal language model."""

    vocab_size: int
    max_positions: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @abstractmethod
    def new_cache(self, batch_size: int) -> Any:
        """An empty cache for ``batch_size`` rows."""

    @abstractmethod
    def forward(
        self, cache: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: torch.Tensor
    ) -> torch.Tensor:
        """Run ``input_ids`` [B, T] at ``position_ids`` [B, T].

        ``attend`` is bool [B, T, S] with ``S = cache_len(cache) + T``: query ``t`` of row ``b``
        may attend to slot ``s`` iff ``attend[b, t, s]``. Returns float32 logits [B, T, V] and
        appends the T new slots to ``cache``.
        """

    @abstractmethod
    def cache_len(self, cache: Any) -> int:
        """Number of physical slots in ``cache`` (valid or not)."""

    @abstractmethod
    def truncate(self, cache: Any, length: int) -> None:
        """Drop every slot at index >= ``length``."""

    @abstractmethod
    def select_rows(self, cache: Any, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (a LongTensor of row indices), in that order."""

    @abstractmethod
    def gather_slots(self, cache: Any, slots: torch.Tensor) -> None:
        """Replace row ``b``'s slots by its slots ``slots[b]`` ([B, S'] LongTensor): compaction."""

    def slot_tensors(self, cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) views [B, H, S, D], for tests that compare caches."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its cache tensors")


class _SlotLayer:
    """One layer's keys and values in a buffer that grows by doubling.

    ``update`` writes the new slots in place and returns views, so a generation step costs no
    concatenation of the whole cache (Hugging Face's DynamicLayer copies it every step).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0
        self.is_initialized = False

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.k is None else self.k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.v is None else self.v[:, :, : self.length]

    def _reserve(self, key: torch.Tensor, need: int) -> None:
        if self.k is not None and self.k.shape[2] >= need:
            return
        cap = max(64, need, 2 * (0 if self.k is None else self.k.shape[2]))
        b, h, _, d = key.shape
        k = key.new_zeros(b, h, cap, d)
        v = key.new_zeros(b, h, cap, d)
        if self.k is not None and self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]  # type: ignore[index]
        self.k, self.v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        t = key_states.shape[2]
        self._reserve(key_states, self.length + t)
        assert self.k is not None and self.v is not None
        self.k[:, :, self.length : self.length + t] = key_states
        self.v[:, :, self.length : self.length + t] = value_states
        self.length += t
        self.is_initialized = True
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        self.length = max(0, min(self.length, max_length if max_length >= 0 else self.length + max_length))

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, rows)
            self.v = self.v.index_select(0, rows)  # type: ignore[union-attr]

    def gather(self, slots: torch.Tensor, kernel: Any = None) -> None:
        """Row ``b`` keeps its slots ``slots[b]``; with a ``kv.compact`` kernel (which needs
        ascending slots: each moves only forward), in place, one (row, head) plane per call."""
        if self.k is None:
            return
        if kernel is not None:
            for buf in (self.k, self.v):
                for b in range(buf.shape[0]):
                    plane = buf[b]                                   # [H, capacity, D]: kernel's [R, S, W]
                    for h in range(buf.shape[1]):
                        kernel(plane, h, slots[b])
            self.length = slots.shape[1]
            return
        b, h, _, d = self.k.shape
        idx = slots[:, None, :, None].expand(b, h, slots.shape[1], d)
        k = torch.gather(self.k[:, :, : self.length], 2, idx)
        v = torch.gather(self.v[:, :, : self.length], 2, idx)  # type: ignore[index]
        self.k, self.v, self.length = None, None, 0
        self.update(k, v)

    def reset(self) -> None:
        self.length = 0


def _cache_base() -> type:
    from transformers.cache_utils import Cache

    return Cache


class SlotCache:
    """A Hugging Face ``Cache`` whose layers are ``_SlotLayer``s (built lazily: transformers is heavy).

    ``positions`` (LongTensor [B, S] on the CPU, or None while empty) is each slot's position,
    kept in step with the layers by ``HFCausalLM``: appended from ``position_ids`` by every
    forward (already during it: a forward's model code sees the new slots' positions too), cut,
    row-selected and gathered with the slots.
    """

    def __new__(cls, num_layers: int):  # noqa: D102 - factory
        base = _cache_base()

        class _Slot(base):  # type: ignore[misc, valid-type]
            def __init__(self, n: int) -> None:
                self.layers = [_SlotLayer() for _ in range(n)]
                self.positions: torch.Tensor | None = None
                self.offloading = False
                self.layer_class_to_replicate = None

            @property
            def is_compileable(self) -> bool:
                return False

        return _Slot(num_layers)


class HFCausalLM(CausalLMAdapter):
    """Any Hugging Face ``AutoModelForCausalLM`` with full or sliding-window attention, driven
    through explicit 4D masks.

    Assumes the model accepts a prepared 4D additive ``attention_mask`` (or, with
    ``layer_types``, a dict of them keyed by layer type) and explicit ``position_ids`` (all
    decoder-only models in transformers >= 5 do). Sliding-window layers (Gemma 3, Mistral,
    Qwen2's ``use_sliding_window``) get ``attend`` cut to their window by slot position
    (``decograph.models.sliding``); their cache keeps *every* slot, like a full layer's, so a
    rejected draft or a truncation rolls them back exactly as any other layer (exactness first:
    memory grows with the context, not with the window). Models whose cache cannot be rolled
    back this way (recurrent, linear-attention or mamba-style layers, encoder-decoders) are
    refused with ``ModelError`` rather than silently decoded wrong. Windowed models never take
    the Llama fast path nor a backend's attention kernel (neither applies a window).
    """

    def __init__(self, model: Any, tokenizer: Any = None, fast: bool = True) -> None:
        from decograph.models.sliding import attention_layout

        try:
            self.layout = attention_layout(model.config)
        except ModelError as exc:
            raise ModelError(
                f"model {type(model).__name__} has {exc}; decograph's slot cache needs full or "
                "sliding-window attention. Decode it with plain transformers generate instead."
            ) from None
        if self.layout.slides:
            self.supports_attention_kernel = False       # the kernels take no window
        self.model = model.eval()
        self.tokenizer = tokenizer
        out = model.get_output_embeddings()
        self.vocab_size = int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)
        text = model.config.get_text_config(decoder=True)
        self.num_layers = int(text.num_hidden_layers)
        self.max_positions = getattr(text, "max_position_embeddings", None)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        # transformers 5 renamed past_key_values to cache (the old name warns, and goes in 5.40).
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        from decograph.models.fast_gemma3 import Gemma3FastPath, supports_gemma3_fast_path
        from decograph.models.fast_llama import LlamaFastPath, supports_fast_path

        # Llama-architecture models skip transformers' per-module overhead (same ops, same order);
        # that fast path applies no window. Gemma 3's takes the masks the model would (windows
        # included): ``fast_masked``.
        cpu = fast and self.device.type == "cpu"
        self.fast = LlamaFastPath(model) if cpu and not self.layout.slides and supports_fast_path(model) else None
        self.fast_masked = Gemma3FastPath(model) if cpu and supports_gemma3_fast_path(model) else None

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> HFCausalLM:
        """Load a local model directory (offline) with its tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=kwargs.pop("dtype", torch.float32), **kwargs
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a causal LM from {path!r}: {exc}") from exc
        return cls(model, tok)

    def new_cache(self, batch_size: int) -> Any:
        return SlotCache(self.num_layers)

    supports_attention_kernel = True
    supports_compact_kernel = True              # gather_slots takes a backend's kv.compact
    supports_logits_to_keep = True              # forward(..., logits_to_keep=k): the last k rows' logits
    supports_hidden = True                      # forward(..., hidden=True): (logits, final hidden states)

    def forward(self, cache, input_ids, position_ids, attend, structure=None, attention=None, logits_to_keep=0,
                hidden=False):
        """As ``CausalLMAdapter.forward``; with ``attention`` (a backend's kernel, see
        ``decograph.backends.base``), the model's attention layers run it under ``structure``
        (a ``StructuredMask`` equal to ``attend``) through transformers' attention registry.
        ``logits_to_keep`` > 0: logits of the last that many query positions only (a prompt's
        forward, whose logits nobody reads, skips the vocabulary projection of every row).
        ``hidden``: returns ``(logits, h)``, ``h`` the final hidden states [B, T, H] of every
        query (after the final norm: the LM head's input; draft heads read them)."""
        past = self.cache_len(cache)
        t = input_ids.shape[1]
        if attend.shape != (input_ids.shape[0], t, past + t):
            raise ModelError(f"attend has shape {tuple(attend.shape)}, expected {(input_ids.shape[0], t, past + t)}")
        # From here on the positions include the T new slots (a fast path reads them for its windows).
        slot_pos = cache.positions = _with_positions(cache, position_ids)
        # No autograd: the cache buffers are written in place every step, so a graph would chain
        # through every step of a generation and keep all activations alive.
        with torch.no_grad():
            # transformers' hidden_states[-1] is the last hidden state after the final norm
            extra = {"output_hidden_states": -1} if hidden else {}
            fast = {"hidden": True} if hidden else {}
            if attention is not None and not self.layout.slides:
                return self._kernel_forward(cache, input_ids, position_ids, structure, attention, logits_to_keep,
                                            **extra)
            if self.fast is not None:
                return self.fast.forward(cache, input_ids, position_ids, attend, logits_to_keep, **fast)
            from decograph.models.sliding import model_mask

            mask = model_mask(self.layout, attend, position_ids, slot_pos, self.dtype, self.device)
            if self.fast_masked is not None:
                return self.fast_masked.forward(cache, input_ids.to(self.device), position_ids.to(self.device),
                                                mask, logits_to_keep, **fast)
            out = self.model(
                input_ids=input_ids.to(self.device),
                position_ids=position_ids.to(self.device),
                attention_mask=mask,
                use_cache=True,
                cache_position=torch.arange(past, past + t, device=self.device),
                logits_to_keep=logits_to_keep,
                **{self._cache_kwarg: cache}, **extra,
            )
        return (out.logits.float(), out.hidden_states[-1]) if hidden else out.logits.float()

    def _kernel_forward(self, cache, input_ids, position_ids, structure, attention, logits_to_keep=0, **extra):
        from decograph.models.hf_attention import structured_attention

        past, t = self.cache_len(cache), input_ids.shape[1]
        # A 4D mask counts as prepared: transformers passes it through untouched, and the
        # kernel ignores it (a [B, 1, 1, 1] placeholder, not the dense pattern).
        placeholder = torch.zeros((input_ids.shape[0], 1, 1, 1), dtype=self.dtype, device=self.device)
        with structured_attention(self.model, structure, attention):
            out = self.model(input_ids=input_ids.to(self.device), position_ids=position_ids.to(self.device),
                             attention_mask=placeholder, use_cache=True,
                             cache_position=torch.arange(past, past + t, device=self.device),
                             logits_to_keep=logits_to_keep, **{self._cache_kwarg: cache}, **extra)
        return (out.logits.float(), out.hidden_states[-1]) if extra else out.logits.float()

    def cache_len(self, cache) -> int:
        return cache.layers[0].length if cache.layers else 0

    def truncate(self, cache, length: int) -> None:
        for layer in cache.layers:
            layer.crop(length)
        if cache.positions is not None:
            cache.positions = cache.positions[:, : self.cache_len(cache)]

    def select_rows(self, cache, rows: torch.Tensor) -> None:
        for layer in cache.layers:
            layer.batch_select_indices(rows.to(self.device))
        if cache.positions is not None:
            cache.positions = cache.positions.index_select(0, rows.to(cache.positions.device))

    def gather_slots(self, cache, slots: torch.Tensor, kernel: Any = None) -> None:
        """``kernel``: a backend's ``kv.compact``, which moves the kept slots in place (used when
        every row's slots ascend; otherwise the slots are gathered into new buffers)."""
        if cache.positions is not None:
            cache.positions = torch.gather(cache.positions, 1, slots.to(cache.positions.device))
        slots = slots.to(self.device)
        if kernel is not None and not bool((slots[:, 1:] > slots[:, :-1]).all()):
            kernel = None
        for layer in cache.layers:
            layer.gather(slots, kernel)

    def slot_tensors(self, cache):
        return [(layer.keys, layer.values) for layer in cache.layers]


def _with_positions(cache: Any, position_ids: torch.Tensor) -> torch.Tensor:
    """The cache's slot positions followed by the new tokens' ([B, S + T], CPU)."""
    new = position_ids.detach().to("cpu", torch.long)
    old = cache.positions
    if old is None or old.shape[1] == 0:
        return new
    return torch.cat([old, new], 1)


_ADAPTERS: "weakref.WeakKeyDictionary[Any, tuple[HFCausalLM, tuple[int, ...]]]" = weakref.WeakKeyDictionary()


def _weight_versions(model: Any) -> tuple[int, ...]:
    return tuple(p._version for p in model.parameters())


def as_adapter(model: Any, tokenizer: Any = None) -> CausalLMAdapter:
    """Wrap ``model`` in the right adapter; adapters pass through unchanged.

    A model's adapter is built once and reused (its fast path holds transposed copies of the
    weights, too costly to redo per call) until a weight is modified in place.
    """
    if isinstance(model, CausalLMAdapter):
        return model
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):
        versions = _weight_versions(model)
        hit = _ADAPTERS.get(model)
        if hit is not None and hit[1] == versions:
            adapter = hit[0]
            if tokenizer is not None:
                adapter.tokenizer = tokenizer
            return adapter
        adapter = HFCausalLM(model, tokenizer)
        _ADAPTERS[model] = (adapter, versions)
        return adapter
    raise ModelError(
        f"cannot decode with a {type(model).__name__}: pass a transformers causal LM, "
        "a decograph adapter, or a model directory"
    )
