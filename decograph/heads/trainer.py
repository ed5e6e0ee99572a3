"""The optimisation of a draft head: options, batches, the objective, held-out acceptance, the
training state and its checkpoint, the curve. ``decograph.heads.train`` runs it.

Objective (per batch of chunks; row ``j`` is fed ``(f_j, t_{j+1})``): for each unroll depth
``d`` (1: the target's features; ``d > 1``: the head's own, ``DraftHead.forward``), the
cross-entropy of the vocabulary-subset logits against the target's own distribution over the
subset at ``j+1`` (softmax of ``f_{j+1}``'s subset logits, as EAGLE-1; ``soft_targets=False``:
its argmax, targets outside the subset ignored), plus ``feat_weight`` times a smooth-L1
between the predicted and the target's feature ``f_{j+1}``, weighted ``depth_decay**(d-1)``.
Input features get Gaussian noise of ``noise`` times their RMS.

A checkpoint holds plain data and tensors only (``torch.load(weights_only=True)`` reads it):
the module and optimizer state, the noise generator's state, the data cursor (epoch, position:
an epoch's order is a permutation drawn from ``(seed, epoch)``), the step, the training seconds
and the schedule's progress, the curve. Restoring it and continuing gives the same weights, bit
for bit, as never stopping (same threads, same machine).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from decograph.heads import data as D
from decograph.heads.model import DraftHead

__all__ = ["Batch", "TrainOptions", "Trainer", "acceptance", "evaluate", "load_checkpoint", "lr_factor", "loss",
           "plot_curve", "save_checkpoint", "write_curve"]


@dataclass(frozen=True)
class TrainOptions:
    """Everything but the budget that shapes a run (a checkpoint resumes only under equal options)."""

    vocab: int = 8192               # the drafted vocabulary subset
    intermediate: int | None = None  # the head's MLP width (None: the target's)
    seq_len: int = 512
    batch: int = 4                  # chunks per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.03            # share of the schedule
    min_lr: float = 0.1             # the cosine's floor, a share of lr
    clip: float = 1.0
    feat_weight: float = 0.5
    soft_targets: bool = True       # cross-entropy against the target's distribution, else its argmax
    noise: float = 0.05             # input-feature noise, a share of each feature's RMS
    depth: int = 2                  # training-time-test unroll (1: none)
    depth_decay: float = 0.8
    init: str = "norm"              # the output norm from the target; "last-layer": its last layer too
    eval_depth: int = 3
    data_chunks: int = 96           # with steps: prepared chunks (a third the target's answers)
    corpus_chars: int = 3_000_000   # training text tokenized for the vocabulary's frequency prior
    gen_share: float = 0.40         # with minutes: the budget's share for generating answers (the head is data-starved:
    data_share: float = 0.47        # the target's own answers help it most); the share for all data preparation
    checkpoint_every: int = 50


def lr_factor(p: float, o: TrainOptions) -> float:
    """Linear warm-up to 1, then cosine to ``min_lr`` at ``p = 1`` (``p``: progress 0..1)."""
    p = min(max(p, 0.0), 1.0)
    if p < o.warmup:
        return p / o.warmup
    q = (p - o.warmup) / max(1e-9, 1.0 - o.warmup)
    return o.min_lr + (1.0 - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))


class Batch:
    """A training batch as tensors: inputs (f_j, t_{j+1}) for rows j < width-1, targets."""

    def __init__(self, ch: D.Chunks, sub_index: torch.Tensor) -> None:
        width = int(ch.lengths.max())
        T = width - 1
        feats = torch.from_numpy(ch.feats[:, :width].astype(np.float32))
        tokens = torch.from_numpy(ch.tokens[:, :width].astype(np.int64))
        am = torch.from_numpy(ch.argmax[:, 1:width].astype(np.int64))
        self.inp, self.next, self.target_f = feats[:, :T], tokens[:, 1:], feats[:, 1:]
        self.target_t = torch.where(am >= 0, sub_index[am.clamp(min=0)], torch.full_like(am, -100))
        rows = torch.arange(T)[None, :]
        self.valid = rows + 1 < torch.from_numpy(ch.lengths.astype(np.int64))[:, None]
        self.rows = rows.expand_as(self.valid)
        self.tokens = int(self.valid.sum())


def loss(module: DraftHead, b: Batch, o: TrainOptions, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The batch's objective (see the module doc) and depth 1's statistics."""
    inp = b.inp
    if o.noise > 0:
        rms = inp.pow(2).mean(-1, keepdim=True).sqrt()
        inp = inp + o.noise * rms * torch.randn(inp.shape, generator=gen)
    outs = module(inp, b.next, depth=o.depth)
    total, stats = torch.zeros(()), {}
    for d, out in enumerate(outs, 1):
        m = b.valid & (b.rows >= d - 1)
        pred, labels, target = out[m], b.target_t[m], b.target_f[m]
        logits = module.logits(pred)
        if o.soft_targets:          # EAGLE: the target's own distribution over the subset, from f_{j+1}
            with torch.no_grad():
                p = torch.softmax(module.logits(target), -1)
            ce = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
        else:
            ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (labels >= 0).sum().clamp(min=1)
        feat = F.smooth_l1_loss(pred, target)
        total = total + o.depth_decay ** (d - 1) * (ce + o.feat_weight * feat)
        if d == 1:
            stats = {"ce": ce.item(), "feat": feat.item(),
                     "acc1": float((logits.argmax(-1) == labels).float().mean()) if len(labels) else 0.0}
    return total, stats


