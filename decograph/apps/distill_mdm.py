"""``train-mdm``'s second stage: self-distillation of the masked diffusion LM on its own fills.

After dParallel's certainty-forcing distillation (Chen et al. 2025): the model trained with the
LLaDA objective infills windows of training text one token per step, then is fine-tuned to be
sure of those fills on the canvas semi-autoregressive decoding sees (see ``self_distill``).
``decograph.apps.train_mdm`` runs it when ``TrainConfig.distills`` (``--distill-minutes``, default 8).
"""
from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from decograph.models.mdm import MDMTransformer
from decograph.apps.mdm_training import TrainConfig, TrainLoop, draw_t

__all__ = ["distill_geometry", "self_distill"]


def distill_geometry(seq_len: int) -> tuple[int, int, int, int]:
    """A self-distillation row's (prompt, span, suffix, block) lengths: 128, 64, 32 and 32
    tokens (the benchmark's 64-token infilling canvas) when ``seq_len`` allows, scaled down
    otherwise."""
    unit = max(1, min(32, seq_len // 7))
    return 4 * unit, 2 * unit, unit, unit


def self_distill(model: MDMTransformer, tok: Any, data: list[torch.Tensor], cfg: TrainConfig, bf16: bool,
                 rng: random.Random, gen: torch.Generator, progress: bool) -> dict[str, Any]:
    """Certainty-forcing self-distillation (after dParallel, Chen et al. 2025), in place.

    1. Teacher fills: windows of training text cut into a prompt, a span and a suffix; the
       model itself infills each span one token per step (the lowest-confidence remasking of
       LLaDA's baseline, semi-autoregressive blocks, through decograph's own ``fast_dllm`` at
       threshold 1.0 with the dual cache).
    2. Fine-tuning on those fills: the canvas semi-autoregressive decoding sees (the prompt,
       the span's earlier blocks and the suffix clean, one block masked with ratio t, the
       later blocks masked); the loss is the cross-entropy of the block's masked tokens
       against the model's own fill, plus ``distill_entropy`` times the entropy of those it
       already predicts right; ``distill_mix`` of the rows are the windows' own text instead
       (cross-entropy only), which keeps the model a model of the text. A fill is a deterministic function of its context, so the
       model learns to be sure of several of its own tokens at once: parallel unmasking then
       commits more per step while producing what one-at-a-time decoding would."""
    from tqdm import tqdm

    from decograph.api import generate
    from decograph.frontends.strategies import load_strategy

    plen, span, slen, block = distill_geometry(cfg.seq_len)
    total, batch = plen + span + slen, max(1, cfg.batch_size * cfg.seq_len // (plen + span + slen))
    eos, mask = model.config.eos_token_id, model.config.mask_token_id
    teacher = load_strategy("fast_dllm", overrides={"block": block, "threshold": 1.0, "kv": "block_approx_dual"}).program
    budget = cfg.distill_minutes * 30           # seconds per phase: half the stage each
    long_enough = [d for d in data if len(d) >= total] or data
    weights = [len(d) for d in long_enough]
    rows: list[list[int]] = []
    texts: list[list[int]] = []                 # the same windows as written (the text itself)
    start = time.perf_counter()
    bar = tqdm(total=cfg.distill_rows or int(budget), disable=not progress, unit="row" if cfg.distill_rows else "s",
               desc="self-distill: own fills")
    model.eval()
    while (len(rows) < cfg.distill_rows) if cfg.distill_rows else (time.perf_counter() - start < budget):
        windows = []
        for d in rng.choices(long_enough, weights=weights, k=batch):
            s = rng.randrange(0, max(1, len(d) - total + 1))
            w = d[s:s + total].tolist()
            windows.append(w + [eos] * (total - len(w)))        # a short file: EOS padding (as in training)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fills = generate(model, tok, [w[:plen] for w in windows], teacher, span,
                             suffixes=[w[plen + span:] for w in windows], passes="none", eos_token_id=[])
        for w, f in zip(windows, fills):
            rows.append(w[:plen] + list(f.new_token_ids) + w[plen + span:])
            texts.append(w)
        bar.set_postfix(rows=len(rows))
        bar.update(len(fills) if cfg.distill_rows else int(time.perf_counter() - start) - bar.n)
    bar.close()
    gen_seconds = time.perf_counter() - start
    keep = cfg.distill_rows or len(rows)
    fills_t, texts_t = torch.tensor(rows[:keep]), torch.tensor(texts[:keep])
    n_text = round(batch * cfg.distill_mix)
    own = torch.arange(batch) >= n_text          # rows of the model's own fills (the rest: the text)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.distill_lr, betas=(0.9, 0.95), weight_decay=0.01)
    pos = torch.arange(total).expand(batch, -1)
    bar = tqdm(total=cfg.distill_steps or int(budget), disable=not progress, unit="step" if cfg.distill_steps else "s",
               desc="self-distill: fine-tune")
    loop = TrainLoop(bar, cfg.distill_steps > 0, 0.95)
    while (loop.step < cfg.distill_steps) if cfg.distill_steps else (loop.elapsed() < budget):
        frac = loop.step / cfg.distill_steps if cfg.distill_steps else min(1.0, loop.elapsed() / budget)
        for g in opt.param_groups:
            g["lr"] = cfg.distill_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        pick = torch.randint(len(fills_t), (batch,), generator=gen)
        x = torch.where(own[:, None], fills_t[pick], texts_t[pick])
        inp, loss_at = _distill_canvas(x, plen, span, block, mask, rng, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inp, pos)[0]
        loop.update(model, opt, _certainty_forcing_loss(logits.float(), x, loss_at, cfg.distill_entropy,
                                                        own[:, None] & loss_at))
    bar.close()
    model.eval()
    return {"rows": len(fills_t), "fill_seconds": round(gen_seconds, 1), "steps": loop.step,
            "seconds": round(loop.elapsed(), 1), "final_loss": loop.ema, "curve": loop.curve,
            "geometry": {"prompt": plen, "span": span, "suffix": slen, "block": block}}


def _distill_canvas(x: torch.Tensor, plen: int, span: int, block: int, mask: int, rng: random.Random,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (prompt, span, suffix): one of the span's blocks masked with a
    stratified ratio t, the span after it all masked, everything else clean. Returns the
    input and where the loss is (the block's masked positions)."""
    b = x.shape[0]
    t = draw_t(b, gen)[:, None]
    masked = torch.zeros(x.shape, dtype=torch.bool)
    loss_at = torch.zeros(x.shape, dtype=torch.bool)
    draw = torch.rand(x.shape, generator=gen) < t
    for i in range(b):
        lo = plen + block * rng.randrange(-(-span // block))
        hi = min(lo + block, plen + span)
        masked[i, lo:hi] = draw[i, lo:hi]
        if not masked[i, lo:hi].any():                  # at least one masked token per row
            masked[i, lo + rng.randrange(hi - lo)] = True
        loss_at[i] = masked[i]
        masked[i, hi:plen + span] = True
    return torch.where(masked, torch.full_like(x, mask), x), loss_at


def _certainty_forcing_loss(logits: torch.Tensor, target: torch.Tensor, loss_at: torch.Tensor,
                            entropy_weight: float, entropy_at: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``loss_at`` of the cross-entropy against ``target`` plus ``entropy_weight``
    times the prediction's entropy where its argmax already is the target (and, given
    ``entropy_at``, only there: the model's own fills, not the text's rows)."""
    logp = logits[loss_at].log_softmax(-1)
    tgt = target[loss_at]
    ce = -logp.gather(-1, tgt[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    right = (logp.argmax(-1) == tgt).float()
    if entropy_at is not None:
        right = right * entropy_at[loss_at].float()
    return (ce + entropy_weight * entropy * right).mean()
