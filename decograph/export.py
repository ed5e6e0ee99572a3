"""``decograph export``: a self-contained decoder directory (see ``decograph.exported``).

    export_decoder("anpd", "out/", quant="int4")        # the default model; or model=DIR
    export_decoder("my_strategy.yaml", "out/", quant="int4", block_size=128)

Export writes artifacts, not code: the strategy's program after the pass pipeline (the IR's
JSON form, what the decoder runs on the runtime's interpreter), the step graph, the tokenizer
and its chat template, and a manifest (``decograph.backends.onnxruntime.manifest``) that
lists and hashes them. Any program the runtime runs on a causal LM exports: every built-in
strategy and any strategy file, drafts, trees, sampling and fork/join included. The unmask
strategies export with decograph's masked-diffusion model (``model=`` its directory or an
``MDMTransformer``): its forward graph (``mdm.build_mdm``, fp32) runs them, both block-wise
caches included. ``draft.model`` strategies export with their draft models
(``draft_models={"small": model_or_dir}``, ``--draft-model small=DIR``): each draft model's own
step graph, in the target's precision, is written beside the target's (manifest role
``draft:<name>``) and drafts on ONNX Runtime. ``draft.head`` strategies (``eagle``,
``eagle_anpd``) export with their draft heads: each head the program names, resolved for the
model (``decograph.heads.store.resolve_head``: a head file, or the shipped or trained one), is
written as its own graph beside the step graph (``graph_head``; ``head_quant`` ``"auto"``: int8
weights when the target is quantized (as well drafted as fp32's, cheaper), fp32 when it is not;
``"int4"`` compact and approximate; manifest role ``head:<i>``), and the step graph returns the hidden
states the heads read (``hidden``). Written
into a staging directory beside ``out`` and renamed when complete, so a failed export leaves
nothing half-written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from decograph.backends.onnxruntime.manifest import write_manifest
from decograph.errors import InputError, UnsupportedError
from decograph.files import check_output_dir, staging_dir
from decograph.heads.corpus import save_corpus
from decograph.ir import ops as O

__all__ = ["export_decoder", "check_exportable"]

_SENTINEL = "\u2063PROMPT\u2063"


def check_exportable(program: O.Program, diffusion: bool = False, draft_models: tuple[str, ...] = ()) -> None:
    """``UnsupportedError`` naming the step when ``program`` needs what an export lacks
    (``diffusion``: the model is a masked-diffusion one, which runs unmask programs only;
    ``draft_models``: the names of the draft models exported with it)."""
    if diffusion:
        from decograph.runtime.unmask import unmask_loop

        unmask_loop(program)
        return
    for op in program.walk():
        if isinstance(op, O.DraftModel) and op.model not in draft_models:
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}(model={op.model})` needs its draft "
                                   f"model: pass draft_models={{'{op.model}': model}} (--draft-model "
                                   f"{op.model}=DIR)")
        if isinstance(op, (O.DraftNoise,) + O.NOISE_RULES):
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}` needs a uniform-noise diffusion model "
                                   f"(DiffusionGemma), which runs on the torch and onnxruntime backends but has no "
                                   f"exported decoder yet")
        if isinstance(op, O.UNMASK_OPS) or isinstance(op, O.DraftMask):
            raise UnsupportedError(f"strategy {program.name!r}: step `{op.NAME}` needs a masked-diffusion model; "
                                   f"export it with decograph's own (model= a train-mdm directory)")


def export_decoder(strategy: Any, out: str | Path, *, model: Any = None, quant: str = "none", block_size: int = 32,
                   overrides: dict[str, Any] | None = None, passes: str = "default", chat: bool = True,
                   dtype: str = "float32", draft_models: dict[str, Any] | None = None, head_quant: str = "auto",
                   progress: Any = print) -> Path:
    from decograph.api import as_program, optimize, resolve_model
    from decograph.models.adapters import HFCausalLM
    from decograph.models.diffusion import BlockDiffusionAdapter, MDMAdapter

    if quant not in ("none", "int4", "int8"):
        raise InputError(f"--quant must be none, int4 or int8, got {quant!r}")
    if block_size not in (16, 32, 64, 128, 256):
        raise InputError(f"block_size must be 16, 32, 64, 128 or 256, got {block_size}")
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype must be float32 or float16 (for ONNX Runtime's CUDA EP), got {dtype!r}")
    if head_quant not in ("auto", "none", "int4", "int8"):
        raise InputError(f"head_quant must be auto, none, int4 or int8, got {head_quant!r}")
    if head_quant == "auto":            # a quantized float32 target drafts as well, and cheaper, with an int8 head
        head_quant = "int8" if quant != "none" and dtype == "float32" else "none"
    target = Path(out)
    check_output_dir(target, "the exported decoder")      # a file, a used or unwritable place: before any work
    adapter, tok = resolve_model(model)
    if isinstance(adapter, (MDMAdapter, BlockDiffusionAdapter)):
        return _export_mdm(adapter, tok, strategy, target, quant, dtype, overrides, passes, chat, progress)
    if not isinstance(adapter, HFCausalLM):
        raise UnsupportedError(f"export needs a Hugging Face causal LM or decograph's masked-diffusion model, got "
                               f"{type(adapter).__name__}" + (" (DiffusionGemma runs on the torch and onnxruntime "
                                                              "backends; it has no exported decoder yet)"
                                                              if type(adapter).__name__ == "DiffusionGemmaAdapter" else ""))
    program = optimize(as_program(strategy, overrides), adapter, passes)
    drafts = _draft_adapters(draft_models or {}, adapter, program)
    check_exportable(program, draft_models=tuple(drafts))
    heads = _heads(adapter, program)                # resolved before anything is written
    corpora = _corpora(adapter, program)
    with staging_dir(target, "the exported decoder") as tmp:     # renamed onto target when complete
        graphs = {"target": _export_causal(adapter, tmp, "model.onnx", quant, dtype, block_size, progress,
                                           hidden=bool(heads))}
        for name, draft in drafts.items():
            graphs[f"draft:{name}"] = _export_causal(draft, tmp, f"draft.{name}.onnx", quant, dtype, block_size,
                                                     progress, f"draft model {name!r}")
        for i, (name, bound) in enumerate(sorted(heads.items())):
            graphs[f"head:{i}"] = _export_head(bound, name, tmp, f"head.{i}.onnx", adapter.max_positions, head_quant,
                                               block_size, progress)
        corpus_files = {}
        for i, (name, corpus) in enumerate(sorted(corpora.items())):
            corpus_files[name] = save_corpus(corpus, tmp / f"corpus.{i}.npz").name
        chat_prompt = _write_text_files(tmp, tok, program)
        m = adapter.model
        template = getattr(tok, "chat_template", None)
        write_manifest(tmp, {
            "strategy": program.name, "passes": passes, "program": "strategy.json", "tokenizer": "tokenizer.json",
            "graphs": graphs, "eos_token_ids": list(adapter.eos_token_ids),
            "chat_template": template if isinstance(template, str) else None, "chat_prompt": chat_prompt,
            "chat_default": bool(chat and chat_prompt),
            "model": getattr(m.config, "_name_or_path", "") or type(m).__name__,
            **({"corpora": corpus_files} if corpus_files else {}),
        })
    return target


def _corpora(adapter: Any, program: O.Program) -> dict[str, Any]:
    """The corpora of the model's answers that ``program``'s ``draft.corpus`` ops name, resolved
    for ``adapter``'s model (a missing one's ``ModelError`` says how to get one)."""
    from decograph.api.heads import corpora

    return corpora(program, adapter)


def _draft_adapters(models: dict[str, Any], target: Any, program: O.Program) -> dict[str, Any]:
    """The draft models the program names, as Hugging Face causal-LM adapters (a directory or a
    model each), checked to share the target's vocabulary; a model the program does not use is
    an error."""
    from decograph.api import resolve_model
    from decograph.models.adapters import HFCausalLM

    used = {op.model for op in program.walk() if isinstance(op, O.DraftModel)}
    out = {}
    for name, m in models.items():
        if name not in used:
            raise InputError(f"draft model {name!r}: strategy {program.name!r} has no draft.model(model={name})")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name):
            raise InputError(f"draft model name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        a, _ = resolve_model(m)
        if not isinstance(a, HFCausalLM):
            raise UnsupportedError(f"draft model {name!r}: export needs a Hugging Face causal LM, got "
                                   f"{type(a).__name__}")
        if a.vocab_size != target.vocab_size:
            raise InputError(f"draft model {name!r} has a vocabulary of {a.vocab_size} tokens, the target model "
                             f"{target.vocab_size}: they must share one vocabulary")
        out[name] = a
    return out


def _heads(adapter: Any, program: O.Program) -> dict[str, Any]:
    """The draft heads ``program``'s ``draft.head`` ops name, resolved for ``adapter``'s model
    (``resolve_head`` against its fingerprint; a missing head's ``ModelError`` names the model
    and how to train one) and bound to its weights as ``NumpyHead`` s."""
    from decograph.api.heads import model_name
    from decograph.backends.onnxruntime.export import bind_numpy_head
    from decograph.heads.store import model_fingerprint, resolve_head

    names = sorted({op.head for op in program.walk() if isinstance(op, O.DraftHead)})
    if not names:
        return {}
    m = adapter.model
    fp = model_fingerprint(m.config, m.get_input_embeddings().weight.detach().float().cpu().numpy())
    return {name: bind_numpy_head(resolve_head(name, fp, model_name(m)), m) for name in names}


def _export_head(bound: Any, name: str, tmp: Path, head_file: str, max_positions: int, quant: str, block_size: int,
                 progress: Any) -> dict[str, Any]:
    """A bound draft head's graph as ``tmp / head_file`` (fp32, or compact: ``quant`` int4/int8,
    ``graph_head.export_head``), and its manifest entry."""
    from decograph.backends.onnxruntime.graph_head import HEAD_GRAPH_VERSION, export_head

    c = bound.config
    progress(f"exporting the draft head {name!r} ({c.model_name or 'for this model'}) to ONNX ...")
    bits = 0 if quant == "none" else int(quant[3:])
    export_head(bound, tmp / head_file, bits, block_size)
    return {"file": head_file, "quant": quant, "dtype": "float32", "graph": HEAD_GRAPH_VERSION,
            "block_size": block_size if bits else None,
            "num_layers": 1, "kv_heads": c.kv_heads, "head_dim": c.head_dim, "vocab_size": len(bound.vocab_ids),
            "max_positions": max_positions, "head": name}


def _export_causal(adapter: Any, tmp: Path, model_file: str, quant: str, dtype: str, block_size: int, progress: Any,
                   what: str = "", hidden: bool = False) -> dict[str, Any]:
    """A causal LM's decoding step as ``tmp / model_file`` (quantized; ``hidden``: returning the
    final hidden states too), and its manifest entry (with the ONNX external-data file,
    ``<model_file>.data``, when the weights needed one)."""
    from decograph.backends.onnxruntime.export import export_step, graph_version, quantize_step

    m = adapter.model
    progress(f"exporting the decoding step of {what or type(m).__name__} to ONNX ...")
    if quant == "none":
        export_step(m, tmp / model_file, dtype=dtype, hidden=hidden)
    else:
        step = export_step(m, tmp / f"{model_file}.step.onnx", dtype=dtype, hidden=hidden)
        progress(f"quantizing the weights to {quant} (MatMulNBits) ...")
        quantize_step(step, tmp / model_file, bits=int(quant[3:]), block_size=block_size)
        step.unlink()
        step.with_name(step.name + ".data").unlink(missing_ok=True)
    text = m.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    entry = {"file": model_file, "quant": quant, "dtype": dtype, "graph": graph_version(m, hidden),
             "block_size": block_size if quant != "none" else None, "num_layers": text.num_hidden_layers,
             "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
             "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
             "vocab_size": adapter.vocab_size, "max_positions": adapter.max_positions}
    if (tmp / f"{model_file}.data").is_file():
        entry["external_data"] = [f"{model_file}.data"]
    return entry


def _write_text_files(tmp: Path, tok: Any, program: O.Program) -> str | None:
    """The tokenizer and the program into ``tmp``; the chat template rendered around a
    placeholder (None without one)."""
    from decograph.ir.jsonform import to_json

    tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "strategy.json").write_text(json.dumps(to_json(program), indent=1), encoding="utf-8")
    if not getattr(tok, "chat_template", None):
        return None
    return tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                   tokenize=False).replace(_SENTINEL, "{prompt}")


def _export_mdm(adapter: Any, tok: Any, strategy: Any, target: Path, quant: str, dtype: str,
                overrides: dict[str, Any] | None, passes: str, chat: bool, progress: Any) -> Path:
    """An unmask strategy with decograph's masked-diffusion model: its forward graph (fp32)."""
    from decograph.api import as_program, optimize
    from decograph.backends.onnxruntime.mdm import MDM_GRAPH_VERSION, export_mdm

    if quant != "none" or dtype != "float32":
        raise UnsupportedError(f"the masked-diffusion model exports in float32 without quantization only (got "
                               f"--quant {quant}, --dtype {dtype})")
    if tok is None or not hasattr(tok, "backend_tokenizer"):
        raise InputError("exporting needs the model's (fast) tokenizer: the masked-diffusion model has none; save "
                         "one in its directory (train-mdm does)")
    program = optimize(as_program(strategy, overrides), adapter, passes)
    check_exportable(program, diffusion=True)
    m = adapter.model
    if getattr(adapter, "wants_layout", False):         # the block-diffusion LM of adapt-diffusion
        from decograph.backends.onnxruntime.block_diffusion import BD_GRAPH_VERSION, export_block_diffusion

        c = m.base.config
        shape, write, version = (c.num_hidden_layers, m.kv_heads, m.head_dim), export_block_diffusion, BD_GRAPH_VERSION
    else:
        cfg = m.config
        shape, write, version = (cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads), export_mdm, MDM_GRAPH_VERSION
    with staging_dir(target, "the exported decoder") as tmp:
        progress(f"exporting the diffusion forward ({shape[0]} layers) of {adapter.name} to ONNX ...")
        write(m, tmp / "model.onnx")
        chat_prompt = _write_text_files(tmp, tok, program)
        graph = {"file": "model.onnx", "quant": "none", "dtype": "float32", "graph": version,
                 "block_size": None, "num_layers": shape[0], "kv_heads": shape[1],
                 "head_dim": shape[2], "vocab_size": adapter.vocab_size,
                 "max_positions": adapter.max_positions, "mask_token_id": adapter.mask_token_id,
                 "shift_logits": adapter.shift_logits}
        template = getattr(tok, "chat_template", None)
        write_manifest(tmp, {
            "strategy": program.name, "passes": passes, "program": "strategy.json", "tokenizer": "tokenizer.json",
            "graphs": {"target": graph}, "eos_token_ids": list(adapter.eos_token_ids),
            "chat_template": template if isinstance(template, str) else None, "chat_prompt": chat_prompt,
            "chat_default": bool(chat and chat_prompt), "model": adapter.name,
        })
    return target
