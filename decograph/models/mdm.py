"""decograph's own masked diffusion LM (LLaDA-style): a bidirectional transformer.

Every position attends to every valid position (no causal mask); a mask token marks the
positions still to be decoded and the model predicts the token at every position. The KV of
positions outside the current query can be passed in (``context``): RoPE is applied before
caching, so under bidirectional attention the context's order does not matter, which is what
the block-wise approximate caches (Fast-dLLM's prefix and dual cache) rely on.

    model = MDMTransformer(MDMConfig(vocab_size=4096, mask_token_id=1, eos_token_id=0))
    logits, kv = model(ids, positions, return_kv=True)
    logits_b, _ = model(ids[:, 8:12], positions[:, 8:12], context=[(k[..., :8, :], v[..., :8, :]) for k, v in kv])

A directory holds ``config.json`` (``model_type: decograph-mdm``) and ``model.safetensors``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decograph.errors import ModelError

__all__ = ["MDM_MODEL_TYPE", "MDMConfig", "MDMTransformer", "KV", "load_mdm", "save_mdm", "tiny_mdm"]

MDM_MODEL_TYPE = "decograph-mdm"
KV = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: keys, values [B, H, T, head_dim]


@dataclass(frozen=True)
class MDMConfig:
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int = -1
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 768
    max_len: int = 512
    rope_theta: float = 10000.0
    model_type: str = MDM_MODEL_TYPE

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            if getattr(self, name) < 1:
                raise ModelError(f"MDM config field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ModelError(f"MDM config: d_model {self.d_model} must split into {self.n_heads} heads of even size")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ModelError(f"MDM config field 'mask_token_id' {self.mask_token_id} is outside the vocabulary "
                             f"(size {self.vocab_size})")


class _Block(nn.Module):
    def __init__(self, cfg: MDMConfig) -> None:
        super().__init__()
        self.h, self.dh = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                ctx: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k = _rope(qkv[:2], cos, sin)                 # Q and K rotated together: one set of ops
        v = qkv[2]
        kk, vv = (torch.cat([ctx[0], k], 2), torch.cat([ctx[1], v], 2)) if ctx is not None else (k, v)
        a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, -1))
        g, u = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u), (k, v)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: ``[x1 cos - x2 sin, x2 cos + x1 sin]``, written as
    ``x * [cos, cos] + roll(x) * [-sin, sin]`` (``cos``/``sin`` given whole-width, see
    ``MDMTransformer.forward``): four kernels instead of nine, the same bits (a product with
    a negated factor is the negated product)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class MDMTransformer(nn.Module):
    """Bidirectional transformer: RMSNorm, RoPE, SwiGLU, tied input/output embeddings."""

    def __init__(self, config: MDMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=1e-6)
        half = config.d_model // config.n_heads // 2
        inv = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        for blk in self.blocks:
            for lin in (blk.qkv, blk.gate_up):
                nn.init.normal_(lin.weight, std=0.02)
            for lin in (blk.out, blk.down):
                nn.init.normal_(lin.weight, std=0.02 / (2 * config.n_layers) ** 0.5)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, *, key_valid: torch.Tensor | None = None,
                context: KV | None = None, context_valid: torch.Tensor | None = None,
                return_kv: bool = False, logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, KV | None]:
        """Logits ``[B, T, V]`` for query ``ids`` at ``positions`` (``[B, T]``). Each query attends to
        the valid query positions (``key_valid [B, T]``, default all) and to ``context`` (per layer
        KV ``[B, H, C, head_dim]``, valid where ``context_valid [B, C]``). ``logits_at [B, K]``:
        only those query indices get logits (``[B, K, V]``; the output head is the costliest layer)."""
        if ids.shape != positions.shape or ids.dim() != 2:
            raise ModelError(f"MDM forward: ids {tuple(ids.shape)} and positions {tuple(positions.shape)} must be equal [B, T]")
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= self.config.max_len:
            raise ModelError(f"MDM forward: position {int(positions.max())} is past the model's max_len {self.config.max_len}")
        ang = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        cos, sin = torch.cat([c, c], -1), torch.cat([-s, s], -1)         # whole-width, for _rope
        mask = None
        if key_valid is not None or context is not None:
            b, t = ids.shape
            qv = key_valid if key_valid is not None else torch.ones(b, t, dtype=torch.bool, device=ids.device)
            if context is not None:
                c = context[0][0].shape[2]
                cv = context_valid if context_valid is not None else torch.ones(b, c, dtype=torch.bool, device=ids.device)
                qv = torch.cat([cv, qv], 1)
            mask = None if bool(qv.all()) else qv[:, None, None, :]
        x = self.embed(ids)
        kv: KV = []
        for i, blk in enumerate(self.blocks):
            x, layer_kv = blk(x, cos, sin, mask, context[i] if context is not None else None)
            if return_kv:
                kv.append(layer_kv)
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        logits = F.linear(self.norm(x), self.embed.weight)
        return logits, (kv if return_kv else None)


def save_mdm(model: MDMTransformer, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**asdict(model.config), **(extra or {})}, indent=2), encoding="utf-8")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, d / "model.safetensors")


def load_mdm(directory: str | Path) -> MDMTransformer:
    """Loads a directory written by ``save_mdm`` (errors name the file and field)."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / "config.json", d / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelError(f"{p}: missing (not a decograph masked-diffusion model directory)")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e})") from None
    if raw.get("model_type") != MDM_MODEL_TYPE:
        raise ModelError(f"{cfg_path}: field 'model_type' is {raw.get('model_type')!r}, expected {MDM_MODEL_TYPE!r}")
    names = {f.name for f in fields(MDMConfig)}
    try:
        cfg = MDMConfig(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:
        raise ModelError(f"{cfg_path}: {e}") from None
    model = MDMTransformer(cfg)
    try:
        model.load_state_dict(load_file(str(w_path)))
    except RuntimeError as e:
        raise ModelError(f"{w_path}: weights do not match {cfg_path}: {str(e).splitlines()[0]}") from None
    return model.eval()


def tiny_mdm(vocab_size: int = 64, n_layers: int = 2, seed: int = 0, d_model: int = 32, max_len: int = 256,
             mask_token_id: int = 1, eos_token_id: int = 0) -> MDMTransformer:
    """A random-weight MDM for unit tests; weights scaled up so that predictions vary by
    position and context (a freshly initialised one predicts nearly the same token everywhere)."""
    g = torch.Generator().manual_seed(seed)
    model = MDMTransformer(MDMConfig(vocab_size=vocab_size, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                                     d_model=d_model, n_layers=n_layers, n_heads=2, d_ff=2 * d_model, max_len=max_len))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p is model.embed.weight else p.shape[1] ** -0.5))
    return model.eval()
