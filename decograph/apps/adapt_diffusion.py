"""``decograph adapt-diffusion``: turn the default causal LM into a block-diffusion LM, on a CPU.

The model is ``decograph.models.block_diffusion``'s (the base model exact on clean positions; a
LoRA noisy path with bidirectional attention inside a block; shifted logits). Training, per
answer of ``decograph.apps.adapt_data`` (the base model's own greedy answers to held-in
Spec-Bench questions):

1. the clean sequence (prompt and answer) runs once through the frozen base model, causally,
   without gradients: its KV is the context every noisy block reads;
2. the answer, cut into blocks of ``block`` tokens from its first token, is masked twice with
   complementary masks (per block a ratio t ~ U(0, 1), each token masked with probability t in
   the first copy and exactly the others in the second: Fast-dLLM v2's complementary masks, so
   every token is a target once); both copies run as a batch of two through the noisy path, each
   block reading the clean KV before it and its own positions;
3. the loss is the cross-entropy of every masked token but a block's first (which the clean
   position before it predicts, unchanged), predicted one position to its left.

AdamW on the LoRA factors and the mask embedding, cosine decay after a short warm-up, for
``minutes`` of wall time (whole answers; a line of progress every ``log_every`` answers). The
result is written to a temporary directory and renamed: ``delta.safetensors`` (fp16),
``config.json`` (with the training record: answers seen, loss curve, minutes).

    decograph adapt-diffusion --minutes 45 --out decograph/models/data/smollm2-135m-bd
"""
from __future__ import annotations

import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from decograph.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionLM, save_delta

__all__ = ["complementary_masks", "train_step", "adapt", "adapt_default"]


def complementary_masks(n: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """``[2, n]`` bool: per block of ``block`` positions a ratio t ~ U(0, 1); row 0 masks each
    position with probability t, row 1 exactly the positions row 0 keeps."""
    t = torch.rand((n + block - 1) // block, generator=gen).repeat_interleave(block)[:n]
    first = torch.rand(n, generator=gen) < t
    return torch.stack([first, ~first])


def train_step(lm: BlockDiffusionLM, prompt: list[int], answer: list[int], gen: torch.Generator) -> torch.Tensor:
    """The loss of one answer (both complementary copies), graph attached."""
    cfg = lm.config
    seq = torch.tensor([prompt + answer])
    g, n = len(prompt), len(answer)
    total = g + n
    pos = torch.arange(total)[None]
    with torch.no_grad():
        causal = torch.ones(total, total, dtype=torch.bool).tril()[None]
        _, ctx = lm(seq, pos, torch.zeros_like(seq, dtype=torch.bool), causal, return_kv=True,
                    logits_at=torch.zeros(1, 1, dtype=torch.long))
    assert ctx is not None
    masked = complementary_masks(n, cfg.block, gen)                              # [2, n]
    ids = torch.tensor(answer).repeat(2, 1).masked_fill(masked, cfg.mask_token_id)
    qpos = torch.arange(g, total).repeat(2, 1)
    start = g + (torch.arange(n) // cfg.block) * cfg.block                      # each query's block start
    ctx_ok = torch.arange(total)[None, :] < start[:, None]                      # clean keys before the block
    own = start[:, None] == start[None, :]                                      # the block's own positions
    attend = torch.cat([ctx_ok, own], 1)[None].expand(2, -1, -1)
    # position j predicts answer[j + 1]: a target when it is masked and in j's block
    tgt_masked = masked[:, 1:] & (start[1:] == start[:-1])[None]
    rows, cols = tgt_masked.nonzero(as_tuple=True)
    if len(rows) == 0:
        return torch.zeros((), requires_grad=True)
    k = int(tgt_masked.sum(1).max())
    at = torch.zeros(2, k, dtype=torch.long)
    weight = torch.zeros(2, k)
    for r in range(2):
        c = cols[rows == r]
        at[r, :len(c)], weight[r, :len(c)] = c, 1.0
    context = [(kk.expand(2, -1, -1, -1), vv.expand(2, -1, -1, -1)) for kk, vv in ctx]
    logits, _ = lm(ids, qpos, torch.ones_like(ids, dtype=torch.bool), attend, context=context, logits_at=at)
    target = torch.tensor(answer)[at + 1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (ce * weight.reshape(-1)).sum() / weight.sum()


def adapt(base: Any, pairs: list[tuple[list[int], list[int]]], out: Path, minutes: float = 45.0,
          config: BlockDiffusionConfig | None = None, lr: float = 1e-3, accumulate: int = 4, seed: int = 0,
          log_every: int = 8, progress: bool = True) -> BlockDiffusionLM:
    """Train the noisy path on ``pairs`` for ``minutes`` and write the delta to ``out``."""
    lm = BlockDiffusionLM(base, config or BlockDiffusionConfig())
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    usable = [(p, a) for p, a in pairs if len(a) >= 2]
    budget, t0 = minutes * 60.0, time.time()
    seen, losses, curve, step = 0, [], [], 0
    lm.train()
    while time.time() - t0 < budget:
        rnd.shuffle(usable)
        for p, a in usable:
            frac = (time.time() - t0) / budget
            if frac >= 1.0:
                break
            loss = train_step(lm, p, a, gen)
            (loss / accumulate).backward()
            losses.append(float(loss.detach()))
            seen += 1
            if seen % accumulate == 0:
                warm = min(1.0, (step + 1) / 10)
                for grp in opt.param_groups:
                    grp["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            if seen % log_every == 0:
                recent = sum(losses[-log_every:]) / log_every
                curve.append({"answers": seen, "minutes": round((time.time() - t0) / 60, 2), "loss": round(recent, 4)})
                if progress:
                    print(f"adapt-diffusion: {seen} answers, {(time.time() - t0) / 60:.1f}/{minutes:g} min, "
                          f"loss {recent:.3f}", file=sys.stderr, flush=True)
    lm.eval()
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}."))
    save_delta(lm, tmp, extra={"training": {"answers_seen": seen, "optimizer_steps": step, "minutes": minutes,
                                            "lr": lr, "training_answers": len(usable), "curve": curve}})
    tmp.chmod(0o755)                                      # mkdtemp's 0700 is not what a model directory needs
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return lm


def adapt_default(out: Path | None = None, minutes: float = 45.0, block: int = 16, rank: int = 16, lr: float = 1e-3,
                  questions: str | None = None, cache_dir: str | None = None, progress: bool = True,
                  held_out: set[str] | frozenset[str] = frozenset()) -> Path:
    """The whole job on the embedded default model: its answers (cached), then ``adapt``; returns
    the delta directory (``out``, default ``<cache>/smollm2-135m-bd-<block>-<rank>``). ``held_out``:
    question ids never trained on (the CLI passes the shipped benchmark prompts')."""
    from decograph.apps.adapt_data import distill_answers, training_prompts
    from decograph.errors import InputError
    from decograph.models import gguf_package as gp
    from decograph.models.default import load_default_model

    if minutes <= 0:
        raise InputError(f"adapt-diffusion: --minutes must be > 0, got {minutes}")
    root = gp.cache_root(cache_dir)
    model, tok = load_default_model(progress=progress)
    prompts = training_prompts(tok, questions, held_out)
    pairs = distill_answers(model, tok, prompts, root / "adapt-diffusion" / f"answers-{len(prompts)}.jsonl",
                            progress=progress)
    target = Path(out) if out is not None else root / f"smollm2-135m-bd-{block}-{rank}"
    adapt(model, pairs, target, minutes=minutes, config=BlockDiffusionConfig(block=block, rank=rank), lr=lr,
          progress=progress)
    return target
