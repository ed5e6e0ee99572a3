"""``decograph train-mdm``: train a small masked diffusion LM on the Python standard library.

No pretrained diffusion LM can be downloaded here, so decograph trains its own on a corpus
every machine has offline: the ``.py`` files of the running Python's standard library (code,
docstrings and ``pydoc_data``'s documentation text; test packages excluded). Files whose path
hashes to 0 mod 20 are held out for the benchmark.

- Tokenizer: bytes, and whitespace runs as single tokens (``vocab_size`` 300: the 256 byte
  values, three special tokens: ``<|endoftext|>`` (EOS, also the padding after a file's end),
  ``<|mask|>``, ``<|pad|>``, and 41 merges of whitespace, ``merges="whitespace"``: a line's
  newline and indentation are one token; 1.27 bytes a token). On bytes alone a model this
  small fills a masked span with spaces (indentation is a quarter of the corpus' bytes, so a
  far position's likeliest byte is a space, confidently, and unmasking commits those first).
  A BPE over the whole text (``merges="all"``; 320 tokens: 1.6 bytes a token) leaves it unsure
  of every token but the next one (about one token per step at any threshold).
- Objective (LLaDA): draw t ~ U(0, 1], mask each token with probability t, minimise the
  cross-entropy of the masked tokens weighted by 1/t. The batch's t are stratified (one in
  each of ``batch_size`` equal slices of (0, 1], MDLM's low-discrepancy sampler): the same
  objective with less variance. Half the rows keep a random-length prefix unmasked (LLaDA's
  SFT form: a prompt, then a masked response). ``block_rows`` (default 0) makes that share of
  rows the canvas semi-autoregressive decoding sees instead: a clean prefix, a block of 16 or
  32 tokens masked with ratio t (the loss), the positions after it all masked, half the time
  a clean suffix; its loss has at most a block's tokens, so in 25 minutes it learns less.
- Self-distillation (``decograph.apps.distill_mdm``; ``distill_minutes``, default 8, after the 20 minutes of the LLaDA
  objective; dParallel's certainty-forcing distillation, Chen et al. 2025): half the time the
  model infills spans of training text one token per step (its own LLaDA-baseline decoding,
  through decograph's ``fast_dllm`` at threshold 1.0 with the dual cache), half it is
  fine-tuned on those fills on the semi-autoregressive canvas (cross-entropy against its own
  tokens plus the entropy of those it predicts right), half of each batch the same windows'
  own text (cross-entropy only: without it the model grows sure of its likeliest tokens
  everywhere, and its fills repeat them). Trained on the text alone the model is
  rarely sure of two masked tokens at once (0.98 forwards a token at Fast-dLLM's threshold
  0.9); its own fills are a deterministic function of their context, and learning them makes
  it sure of several at once, so parallel unmasking commits more per step and writes what
  one-at-a-time decoding would have.
- Speed: bfloat16 autocast with fp32 weights where the CPU computes bf16 natively, fp32
  otherwise (25 minutes were 2602-2958 steps on CPUs with native bf16, 732 on one without); the
  forward is compiled with ``torch.compile`` where it compiles (eager otherwise). Inference
  runs in fp32.
- Output: ``config.json``, ``model.safetensors``, the tokenizer files and ``train.json`` (the
  loss curve) in ``$XDG_CACHE_HOME/decograph/models/mdm-stdlib-<fingerprint>``, written to a
  temporary directory and renamed when complete; later runs reuse it.

    decograph train-mdm                 # --minutes 20 --distill-minutes 8
    model, tok = load_trained_mdm()
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from decograph.apps.distill_mdm import self_distill
from decograph.apps.mdm_training import TrainConfig, TrainLoop, draw_t
from decograph.errors import InputError, ModelError
from decograph.models.mdm import MDMConfig, MDMTransformer, load_mdm, save_mdm

__all__ = ["TrainConfig", "TrainLoop", "draw_t", "stdlib_files", "held_out", "train_tokenizer", "train_mdm", "trained_mdm_dir",
           "load_trained_mdm", "held_out_samples"]

EOS, MASK, PAD = "<|endoftext|>", "<|mask|>", "<|pad|>"
_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of every standard-library ``.py`` file, sorted, tests excluded."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise InputError(f"standard library directory {base} not found")
    out = []
    for f in sorted(base.rglob("*.py")):
        rel = f.relative_to(base)
        if _SKIP.intersection(rel.parts):
            continue
        try:
            out.append((rel.as_posix(), f.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    if not out:
        raise InputError(f"no .py files under {base}")
    return out


def held_out(rel: str) -> bool:
    """Whether a corpus file is held out (not trained on): its path's CRC32 is 0 mod 20."""
    return zlib.crc32(rel.encode()) % 20 == 0