@torch.no_grad()
def acceptance(module: DraftHead, chunks: D.Chunks, depth: int = 3, batch: int = 4) -> dict[str, Any]:
    """Held-out top-1 acceptance of draft chains (the head fed its own features): ``acc[d]`` is
    P(the depth-d guess is the target's argmax | the chain's earlier guesses were), over chains
    rooted at rows ``>= starts`` whose fed tokens are the target's greedy tokens (as when
    drafting); ``chain``: expected accepted tokens of one chain of ``depth``. ``coverage``:
    share of the argmax tokens inside the subset."""
    hits = np.zeros(depth)
    tries = np.zeros(depth)
    inside = total = 0
    for s in range(0, len(chunks), batch):
        ch = chunks.rows(s, s + batch)
        b = Batch(ch, module.sub_index)
        outs = module(b.inp, b.next, depth=depth)
        am = torch.from_numpy(ch.argmax.astype(np.int64))[:, :b.inp.shape[1] + 1]
        ids = module.vocab_ids
        guess = [ids[module.logits(o).argmax(-1)] for o in outs]          # [B, T] token ids per depth
        match = [(g == am[:, 1:]) & b.valid for g in guess]                   # row j: guess of t_{j+2} right
        greedy = (b.next == am[:, :-1]) & (am[:, :-1] >= 0)                 # row j: t_{j+1} is the target's
        T = b.inp.shape[1]
        starts = torch.from_numpy(ch.starts.astype(np.int64))[:, None]
        ok = greedy & (b.rows >= starts)                                     # chains that may start at r
        for d in range(depth):
            if d:
                ok = ok[:, :T - d] & match[d - 1][:, d - 1:T - 1] & greedy[:, d:]
            m = match[d][:, d:T]
            ok_here = ok & b.valid[:, d:T]
            tries[d] += int(ok_here.sum())
            hits[d] += int((m & ok_here).sum())
        v = am[:, 1:][b.valid & (b.rows >= starts)]
        inside += int((module.sub_index[v.clamp(min=0)] >= 0).sum())
        total += len(v)
    acc = [float(h / t) if t else 0.0 for h, t in zip(hits, tries)]
    chain = float(sum(np.cumprod(acc)))
    return {"acc": [round(a, 4) for a in acc], "chain": round(chain, 4), "positions": int(tries[0]),
            "coverage": round(inside / total, 4) if total else 0.0}


