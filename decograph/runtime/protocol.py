"""The step protocol: what the runtime asks of a backend, and nothing of the strategy.

The runtime (``decograph.runtime.interp``) decides, each step, which tokens every row feeds
(its pending tokens and a draft tree), verifies what the model said and decides what to keep.
A backend executes that: an ``Engine`` starts a ``Batch`` over the rows of one run, and the
batch owns the KV storage (in the spirit of llama.cpp's ``llama_batch`` with its ``seq_rm`` /
``seq_cp`` / ``seq_keep`` calls, and of vLLM's split between scheduler and model runner):

- ``prefill()``: every row's committed tokens but its last (the first root) into the cache;
- ``forward(plan)``: per active row, its pending tokens then the nodes of ``plan.trees[b]``
  (parent pointers: a node sees the context, the pending tokens and its ancestors; position =
  the root's position + depth). ``plan.mask`` / ``plan.layout`` are the passes' lowering
  choice (tree in one sequence, a row copy per chain, one causal forward per chain; packed or
  separate fork branches); a backend that lacks one runs an equivalent one, tokens unchanged.
  The ``StepOutput`` gives per row the argmax (device-side where the backend can) and, only
  when a rule needs them, the logits rows: root first, then after each node;
- ``commit(out, paths, keep_nodes)``: each row keeps its pending tokens' slots and, with
  ``keep_nodes``, its accepted path's nodes (``commit(kv=keep_accepted)``), else they are
  recomputed as pending tokens next step; every other slot of the step is rolled back;
- ``settle(copy)``: drop finished rows (their cache rows freed); ``copy``: compact now;
- ``fork(branches)`` / ``join()``: active row ``b`` becomes the rows ``branches[b]``, which
  start from its cache; ``join`` restores the forked rows and returns each one's branch rows;
- ``admit(rows)``: new rows join the running batch between two steps (continuous batching);
  each is decoded exactly as it would be alone (its prompt's forward of its own where the
  backend can, then its own cache row).

``rows`` / ``active`` are the current level's rows, and its unfinished ones, in order.

A masked-diffusion model's batch is a ``CanvasBatch`` (``Engine.start_canvas``): per row a
canvas of prompt, masked generation and suffix; ``forward(blocks)`` runs the model over each
active row's canvas (bidirectional, with the KV reuse the commit's ``kv`` mode allows) and
returns, for every position of the row's block, the confidence (max softmax probability, the
mask token excluded) and the argmax token; ``write`` puts committed tokens on the canvas.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from decograph.errors import UnsupportedError
from decograph.runtime.rows import DraftTree, Row
from decograph.runtime.unmask import CanvasRow

__all__ = ["StepPlan", "StepOutput", "Batch", "CanvasStep", "CanvasBatch", "NoiseStep", "NoiseBatch", "Engine"]


@dataclass
class StepPlan:
    """One forward's query layout, per active row (``b``)."""

    mask: str                           # causal | tree | packed (the forward op's lowering choice)
    layout: str                         # sequence | batch
    trees: list[DraftTree]              # merged draft trees (a trie with dedup)
    chains: list[list[list[int]]]       # the token chains the trees hold, in draft order
    chain_nodes: list[list[list[int]]]  # each chain's node ids in its tree
    pad_id: int = 0
    hidden: bool = False                # a draft source needs the final hidden states (``StepOutput.hidden``)


class StepOutput(ABC):
    """What a forward returned, for each active row ``b`` of the plan."""

    @abstractmethod
    def argmax(self, b: int) -> list[int]:
        """The model's argmax at the root, then after each node of row ``b``'s tree."""

    @abstractmethod
    def logits(self, b: int) -> np.ndarray:
        """Row ``b``'s logits [1 + nodes, V] (root first), as floats on the host."""

    def hidden(self, b: int) -> np.ndarray:
        """Only when the plan asked (``StepPlan.hidden``): row ``b``'s final hidden states (after
        the final norm: the LM head's input), float32 [pending + nodes, H]: every pending token
        in order (the root last), then each node of its tree."""
        raise UnsupportedError(f"{type(self).__name__} does not return hidden states (draft heads need them)")


class Batch(ABC):
    """A backend's batch of rows and their KV cache (see the module docstring)."""

    rows: list[Row]
    active: list[Row]
    # Set by the runtime before ``prefill`` / ``admit`` when a draft source needs hidden states:
    # keep, per row, the final hidden states of the last ``hidden_tail`` prefilled positions.
    hidden_tail: int = 0

    @property
    @abstractmethod
    def forked(self) -> bool: ...

    def prefill_hidden(self, row: Row) -> np.ndarray:
        """After ``prefill`` / ``admit`` with ``hidden_tail`` > 0: ``row``'s final hidden states
        (float32 [k, H]) of its last k = min(hidden_tail, cached) prefilled positions, in order
        (the last one is the position just before the root); the batch may drop them after."""
        raise UnsupportedError(f"{type(self).__name__} does not return hidden states (draft heads need them)")

    @abstractmethod
    def prefill(self) -> None: ...

    @abstractmethod
    def forward(self, plan: StepPlan) -> StepOutput: ...

    @abstractmethod
    def commit(self, out: StepOutput, paths: list[list[int]], keep_nodes: bool) -> None: ...

    @abstractmethod
    def settle(self, copy: bool = False) -> None: ...

    @abstractmethod
    def fork(self, branches: list[list[Row]]) -> None: ...

    @abstractmethod
    def join(self) -> list[list[Row]]: ...

    def admit(self, rows: list[Row]) -> None:
        """``rows`` (prompts not yet cached) join the batch before the next step."""
        raise UnsupportedError(f"{type(self).__name__} cannot take rows into a running batch")