def train_tokenizer(texts: list[str], vocab_size: int, merges: str = "all") -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with EOS, mask and pad tokens, of at most
    ``vocab_size`` tokens; ``merges="whitespace"`` learns merges of whitespace runs only (every
    other byte stays a token of its own)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if merges not in ("all", "whitespace"):
        raise InputError(f"train-mdm: merges must be 'all' or 'whitespace', got {merges!r}")
    tok = Tokenizer(models.BPE())
    if merges == "all":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:       # a whitespace run is a piece of its own (a space before a word too)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, MASK, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if merges == "all" else [r for t in texts for r in re.findall(r"\s{2,}", t)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, mask_token=MASK, pad_token=PAD)


def trained_mdm_dir(config: TrainConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    cfg = config or TrainConfig()
    root = Path(cache_dir) if cache_dir is not None else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decograph" / "models"
    return root / f"mdm-stdlib-{cfg.fingerprint()}"


def load_trained_mdm(config: TrainConfig | None = None, cache_dir: str | Path | None = None) -> tuple[MDMTransformer, Any]:
    """The checkpoint ``train-mdm`` wrote (model in eval mode, tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    d = trained_mdm_dir(config, cache_dir)
    if not (d / "train.json").is_file():
        raise ModelError(f"no trained masked diffusion model at {d}: run `decograph train-mdm` first")
    return load_mdm(d), PreTrainedTokenizerFast.from_pretrained(str(d))


def _train_forward(model: MDMTransformer, cfg: TrainConfig, log: Any) -> Any:
    """``(ids, positions) -> logits`` for training: ``torch.compile``d where ``cfg.compile``
    allows and it compiles on this machine (tried on the first call; ``auto`` falls back to
    eager with a message, ``on`` raises)."""
    if cfg.compile not in ("auto", "on", "off"):
        raise InputError(f"train-mdm: compile must be auto, on or off, got {cfg.compile!r}")
    if cfg.compile == "off":
        return lambda ids, pos: model(ids, pos)[0]
    compiled = torch.compile(model)
    chosen: list[Any] = []

    def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if chosen:
            return chosen[0](ids, pos)[0]
        try:
            out = compiled(ids, pos)[0]
        except Exception as e:      # no C++ compiler, an unsupported CPU: train eagerly
            if cfg.compile == "on":
                raise
            log(f"train-mdm: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); training eagerly")
            chosen.append(model)
            return model(ids, pos)[0]
        chosen.append(compiled)
        return out
    return forward


def _masked_batch(data: list[torch.Tensor], cfg: TrainConfig, eos: int, mask: int,
                  rng: random.Random, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs with masks, targets, loss weights (1/t on masked positions, 0 elsewhere)."""
    weights = [len(d) for d in data]
    rows = []
    for d in rng.choices(data, weights=weights, k=cfg.batch_size):
        start = rng.randrange(0, max(1, len(d) - cfg.seq_len // 2))
        piece = d[start:start + cfg.seq_len]
        if len(piece) < cfg.seq_len:    # the file ends: EOS, then EOS as padding (LLaDA)
            piece = torch.cat([piece, torch.full((cfg.seq_len - len(piece),), eos, dtype=piece.dtype)])
        rows.append(piece)
    x = torch.stack(rows).long()
    t = draw_t(cfg.batch_size, gen)[:, None]
    masked = torch.rand(x.shape, generator=gen) < t
    n, windows = cfg.seq_len, []
    for i in range(cfg.batch_size):
        if rng.random() < cfg.block_rows:
            # the canvas semi-autoregressive decoding sees: a clean prefix, the current block
            # masked with ratio t, the later blocks all masked, maybe a clean suffix (infilling);
            # the loss is the block's (its masked tokens, weighted 1/t)
            b = rng.choice(cfg.blocks)
            start = rng.randrange(1, n - b)
            rest = n - start - b
            end = n - (rng.randrange(1, rest // 2 + 1) if rng.random() < 0.5 and rest >= 2 else 0)
            masked[i, :start] = False
            masked[i, start + b:end] = True
            masked[i, end:] = False
            windows.append((i, start, start + b))
        elif rng.random() < 0.5:          # SFT form: an unmasked prompt, then the masked response
            masked[i, : rng.randrange(1, n // 2)] = False
    weight = masked.float() / t
    for i, lo, hi in windows:             # a block row's loss is its block's
        weight[i, :lo] = 0.0
        weight[i, hi:] = 0.0
    inp = torch.where(masked, torch.full_like(x, mask), x)
    return inp, x, weight


def train_mdm(config: TrainConfig | None = None, cache_dir: str | Path | None = None, *, force: bool = False,
              progress: bool = True, stdlib_root: str | Path | None = None, log: Any = print) -> Path:
    """Trains (or reuses) the checkpoint; returns its directory."""
    from tqdm import tqdm

    cfg = config or TrainConfig()
    if cfg.minutes <= 0 and cfg.max_steps <= 0:
        raise InputError("train-mdm: --minutes or --max-steps must be > 0")
    for name in ("distill_minutes", "distill_rows", "distill_steps", "distill_entropy", "distill_lr", "distill_mix"):
        if getattr(cfg, name) < 0:
            raise InputError(f"train-mdm: {name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.distill_mix > 1:
        raise InputError(f"train-mdm: distill_mix is a share, at most 1, got {cfg.distill_mix}")
    target = trained_mdm_dir(cfg, cache_dir)
    if (target / "train.json").is_file() and not force:
        log(f"reusing the trained model at {target} (--force retrains)")
        return target
    torch.manual_seed(cfg.seed)
    bf16 = cfg.use_bf16()
    files = stdlib_files(stdlib_root)
    train_texts = [t for rel, t in files if not held_out(rel)]
    log(f"corpus: {len(files)} standard-library files, {len(train_texts)} for training, "
        f"{sum(map(len, train_texts)) / 1e6:.1f} MB")
    tok = train_tokenizer(train_texts, cfg.vocab_size, cfg.merges)
    eos, mask, pad = (tok.convert_tokens_to_ids(t) for t in (EOS, MASK, PAD))
    data = [torch.tensor(ids + [eos], dtype=torch.int32)
            for ids in tok(train_texts, add_special_tokens=False)["input_ids"] if ids]
    log(f"tokenized: {sum(map(len, data)) / 1e6:.2f} M tokens")
    mcfg = MDMConfig(vocab_size=len(tok), mask_token_id=mask, eos_token_id=eos, pad_token_id=pad,
                     d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                     max_len=max(512, cfg.seq_len))
    model = MDMTransformer(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    pos = torch.arange(cfg.seq_len).expand(cfg.batch_size, -1)
    budget = cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    start = time.perf_counter()
    bar = tqdm(total=int(budget) if cfg.max_steps == 0 else cfg.max_steps, disable=not progress,
               unit="s" if cfg.max_steps == 0 else "step", desc="train-mdm")
    loop = TrainLoop(bar, cfg.max_steps > 0, 0.98)
    forward = _train_forward(model, cfg, log)
    while (cfg.max_steps == 0 or loop.step < cfg.max_steps) and loop.elapsed() < budget:
        frac = min(1.0, loop.elapsed() / budget) if cfg.max_steps == 0 else loop.step / cfg.max_steps
        lr = cfg.lr * min(1.0, (loop.step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        inp, tgt, w = _masked_batch(data, cfg, eos, mask, rng, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(inp, pos)
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="none")
        loop.update(model, opt, (ce * w.flatten()).sum() / tgt.numel())
    bar.close()
    step, ema = loop.step, loop.ema
    pretrain = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "final_loss": ema}
    distilled = None
    if cfg.distills:
        distilled = self_distill(model, tok, data, cfg, bf16, rng, gen, progress)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=".mdm-", dir=_mkdir(target.parent)))
    try:
        save_mdm(model, tmp)
        tok.save_pretrained(str(tmp))
        info = {"train_config": asdict(cfg), "steps": step, "seconds": round(time.perf_counter() - start, 1),
                "tokens_seen": step * cfg.batch_size * cfg.seq_len, "final_loss": ema, "curve": loop.curve,
                "python": sys.version.split()[0], "bf16_autocast": bf16, "pretrain": pretrain,
                "distill": distilled}
        (tmp / "train.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"trained {step} steps in {pretrain['seconds']:.0f} s (loss {ema:.3f})"
        + (f", self-distilled on {distilled['rows']} own fills in {distilled['steps']} steps" if distilled else "")
        + f" ({info['seconds']:.0f} s in all); saved to {target}")
    return target


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def held_out_samples(tok: Any, prompt_len: int, gen_len: int, n: int, seed: int = 0,
                     stdlib_root: str | Path | None = None) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt, reference continuation) token pairs from held-out files, taken at line starts."""
    rng = random.Random(seed)
    out = []
    texts = [t for rel, t in stdlib_files(stdlib_root) if held_out(rel)]
    pool = [ids for ids in tok(texts, add_special_tokens=False)["input_ids"] if len(ids) > prompt_len + gen_len]
    if not pool:
        raise InputError(f"no held-out file has {prompt_len + gen_len} tokens")
    for _ in range(n):
        ids = rng.choice(pool)
        s = rng.randrange(0, len(ids) - prompt_len - gen_len)
        out.append((ids[s:s + prompt_len], ids[s + prompt_len:s + prompt_len + gen_len]))
    return out
