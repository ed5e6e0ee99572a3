"""The ``onnxruntime`` backends: the model's decoding step exported to ONNX once (cached per
model and weights; the exported decoder's exact graph, int4/int8 with its quantizer settings)
and run by ONNX Runtime: the CUDA EP when this onnxruntime has it (a float16 graph, the KV
cache in GPU memory, I/O binding), else the CPU EP. Programs run on the runtime's interpreter
over ONNX Runtime's side of the step protocol through a ``GraphRunner``, the very code of the
exported decoder (``decograph.exported``). ``DECOGRAPH_ORT_DEVICE`` (auto, cpu or cuda)
overrides the device. A program with ``draft.head`` runs on a second graph of the model, built
with the hidden states the heads read (``graph.hidden_output``; cached beside the first), each
head the API bound (``RunConfig.draft_heads``) as its own graph (``graph_head``, cached too)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from decograph.backends.base import HOST_OPS, Backend
from decograph.errors import UnsupportedError
from decograph.ir import ops as O
from decograph.measure_cache import cache_path

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeInt4Backend", "OnnxRuntimeInt8Backend", "export_dir"]


def _fingerprint(model: Any, header: str) -> str:
    """``header`` (the graph's version and the model's config) and the model's weights: a
    changed graph or model is a new directory, old exports are never reused."""
    h = hashlib.sha256(header.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{float(p.detach().double().sum()):.9e}".encode())
    return h.hexdigest()[:12]


def export_dir(model: Any) -> Path:
    from decograph.backends.onnxruntime.export import graph_version

    digest = _fingerprint(model, f"{graph_version(model)}\n{model.config.to_json_string(use_diff=False)}")
    return cache_path("onnx") / f"{model.config.model_type}-{digest}"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    description = ("ONNX Runtime, CUDA EP (float16) where onnxruntime-gpu has it, else CPU EP: the model's step "
                   "exported to ONNX (cached); verification on the host")
    devices = ("cpu", "cuda")
    bits = 0                        # weight-only quantization (MatMulNBits); 0: fp32

    def __init__(self) -> None:
        self._adapters: dict[Any, tuple[Any, Any]] = {}

    def available(self) -> str | None:
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        return f"missing package(s): {', '.join(missing)}" if missing else None

    @property
    def ops(self) -> frozenset[str]:
        # the unmask rules run on the host (numpy) over the graphs' logits, never on torch
        return frozenset(HOST_OPS) | {"forward"} | {op.NAME for op in O.UNMASK_OPS}

    def prepare(self, adapter: Any) -> Any:
        from decograph.models.adapters import HFCausalLM
        from decograph.models.diffusion import BlockDiffusionAdapter, MDMAdapter
        from decograph.models.diffusion_gemma import DiffusionGemmaAdapter

        hit = self._adapters.get(id(adapter))
        if hit is not None and hit[0] is adapter:
            return hit[1]
        if isinstance(adapter, DiffusionGemmaAdapter):
            ort_dg = adapter if getattr(adapter, "session", None) is not None else self._prepare_dg(adapter)
            self._adapters[id(adapter)] = (adapter, ort_dg)
            return ort_dg
        if isinstance(adapter, (MDMAdapter, BlockDiffusionAdapter)):
            ort_mdm = self._prepare_mdm(adapter)
            self._adapters[id(adapter)] = (adapter, ort_mdm)
            return ort_mdm
        if not isinstance(adapter, HFCausalLM):
            raise UnsupportedError(f"backend {self.name!r} exports Hugging Face causal LMs and decograph's own "
                                   f"diffusion models (train-mdm, adapt-diffusion); got {type(adapter).__name__}")
        ort_adapter = self._causal(adapter, hidden=False)
        self._adapters[id(adapter)] = (adapter, ort_adapter)
        return ort_adapter

    def _causal(self, adapter: Any, hidden: bool) -> Any:
        """``adapter``'s model exported (once; ``hidden``: with the final hidden states as an
        output, for draft heads) and quantized as this backend does, as an ``ORTCausalLM``."""
        from decograph.backends.onnxruntime.export import export_step
        from decograph.backends.onnxruntime.kv import pick_device
        from decograph.backends.onnxruntime.session import ORTCausalLM

        device = pick_device(os.environ.get("DECOGRAPH_ORT_DEVICE", "").strip() or "auto")
        stem = "model" if device == "cpu" else "model.fp16"     # the CUDA EP's attention takes float16
        stem += ".hidden" if hidden else ""
        path = export_dir(adapter.model) / f"{stem}.onnx"
        if not path.is_file():                                  # the exported decoder's exact graph
            export_step(adapter.model, path, dtype="float32" if device == "cpu" else "float16", hidden=hidden)
        if self.bits:
            from decograph.backends.onnxruntime.export import QUANT, quant_tag, quantize_step

            qpath = path.with_name(f"{stem}.{quant_tag(self.bits)}.onnx")
            if not qpath.is_file():
                quantize_step(path, qpath, self.bits, QUANT["accuracy_level"], block_size=QUANT["block_size"])
            path = qpath
        ort_adapter = ORTCausalLM(path, vocab_size=adapter.vocab_size, eos_token_ids=adapter.eos_token_ids,
                                  max_positions=adapter.max_positions, tokenizer=adapter.tokenizer, device=device)
        ort_adapter.source = adapter                            # whose graph with hidden states heads run on
        return ort_adapter

    def draft_runner(self, model: Any) -> Any:
        """The draft model exported and run like the target (this backend's precision)."""
        from decograph.backends.onnxruntime.draft import OrtDraftRunner
        from decograph.models.adapters import as_adapter

        if hasattr(model, "greedy"):
            return model
        return OrtDraftRunner(self.prepare(as_adapter(model)).step)

    def interpreter(self, program: Any, adapter: Any, config: Any) -> Any:
        """The runtime over the exported decoder's code: a causal LM's ``GraphRunner``, the
        masked-diffusion model's ``OrtCanvasEngine``, DiffusionGemma's ``OrtNoiseEngine`` (its
        draws seeded by the run's ``seed``)."""
        from decograph.backends.onnxruntime.mdm import ORTMDMAdapter
        from decograph.backends.onnxruntime.noise import OrtDiffusionGemma
        from decograph.backends.onnxruntime.runner import GraphRunner
        from decograph.backends.onnxruntime.session import ORTCausalLM

        if isinstance(adapter, OrtDiffusionGemma):
            from decograph.runtime.interp import Interpreter

            return Interpreter(program, adapter.engine(config.seed, config.tokenizer), config)
        if isinstance(adapter, ORTMDMAdapter):
            from decograph.backends.onnxruntime.canvas import OrtCanvasEngine
            from decograph.runtime.interp import Interpreter

            engine = OrtCanvasEngine(adapter.mdm, mask_token_id=adapter.mask_token_id,
                                     shift_logits=adapter.shift_logits, pad_id=config.pad_token_id,
                                     tokenizer=config.tokenizer)
            return Interpreter(program, engine, config)
        if not isinstance(adapter, ORTCausalLM):
            return super().interpreter(program, adapter, config)
        if (config.drafts and not adapter.step.hidden_size and adapter.source is not None
                and any(isinstance(op, O.DraftHead) for op in program.walk())):
            source = adapter.source
            hit = self._adapters.get((id(source), "hidden"))
            if hit is None or hit[0] is not source:
                hit = self._adapters[(id(source), "hidden")] = (source, self._causal(source, hidden=True))
            adapter = hit[1]
            config.draft_heads = {name: self._ort_head(r, source) for name, r in config.draft_heads.items()}
        runner = getattr(adapter, "runner", None)
        if runner is None:
            runner = adapter.runner = GraphRunner(adapter.step, json.dumps(adapter.cost_key), adapter.max_positions)
        return runner.interpreter(program, config, tokenizer=config.tokenizer)

    def _ort_head(self, runner: Any, source: Any) -> Any:
        """A head the API bound (a runner holding its ``HeadWeights`` as ``head``) as its graph on
        ONNX Runtime (``graph_head``, fp32: the same drafts), exported once per head and model;
        other runners as they are."""
        from decograph.backends.onnxruntime.export import bind_numpy_head
        from decograph.backends.onnxruntime.graph_head import HEAD_GRAPH_VERSION, OrtHead, export_head
        from decograph.heads.spec import HeadWeights

        head = getattr(runner, "head", None)
        if not isinstance(head, HeadWeights):
            return runner
        hit = self._adapters.get(("head", id(runner)))
        if hit is None or hit[0] is not runner:
            h = hashlib.sha256(f"{HEAD_GRAPH_VERSION}\n{head.config}".encode())
            for name in sorted(head.weights):
                h.update(name.encode() + np.ascontiguousarray(head.weights[name], np.float32).tobytes())
            h.update(head.vocab_ids.astype(np.int64).tobytes())
            path = export_dir(source.model) / f"head-{h.hexdigest()[:12]}.onnx"
            if not path.is_file():
                export_head(bind_numpy_head(head, source.model), path)
            hit = self._adapters[("head", id(runner))] = (runner, OrtHead(path))
        return hit[1]

    def _prepare_mdm(self, adapter: Any) -> Any:
        """decograph's masked-diffusion model, exported once (``mdm.export_mdm``), fp32 on the
        CPU EP: the unmask strategies and both block-wise caches run on it."""
        from decograph.backends.onnxruntime.mdm import MDM_GRAPH_VERSION, ORTMDMAdapter, export_mdm

        if self.bits:
            raise UnsupportedError(f"backend {self.name!r}: the masked-diffusion model runs in fp32 only "
                                   f"(backend 'onnxruntime')")
        m = adapter.model
        if getattr(adapter, "wants_layout", False):              # the block-diffusion LM (adapt-diffusion)
            from decograph.backends.onnxruntime.block_diffusion import BD_GRAPH_VERSION, export_block_diffusion
            from decograph.backends.onnxruntime.mdm import ORTBlockDiffusionAdapter

            digest = _fingerprint(m, f"{BD_GRAPH_VERSION}\n{sorted(vars(m.config).items())}")
            path = cache_path("onnx") / f"bd-{digest}" / "model.onnx"
            if not path.is_file():
                export_block_diffusion(m, path)
            return ORTBlockDiffusionAdapter(path, eos_token_ids=adapter.eos_token_ids,
                                            max_positions=adapter.max_positions, tokenizer=adapter.tokenizer)
        digest = _fingerprint(m, f"{MDM_GRAPH_VERSION}\n{sorted(vars(m.config).items())}")
        path = cache_path("onnx") / f"mdm-{digest}" / "model.onnx"
        if not path.is_file():
            export_mdm(m, path)
        return ORTMDMAdapter(path, mask_token_id=adapter.mask_token_id, eos_token_ids=adapter.eos_token_ids,
                             max_positions=adapter.max_positions, tokenizer=adapter.tokenizer,
                             shift_logits=adapter.shift_logits)

    def _prepare_dg(self, adapter: Any) -> Any:
        """transformers' DiffusionGemma, its encoder and decoder exported once
        (``graph_diffusion_gemma``, cached by the graphs' version, config and weights), fp32 on
        the CPU EP."""
        import torch

        from decograph.backends.onnxruntime.graph_diffusion_gemma import DG_GRAPH_VERSION, export_diffusion_gemma
        from decograph.backends.onnxruntime.noise import DGSession, OrtDiffusionGemma

        if self.bits:
            raise UnsupportedError(f"backend {self.name!r}: DiffusionGemma runs on ONNX Runtime in fp32 only "
                                   f"(backend 'onnxruntime'); its graphs are not quantized")
        m = adapter.model
        # the weights the graphs read: the text encoder, the decoder, the LM head (not the vision tower)
        text = torch.nn.ModuleDict({"encoder": m.model.encoder.language_model, "decoder": m.model.decoder,
                                    "lm_head": m.lm_head})
        scalars = [float(b.sum()) for name, b in text.named_buffers() if name.endswith("layer_scalar")]
        digest = _fingerprint(text, f"{DG_GRAPH_VERSION}\n{m.config.to_json_string(use_diff=False)}\n{scalars}")
        directory = cache_path("onnx") / f"dgemma-{digest}"
        if not (directory / "decoder.onnx").is_file():          # written after the encoder: both are whole
            export_diffusion_gemma(m, directory)
        hit = self._adapters.get(("dgemma", directory))        # one pair of sessions per export, shared
        if hit is None:
            hit = self._adapters[("dgemma", directory)] = (directory, DGSession(directory))
        return OrtDiffusionGemma(hit[1], eos_token_ids=adapter.eos_token_ids,
                                 pad_token_id=adapter.pad_token_id, max_positions=adapter.max_positions,
                                 tokenizer=adapter.tokenizer)


class OnnxRuntimeInt4Backend(OnnxRuntimeBackend):
    name = "onnxruntime-int4"
    description = "ONNX Runtime CPU EP, weights int4 block-wise (MatMulNBits, blocks of 32); lossless vs its own greedy"
    bits = 4


class OnnxRuntimeInt8Backend(OnnxRuntimeBackend):
    name = "onnxruntime-int8"
    description = "ONNX Runtime CPU EP, weights int8 block-wise (MatMulNBits, blocks of 32); lossless vs its own greedy"
    bits = 8
