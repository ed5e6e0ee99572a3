"""A block-diffusion LM adapted from a Llama-architecture causal LM (SmolLM2-135M by default).

The adaptation of Fast-dLLM v2 / DiffuLLaMA, shaped so that the autoregressive model stays
exact where it can:

- **Clean positions** (the prompt, and every block of the answer with no mask left) run the
  base model unchanged, under causal attention: their KV is the causal LM's own.
- **Noisy positions** (every position of a block, of ``block`` tokens counted from the answer's
  start, that still holds a mask) read the clean positions before their block and every
  position of their block (bidirectional inside the block), through the base weights plus a
  low-rank update (LoRA on the seven projections of every layer), with a learned embedding in
  place of the mask token's.
- **Shifted logits** (Dream's convention, which keeps the next-token head aligned): the logits
  at position i predict the token at i + 1. A block's first token is therefore predicted by the
  last clean position, exactly as the causal LM predicts it.

What ships is the delta (``delta.safetensors``: the LoRA factors and the mask embedding, a few
MB) and ``config.json`` naming the base model; the base weights come from the packaged model.

    lm = BlockDiffusionLM(base_model, BlockDiffusionConfig())            # trainable, from a base
    adapter = load_block_diffusion("path/to/delta-dir")                  # for unmask strategies
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from decograph.errors import ModelError
from decograph.models.block_diffusion_fast import LoRAProjections, PackedProjections
from decograph.models.block_layout import block_causal_layout
from decograph.models.fast_llama import rms_norm, rotate_half

__all__ = ["BlockDiffusionConfig", "BlockDiffusionLM", "BLOCK_DIFFUSION_TYPE", "save_delta", "load_delta",
           "shipped_model_path", "SHIPPED_NAME"]

SHIPPED_NAME = "smollm2-135m-bd"

BLOCK_DIFFUSION_TYPE = "decograph-block-diffusion"
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KV = list[tuple[torch.Tensor, torch.Tensor]]          # per layer: roped keys, values [B, kv_heads, T, head_dim]


@dataclass
class BlockDiffusionConfig:
    block: int = 16                  # the diffusion block, in tokens, counted from the answer's first token
    rank: int = 16                   # LoRA rank of the noisy path
    alpha: float = 32.0              # LoRA scale numerator (the update is alpha / rank * B @ A)
    mask_token_id: int = 16          # SmolLM2's ``<empty_output>``: a special token no chat uses
    base: str = "smollm2-135m-instruct"

    def check(self, where: str) -> None:
        for name in ("block", "rank"):
            if int(getattr(self, name)) < 1:
                raise ModelError(f"{where}: field {name!r} must be >= 1, got {getattr(self, name)}")


class _LoRA(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int, rank: int) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(rank, n_in) / math.sqrt(n_in))
        self.b = torch.nn.Parameter(torch.zeros(n_out, rank))


class BlockDiffusionLM(torch.nn.Module):
    """The base causal LM (frozen) plus the noisy path's LoRA factors and mask embedding."""

    def __init__(self, base: Any, config: BlockDiffusionConfig) -> None:
        super().__init__()
        config.check("block-diffusion config")
        if type(base).__name__ != "LlamaForCausalLM":
            raise ModelError(f"block diffusion adapts Llama-architecture causal LMs, not {type(base).__name__}")
        self.base, self.config = base, config
        for p in base.parameters():
            p.requires_grad_(False)
        c = base.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale_lora = config.alpha / config.rank
        self.lora = torch.nn.ModuleList()
        for layer in base.model.layers:
            mods = {**{n: getattr(layer.self_attn, n) for n in _PROJ[:4]}, **{n: getattr(layer.mlp, n) for n in _PROJ[4:]}}
            self.lora.append(torch.nn.ModuleDict({n: _LoRA(m.in_features, m.out_features, config.rank)
                                                  for n, m in mods.items()}))
        emb = base.model.embed_tokens.weight.detach()
        self.mask_embed = torch.nn.Parameter(emb.mean(0).clone())
        self.vocab_size = int(base.lm_head.weight.shape[0])
        self._packed: tuple[tuple[int, ...], PackedProjections] | None = None

    def projections(self) -> LoRAProjections | PackedProjections:
        """The training form while gradients flow; else the packed inference form, rebuilt when
        a parameter changed in place (an optimizer step) since it was made."""
        if self.training or torch.is_grad_enabled():
            return LoRAProjections(self)
        version = tuple(p._version for p in self.parameters())
        if self._packed is None or self._packed[0] != version:
            self._packed = (version, PackedProjections(self))
        return self._packed[1]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, noisy: torch.Tensor, attend: torch.Tensor,
                context: KV | None = None, return_kv: bool = False,
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, KV | None]:
        """Queries ``ids [B, T]`` at ``pos``; ``noisy [B, T]`` picks the noisy path per position;
        ``attend [B, T, C + T]`` (bool) the keys each query reads: ``context``'s ``C`` then the
        queries'. Returns the logits (float32; at ``logits_at [B, K]`` only when given) and, with
        ``return_kv``, the queries' KV."""
        base = self.base.model
        b, t = ids.shape
        h = F.embedding(ids, base.embed_tokens.weight)
        is_mask = (ids == self.config.mask_token_id) & noisy
        h = torch.where(is_mask[..., None], self.mask_embed.to(h.dtype), h)
        any_noisy = bool(noisy.any())
        gate = noisy[..., None].to(h.dtype) if any_noisy and not bool(noisy.all()) else None
        cos, sin = base.rotary_emb(h, position_ids=pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        bias = torch.zeros(attend.shape, dtype=h.dtype).masked_fill_(~attend, torch.finfo(h.dtype).min)[:, None]
        proj = self.projections()
        kv_out: KV = []
        for i, layer in enumerate(base.layers):
            x = rms_norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in proj.qkv(i, x, gate, any_noisy))
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if return_kv:
                kv_out.append((k, v))
            if context is not None:
                k, v = torch.cat([context[i][0], k], 2), torch.cat([context[i][1], v], 2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=layer.self_attn.scaling,
                                               enable_gqa=self.heads != self.kv_heads)
            h = h + proj.o(i, a.transpose(1, 2).reshape(b, t, -1), gate, any_noisy)
            x = rms_norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            g, u = proj.gate_up(i, x, gate, any_noisy)
            h = h + proj.down(i, F.silu(g) * u, gate, any_noisy)
        if logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        h = rms_norm(h, base.norm.weight, base.norm.variance_epsilon)
        return proj.lm_head(h).float(), (kv_out if return_kv else None)

    def layout(self, ids: torch.Tensor, pos: torch.Tensor, key_valid: torch.Tensor, gen_start: torch.Tensor,
               context_pos: torch.Tensor | None = None,
               context_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy, attend)`` of ``block_layout.block_causal_layout`` (the one implementation)."""
        def np_(x: torch.Tensor | None) -> np.ndarray | None:
            return None if x is None else x.cpu().numpy()

        noisy, attend = block_causal_layout(np_(ids), np_(pos), np_(key_valid), np_(gen_start), self.config.block,
                                            self.config.mask_token_id, np_(context_pos), np_(context_valid))
        return torch.from_numpy(noisy), torch.from_numpy(attend)


def save_delta(lm: BlockDiffusionLM, target: Path, extra: dict[str, Any] | None = None, half: bool = True) -> None:
    """``config.json`` and ``delta.safetensors`` (LoRA factors and mask embedding; fp16 with ``half``)."""
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if half else v.detach()).contiguous()
             for k, v in lm.state_dict().items() if not k.startswith("base.")}
    save_file(state, str(target / "delta.safetensors"))
    cfg = {"model_type": BLOCK_DIFFUSION_TYPE, **asdict(lm.config), **(extra or {})}
    (target / "config.json").write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")


def load_delta(path: Path, base: Any) -> BlockDiffusionLM:
    """The block-diffusion LM of delta directory ``path`` over ``base`` (its named base model)."""
    from safetensors.torch import load_file

    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_file}: cannot read the block-diffusion config ({exc})") from None
    if raw.get("model_type") != BLOCK_DIFFUSION_TYPE:
        raise ModelError(f"{cfg_file}: field 'model_type' is {raw.get('model_type')!r}, not {BLOCK_DIFFUSION_TYPE!r}")
    fields = BlockDiffusionConfig.__dataclass_fields__
    lm = BlockDiffusionLM(base, BlockDiffusionConfig(**{k: v for k, v in raw.items() if k in fields}))
    state = load_file(str(path / "delta.safetensors"))
    missing = [k for k in lm.state_dict() if not k.startswith("base.") and k not in state]
    if missing:
        raise ModelError(f"{path / 'delta.safetensors'}: missing {len(missing)} tensors (first: {missing[0]})")
    lm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return lm.eval()


def shipped_model_path(progress: bool = True) -> Path:
    """The delta directory shipped with decograph (``decograph adapt-diffusion``'s output over the
    default model; ``--model smollm2-135m-bd``)."""
    d = Path(__file__).resolve().parent / "shipped" / SHIPPED_NAME
    if not (d / "delta.safetensors").is_file():
        raise ModelError(f"{d}: the shipped block-diffusion delta is missing (reinstall decograph, or make one with "
                         f"`decograph adapt-diffusion`)")
    return d
