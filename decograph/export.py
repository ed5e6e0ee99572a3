"""``decograph export``: a self-contained decoder directory (see ``decograph.exported``).

    export_decoder("anpd", "out/", quant="int4")        # the default model; or model=DIR
    export_decoder("anpd", "out/", quant="int4", block_size=128)   # faster, less accurate

Written into a temporary directory beside ``out`` and renamed when complete, so a failed export
leaves nothing half-written. The strategy goes through the pass pipeline first; the exported
runner executes greedy verification of no draft, an n-gram chain (``ngram``, ``adaptive_ngram``),
Jacobi or Gauss-Seidel-Jacobi iteration, or lookahead (a Jacobi window and an n-gram pool,
``decograph.exported_drafts``); other strategies (draft models, branches, sampling, masked
diffusion) are refused with a named error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from decograph.errors import InputError, UnsupportedError
from decograph.exported import MANIFEST_VERSION, _sha
from decograph.files import check_output_dir, staging_dir
from decograph.ir import ops as O

__all__ = ["export_decoder", "runner_plan"]

_SENTINEL = "\u2063PROMPT\u2063"


def runner_plan(program: O.Program) -> dict[str, Any]:
    """What the exported runner executes for ``program``, or ``UnsupportedError`` naming the step."""
    loops = [op for op in program.body.ops if isinstance(op, O.Iterate)]
    if len(loops) != 1 or any(isinstance(op, (O.Fork, O.Join)) for op in program.walk()):
        raise UnsupportedError(f"strategy {program.name!r}: the exported runner runs one decoding loop without fork/join")
    drafts = [op for op in loops[0].body.ops if isinstance(op, O.DRAFT_OPS)]
    for op in loops[0].body.ops:
        if isinstance(op, O.VERIFY_OPS + O.UNMASK_OPS) and not isinstance(op, O.VerifyGreedy):
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}`; the exported runner verifies greedily only")
    kinds = sorted(type(op).__name__ for op in drafts)
    if not drafts:
        return {"draft": None}
    op = drafts[0]
    if kinds == ["DraftJacobi", "DraftNgramPool"]:          # lookahead: a Jacobi window and an n-gram pool
        jac = next(d for d in drafts if isinstance(d, O.DraftJacobi))
        pool = next(d for d in drafts if isinstance(d, O.DraftNgramPool))
        return {"draft": "lookahead", "window": jac.window, "n": pool.n, "candidates": 1}
    if len(drafts) == 1 and isinstance(op, (O.DraftNgram, O.DraftAdaptiveNgram)):
        # one chain: the runner keeps no token tree (several candidates would need tree masks)
        return {"draft": op.NAME.split(".", 1)[1], "k": op.k, "max_n": op.max_n, "min_n": op.min_n,
                "adaptive": bool(getattr(op, "adaptive", False))}
    if len(drafts) == 1 and isinstance(op, O.DraftJacobi):
        return {"draft": "jacobi", "window": op.window, "init": op.init}
    if len(drafts) == 1 and isinstance(op, O.DraftGaussSeidelJacobi):
        return {"draft": "gauss_seidel_jacobi", "block": op.block, "init": op.init}
    raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}`; the exported runner drafts with an n-gram "
                           f"chain (ngram, adaptive_ngram), Jacobi or Gauss-Seidel-Jacobi iteration, lookahead "
                           f"(jacobi + ngram_pool), or nothing")


def export_decoder(strategy: Any, out: str | Path, *, model: Any = None, quant: str = "none", block_size: int = 32,
                   overrides: dict[str, Any] | None = None, passes: str = "default", chat: bool = True,
                   dtype: str = "float32", progress: Any = print) -> Path:
    from decograph.api import _program, optimize, resolve_model
    from decograph.backends.onnxruntime.export import GRAPH_VERSION, QUANT, export_step, quantize_step
    from decograph.frontends.adapters import HFCausalLM
    from decograph.ir.jsonform import to_json

    if quant not in ("none", "int4", "int8"):
        raise InputError(f"--quant must be none, int4 or int8, got {quant!r}")
    if block_size not in (16, 32, 64, 128, 256):
        raise InputError(f"block_size must be 16, 32, 64, 128 or 256, got {block_size}")
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype must be float32 or float16 (for ONNX Runtime's CUDA EP), got {dtype!r}")
    target = Path(out)
    check_output_dir(target, "the exported decoder")      # a file, a used or unwritable place: before any work
    adapter, tok = resolve_model(model)
    if not isinstance(adapter, HFCausalLM):
        raise UnsupportedError(f"export needs a Hugging Face causal LM, got {type(adapter).__name__}")
    program = optimize(_program(strategy, overrides), adapter, passes)
    plan = runner_plan(program)
    with staging_dir(target, "the exported decoder") as tmp:     # renamed onto target when complete
        progress(f"exporting the decoding step of {type(adapter.model).__name__} to ONNX ...")
        step = export_step(adapter.model, tmp / "model.step.onnx", dtype=dtype)
        model_file = "model.onnx"
        if quant == "none":
            step.rename(tmp / model_file)
        else:
            progress(f"quantizing the weights to {quant} (MatMulNBits) ...")
            quantize_step(step, tmp / model_file, bits=int(quant[3:]), block_size=block_size)
            step.unlink()
        tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "strategy.json").write_text(json.dumps(to_json(program), indent=1), encoding="utf-8")
        chat_prompt = None
        if getattr(tok, "chat_template", None):
            chat_prompt = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                                  tokenize=False).replace(_SENTINEL, "{prompt}")
        m = adapter.model
        text = m.config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        manifest = {
            "format": "decograph-exported-decoder", "version": MANIFEST_VERSION,
            "strategy": program.name, "passes": passes, "plan": plan, "quant": quant, "dtype": dtype, "model_file": model_file,
            "graph": GRAPH_VERSION, "quant_settings": dict(QUANT, block_size=block_size) if quant != "none" else None,
            "model": getattr(m.config, "_name_or_path", "") or type(m).__name__,
            "num_layers": text.num_hidden_layers, "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads, "vocab_size": adapter.vocab_size,
            "eos_token_ids": list(adapter.eos_token_ids), "max_positions": adapter.max_positions,
            "chat_prompt": chat_prompt, "chat_default": bool(chat and chat_prompt),
            "files": {},
        }
        manifest["files"] = {f.name: _sha(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return target
