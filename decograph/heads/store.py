"""Where draft heads live: shipped with the package, or trained here and cached per model.

A head belongs to one target model, named by ``model_fingerprint`` (its architecture and a
sample of its embedding table: a fine-tuned copy is another model). ``resolve_head`` finds a
head for a model: a path, or ``default`` (or empty): the head shipped in
``decograph/heads/shipped/`` for that model, else the one ``decograph train-draft`` cached in
``$XDG_CACHE_HOME/decograph/heads/<fingerprint>/head.npz``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from decograph.errors import ModelError
from decograph.heads.corpus import Corpus, load_corpus
from decograph.heads.spec import HeadWeights, load_head
from decograph.measure_cache import cache_path

__all__ = ["SHIPPED", "cached_corpus_path", "cached_head_path", "model_fingerprint", "resolve_corpus", "resolve_head"]

SHIPPED = Path(__file__).parent / "shipped"


def model_fingerprint(config: Any, embed: np.ndarray) -> str:
    """12 hex digits over the model's architecture and every 97th row of its input embedding."""
    h = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        h.update(f"{key}={getattr(config, key, None)};".encode())
    h.update(np.ascontiguousarray(embed[::97], dtype=np.float32).tobytes())
    return h.hexdigest()[:12]


def cached_head_path(fingerprint: str) -> Path:
    return cache_path("heads") / fingerprint / "head.npz"


def cached_corpus_path(fingerprint: str) -> Path:
    return cache_path("heads") / fingerprint / "corpus.npz"


def resolve_corpus(spec: str, fingerprint: str, model_name: str = "the model") -> Corpus:
    """The corpus of the model's own answers ``spec`` names (``draft.corpus``): a file path, or
    ``default``/``""``: the corpus shipped in ``shipped/corpora/`` for the model, else the one
    ``decograph train-draft`` wrote beside its head. Errors say how to get one."""
    if spec and spec != "default":
        corpus = load_corpus(spec)
        if corpus.model and corpus.model != fingerprint:
            raise ModelError(f"{spec}: this corpus holds the answers of {corpus.model_name or 'another model'} "
                             f"(fingerprint {corpus.model}), not of {model_name} ({fingerprint})")
        return corpus
    for p in sorted((SHIPPED / "corpora").glob("*.npz")):
        corpus = load_corpus(p)
        if corpus.model == fingerprint:
            return corpus
    p = cached_corpus_path(fingerprint)
    if p.is_file():
        return load_corpus(p)
    raise ModelError(f"no corpus of answers for {model_name} (fingerprint {fingerprint}): `decograph train-draft "
                     f"--model <the model>` writes one beside its head, or name a corpus file with corpus=PATH")


def resolve_head(spec: str, fingerprint: str, model_name: str = "the model") -> HeadWeights:
    """The head ``spec`` names for the model ``fingerprint``: a file path, or ``default``/``""``
    (shipped, else trained here). Errors say how to get one."""
    if spec and spec != "default":
        head = load_head(spec)
        if head.config.model and head.config.model != fingerprint:
            raise ModelError(f"{spec}: this draft head was trained for {head.config.model_name or 'another model'} "
                             f"(fingerprint {head.config.model}), not {model_name} ({fingerprint})")
        return head
    for p in sorted(SHIPPED.glob("*.npz")):
        head = load_head(p)
        if head.config.model == fingerprint:
            return head
    p = cached_head_path(fingerprint)
    if p.is_file():
        return load_head(p)
    raise ModelError(f"no draft head for {model_name} (fingerprint {fingerprint}): train one with "
                     f"`decograph train-draft --model <the model>`, or name a head file with head=PATH")
