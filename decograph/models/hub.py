"""Model names resolved the way ``from_pretrained`` resolves them: a local directory, a
packaged model's name, or a Hugging Face Hub id (``org/name``, optionally ``org/name@revision``).

    model_dir("path/to/hf-model-dir")                     # a local directory: itself
    model_dir("smollm2-135m-instruct")                    # a packaged model (decograph.models.packaged)
    model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")      # the snapshot in the local HF cache
    model_dir("org/name", revision="v1.0")                # a branch, tag or commit of it

A Hub id is looked up in the local Hugging Face cache first (``HF_HOME`` / ``HF_HUB_CACHE``,
through ``huggingface_hub``'s own lookup); a complete cached snapshot is used without any
network access. Otherwise it is downloaded (the config, safetensors weights, tokenizer and
template files only: never pickled weights) unless the Hub is offline (``HF_HUB_OFFLINE=1`` or
``TRANSFORMERS_OFFLINE=1``). Every failure is a ``ModelError`` naming the id and what to do.
huggingface_hub is imported only when a Hub id is resolved.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from decograph.errors import ModelError

__all__ = ["HUB_FILES", "hub_model_dir", "is_hub_id", "model_dir", "split_revision"]

# What a causal LM and its tokenizer need, never pickled (*.bin, *.pt) weights: decograph loads
# safetensors only (an untrusted pickle would run code on load).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; an explicit ``revision`` must agree."""
    repo, at, rev = str(name).partition("@")
    if not at:
        return repo, revision
    if not rev or (revision is not None and revision != rev):
        raise ModelError(f"model {name!r}: give the revision once, after '@' or as revision= (got {revision!r})")
    return repo, rev


def is_hub_id(name: str) -> bool:
    """Whether ``name`` (with an optional ``@revision``) is a valid Hub model id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, _, rev = str(name).partition("@")
    if "@" in rev:
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def model_dir(name: str | os.PathLike[str], revision: str | None = None, progress: bool = True) -> Path:
    """The local directory of model ``name``: a directory as it is, a packaged model's
    directory (converted on first use), or a Hub id's snapshot (``hub_model_dir``), in that
    order, as ``from_pretrained`` prefers a local directory over a Hub id of the same name.
    ``ModelError`` names ``name`` when it is none of them."""
    from decograph.models.packaged import packaged_model_path, packaged_names

    text = os.fspath(name)
    if os.path.isdir(text):
        return Path(text)
    packaged = packaged_model_path(text, progress=progress)
    if packaged is not None:
        return packaged
    if not is_hub_id(text):
        raise ModelError(f"model {text!r}: no such directory, packaged model ({', '.join(packaged_names())}) "
                         "or Hugging Face Hub id (org/name or org/name@revision)")
    try:
        return hub_model_dir(text, revision)
    except ModelError as exc:         # say so, since a mistyped relative path looks like a Hub id
        raise ModelError(f"no local directory or packaged model {text!r}; as a Hub id: {exc}") from exc


def hub_model_dir(repo_id: str, revision: str | None = None, *, cache_dir: str | None = None,
                  offline: bool | None = None) -> Path:
    """The snapshot directory of Hub model ``repo_id`` (``org/name[@revision]``): a complete
    cached one if there is, else downloaded unless ``offline`` (default: ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``). ``cache_dir``: default ``HF_HUB_CACHE`` (``$HF_HOME/hub``).
    Raises ``ModelError`` naming the id when it is neither cached nor reachable."""
    from huggingface_hub import constants, snapshot_download

    repo, rev = split_revision(repo_id, revision)
    label = repo + (f"@{rev}" if rev else "")
    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    cache = cache_dir or constants.HF_HUB_CACHE
    cached = _cached_snapshot(repo, rev, cache)
    if cached is not None and _complete(cached):
        return cached
    if offline:
        what = "is not in" if cached is None else "is incomplete in"
        raise ModelError(f"model {label!r} {what} the local Hugging Face cache ({cache}) and the Hub is offline "
                         "(HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): download it once where the Hub is "
                         f"reachable (`hf download {repo}`), or give a local model directory")
    try:
        path = Path(snapshot_download(repo, revision=rev, cache_dir=cache, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's network, auth and not-found errors alike
        raise ModelError(f"model {label!r} is not in the local Hugging Face cache ({cache}) and could not be "
                         f"downloaded from the Hub ({type(exc).__name__}: {_first_line(exc)}). Check the id and "
                         "your network (a private or gated model needs `hf auth login`), or download it where "
                         "the Hub is reachable and set HF_HOME to that cache") from exc
    if not _complete(path):
        raise ModelError(f"model {label!r} has no config.json and safetensors weights on the Hub ({path}); "
                         "decograph loads safetensors causal LMs only")
    return path


def _cached_snapshot(repo: str, revision: str | None, cache: str) -> Path | None:
    """The cached snapshot of ``repo`` at ``revision`` (a branch, tag or commit), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _complete(path: Path) -> bool:
    """Whether a snapshot holds a config and all its safetensors weights (a cache may hold
    only the files some other tool fetched, e.g. the config alone)."""
    if not (path / "config.json").is_file():
        return False
    for index in path.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all((path / s).is_file() for s in shards)
    return any(path.glob("*.safetensors"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