class Trainer:
    """The optimisation state of one run and its checkpoint form."""

    def __init__(self, module: DraftHead, o: TrainOptions, seed: int, n_train: int, steps: int | None,
                 budget_s: float) -> None:
        self.module, self.o, self.seed, self.n_train = module, o, seed, n_train
        self.steps, self.budget_s = steps, budget_s
        self.opt = torch.optim.AdamW(module.parameters(), lr=o.lr, betas=(0.9, 0.95), weight_decay=o.weight_decay)
        self.gen = torch.Generator().manual_seed(seed)
        self.step = self.epoch = self.pos = self.tokens = 0
        self.seconds = 0.0
        self.curve: list[dict[str, Any]] = []
        self.evals_done = 0

    def progress(self) -> float:
        return self.step / self.steps if self.steps is not None else self.seconds / max(1e-9, self.budget_s)

    def finished(self) -> bool:
        return self.step >= self.steps if self.steps is not None else self.seconds >= self.budget_s

    def indices(self) -> np.ndarray:
        """The next batch's chunk indices: an epoch is a permutation drawn from (seed, epoch)."""
        b = min(self.o.batch, self.n_train)
        if self.pos + b > self.n_train:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_train)
        self.pos += b
        return np.sort(perm[self.pos - b:self.pos])

    def update(self, batch: Batch) -> dict[str, float]:
        lr = self.o.lr * lr_factor(self.progress(), self.o)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.module.train()
        value, stats = loss(self.module, batch, self.o, self.gen)
        self.opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.o.clip)
        self.opt.step()
        self.step += 1
        self.tokens += batch.tokens
        return {"loss": value.item(), "lr": lr, **stats}

    def state(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, "model": self.module.state_dict(), "optim": self.opt.state_dict(),
                "rng": self.gen.get_state(), "step": self.step, "epoch": self.epoch, "pos": self.pos,
                "tokens": self.tokens, "seconds": self.seconds, "budget_s": self.budget_s,
                "schedule": {"progress": self.progress(), "lr": self.o.lr, "warmup": self.o.warmup},
                "curve": self.curve, "evals_done": self.evals_done}

    def load(self, s: dict[str, Any]) -> None:
        self.module.load_state_dict(s["model"])
        if "optim" in s:                    # a finished run's checkpoint keeps no optimizer state
            self.opt.load_state_dict(s["optim"])
        self.gen.set_state(s["rng"])
        self.step, self.epoch, self.pos, self.tokens = s["step"], s["epoch"], s["pos"], s["tokens"]
        self.seconds, self.budget_s, self.curve = s["seconds"], s["budget_s"], list(s["curve"])
        self.evals_done = s["evals_done"]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it is this run's (same model, options, seed and budget)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)      # tensors and plain data only: no pickled code runs
    except Exception as exc:                             # a torn or foreign file: start over, say why
        log(f"ignoring the unreadable checkpoint {path} ({type(exc).__name__}); starting over")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log(f"the checkpoint {path} is of another run (options, seed or budget differ); starting over "
            "(rerun with that run's settings to resume it)")
        return None
    return state


def write_curve(root: Path, curve: list[dict[str, Any]]) -> Path:
    path = root / "curve.jsonl"
    tmp = path.with_name(f".curve.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in curve))
    os.replace(tmp, path)
    return path


def plot_curve(root: Path, curve: list[dict[str, Any]]) -> Path | None:
    """``curve.png`` (loss; held-out acceptance by depth) where matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in curve if "loss" in r]
    evals = [r for r in curve if "eval" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
    a.plot([r["step"] for r in train], [r["ce"] for r in train], label="cross-entropy (depth 1)")
    a.set_xlabel("step")
    a.legend()
    for split in sorted({s for r in evals for s in r["eval"]}):
        for d in range(len(evals[-1]["eval"][split]["acc"])):
            have = [r for r in evals if split in r["eval"]]
            b.plot([r["step"] for r in have], [r["eval"][split]["acc"][d] for r in have], marker="o",
                   label=f"{split} depth {d + 1}")
    b.set_xlabel("step")
    b.set_ylabel("held-out top-1 acceptance")
    b.legend(fontsize=7)
    fig.tight_layout()
    path = root / "curve.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluate(module: DraftHead, held: dict[str, D.Chunks], o: TrainOptions) -> dict[str, Any]:
    module.eval()
    return {split: acceptance(module, ch, o.eval_depth) for split, ch in held.items() if len(ch)}