@dataclass
class CanvasStep:
    """A block forward's result, per active row: for each position of its block, the
    confidence and the argmax token (host arrays), and the query tokens the forward ran."""

    confidence: list[np.ndarray]
    tokens: list[np.ndarray]
    query_tokens: list[int]


class CanvasBatch(ABC):
    """A backend's batch of canvases (masked-diffusion decoding) and their KV."""

    rows: list[CanvasRow]
    mask_id: int

    @property
    def active(self) -> list[CanvasRow]:
        return [r for r in self.rows if r.finish_reason is None]

    @abstractmethod
    def forward(self, blocks: list[tuple[int, int]]) -> CanvasStep:
        """Each active row's block ``[s, e)`` (generation positions): its confidences and tokens."""

    @abstractmethod
    def write(self, row: CanvasRow, positions: list[int], tokens: list[int]) -> None:
        """Committed ``tokens`` at the generation ``positions`` of ``row``'s canvas."""


class NoiseStep(ABC):
    """One denoising forward of every row's canvas (``NoiseBatch.forward``): the logits stay
    on the backend; the runtime asks for what its rule needs, at a temperature, as float32 /
    int64 arrays [B, L] (B: every row of the batch, finished ones included)."""

    @abstractmethod
    def entropy(self, temperature: float) -> np.ndarray:
        """Each position's entropy of softmax(logits / temperature)."""

    @abstractmethod
    def argmax(self, temperature: float) -> np.ndarray:
        """Each position's most probable token."""

    @abstractmethod
    def confidence(self, temperature: float) -> np.ndarray:
        """Each position's largest probability under softmax(logits / temperature)."""

    @abstractmethod
    def sample(self, temperature: float) -> np.ndarray:
        """A token per position drawn from softmax(logits / temperature) by the backend's
        random generator (one draw over the whole batch)."""

    @abstractmethod
    def condition(self, keep: np.ndarray) -> None:
        """The next forward's self-conditioning signal: these logits / temperature (the last
        temperature asked), except rows where ``keep`` (bool [B]) holds, which keep theirs."""


class NoiseBatch(ABC):
    """A backend's batch for uniform-noise block diffusion (DiffusionGemma): a cache of each
    row's committed tokens (the prompt, then each committed canvas) and a self-conditioning
    signal. Every row stays in the batch to the end (its random draws keep the batch's shape)."""

    canvas_length: int
    vocab_size: int
    pad_id: int | None                  # what replaces a finished row's tokens in the cache (None: nothing)

    @abstractmethod
    def noise(self) -> np.ndarray:
        """A canvas per row, int64 [B, L], uniform over the vocabulary (one draw)."""

    @abstractmethod
    def forward(self, canvas: np.ndarray) -> NoiseStep:
        """The denoiser over ``canvas`` (int64 [B, L]) after each row's committed tokens, with
        the self-conditioning signal the last step left (none on a canvas's first step)."""

    @abstractmethod
    def append(self, canvas: np.ndarray) -> None:
        """Commit ``canvas`` (int64 [B, L]: each row's new tokens, pad after its end) to the
        cache, for the next canvas to attend to; the self-conditioning signal is cleared."""


class Engine(ABC):
    """A backend's model runner: starts batches; ``tokenizer`` for text branch prompts;
    ``cost_curve`` the measured forward cost (``decograph.passes.cost.CostCurve``) or None.

    A masked-diffusion model's engine sets ``canvas`` and implements ``start_canvas``, with
    ``mask_token_id``, ``max_positions`` (0: unbounded) and ``supports_kv`` (whether the
    block-wise caches can run). A uniform-noise diffusion model's (DiffusionGemma) sets
    ``denoiser`` and implements ``start_noise``."""

    tokenizer: Any = None
    cost_curve: Any = None
    max_rows: int = 0                   # the most rows one batch may hold (0: any); a server caps admission
    min_query: int = 1                  # the query tokens a row's step computes at least (an exact ONNX graph: 2)
    canvas: bool = False
    mask_token_id: int = -1
    max_positions: int = 0
    supports_kv: bool = False
    denoiser: bool = False
    name: str = "the model"
    # The backend verifies one draft chain per row and step, no branching tree: its multi-token
    # steps are exact (k query rows == k one-token steps) for dense causal chains only, so a
    # tree's masked holes would change the arithmetic (quantized ONNX Runtime graphs).
    chains_only: bool = False

    @abstractmethod
    def start(self, rows: list[Row]) -> Batch: ...

    def start_canvas(self, rows: list[CanvasRow], mask_id: int, kv: str) -> CanvasBatch:
        """A batch of canvases (``rows``' prompts, masked generations and suffixes) whose forwards
        keep the KV ``kv`` (the commit's mode) asks for."""
        raise UnsupportedError(f"{self.name} is a causal LM: unmask strategies need a masked-diffusion model")

    def start_noise(self, prompts: list[list[int]]) -> NoiseBatch:
        """A uniform-noise diffusion batch over ``prompts`` (their tokens cached)."""
        raise UnsupportedError(f"{self.name} is not a uniform-noise diffusion model: draft.noise and "
                               f"unmask.entropy_bound need one (DiffusionGemma)")
