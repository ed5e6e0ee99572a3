"""What both stages of ``decograph train-mdm`` share: the run's ``TrainConfig``, the
stratified mask ratios ``draw_t`` and the training loop's bookkeeping ``TrainLoop``.

``decograph.apps.train_mdm`` (the LLaDA objective, then the checkpoint) and
``decograph.apps.distill_mdm`` (self-distillation) both import this module, and neither
imports the other's internals: ``train_mdm`` calls ``distill_mdm.self_distill``, which needs
only what is here.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from decograph.errors import InputError

__all__ = ["TrainConfig", "TrainLoop", "draw_t"]


@dataclass(frozen=True)
class TrainConfig:
    """What is trained; every field is part of the checkpoint's fingerprint except ``minutes``."""

    vocab_size: int = 300       # 256 bytes, three special tokens and 41 merges (byte-level BPE)
    merges: str = "whitespace"  # "whitespace": merges of whitespace runs only; "all": BPE on the whole text
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 768
    seq_len: int = 448
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    minutes: float = 20.0        # the LLaDA-objective stage's wall-clock budget
    max_steps: int = 0           # 0: as many as fit in ``minutes``
    bf16: str = "auto"           # bfloat16 autocast (fp32 weights): "auto" where the CPU has native bf16
    compile: str = "auto"        # torch.compile the training forward: "auto" falls back to eager if it fails
    block_rows: float = 0.0      # share of rows in the semi-autoregressive infilling form (see _masked_batch)
    blocks: tuple[int, ...] = (16, 32)   # the block sizes those rows draw from
    distill_minutes: float = 8.0  # self-distillation: half making the model's own fills, half fine-tuning (0: none)
    distill_rows: int = 0         # > 0: exactly this many teacher fills instead of a time budget
    distill_steps: int = 0        # > 0: exactly this many fine-tuning steps instead of a time budget
    distill_entropy: float = 0.5  # certainty forcing: weight of the entropy of correctly predicted tokens
    distill_lr: float = 5e-4
    distill_mix: float = 0.5      # share of the fine-tuning rows that are the text itself (cross-entropy only)

    @property
    def distills(self) -> bool:
        return self.distill_minutes > 0 or (self.distill_rows > 0 and self.distill_steps > 0)

    def use_bf16(self) -> bool:
        if self.bf16 not in ("auto", "on", "off"):
            raise InputError(f"train-mdm: bf16 must be auto, on or off, got {self.bf16!r}")
        if self.bf16 == "auto":
            try:
                return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            except (AttributeError, RuntimeError):
                return False
        return self.bf16 == "on"

    def fingerprint(self) -> str:
        budget = ("minutes", "max_steps", "compile", "distill_minutes", "distill_rows", "distill_steps")
        d = {k: v for k, v in asdict(self).items() if k not in budget}
        if self.distills:         # (a checkpoint without the stage keeps its earlier fingerprint)
            d["distill"] = True
        else:
            for k in ("distill_entropy", "distill_lr", "distill_mix"):
                del d[k]
        d["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def draw_t(batch: int, gen: torch.Generator) -> torch.Tensor:
    """The batch's mask ratios, stratified: one in each slice ``[i / B, (i + 1) / B)`` of (0, 1]
    (``(i + u) / B`` with one shared u ~ U[0, 1)), in random row order, at least 1e-3."""
    return ((torch.randperm(batch, generator=gen) + torch.rand(1, generator=gen)) / batch).clamp_min(1e-3)


class TrainLoop:
    """The bookkeeping both training stages share: the optimizer step (gradient clipped to
    1), the smoothed loss (``decay``), its curve every 10 steps, and the progress bar, by
    steps (``by_steps``) or by seconds."""

    def __init__(self, bar: Any, by_steps: bool, decay: float) -> None:
        self.bar, self.by_steps, self.decay = bar, by_steps, decay
        self.start, self.step, self.ema = time.perf_counter(), 0, None
        self.curve: list[dict[str, float]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        self.step += 1
        value = loss.item()
        self.ema = value if self.ema is None else self.decay * self.ema + (1 - self.decay) * value
        if self.step % 10 == 0:
            self.curve.append({"step": self.step, "seconds": round(self.elapsed(), 1), "loss": round(self.ema, 4)})
        self.bar.set_postfix(step=self.step, loss=f"{self.ema:.3f}")
        self.bar.update(1 if self.by_steps else int(self.elapsed()) - self.bar.n)
