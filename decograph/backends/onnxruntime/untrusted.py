"""The files of an exported decoder directory, read as untrusted input (``manifest``): opened
only inside the directory, never through a symbolic link, hashed in chunks, size-capped; JSON
parsed strictly (no duplicate keys, no NaN). Every failure is a ``ManifestError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from decograph.errors import ModelError

__all__ = ["ManifestError", "file_digest", "open_inside", "parse_json", "read_inside"]


class ManifestError(ModelError):
    """An exported decoder directory that cannot be trusted or read: names the file and the field."""


def open_inside(directory: Path, name: str, where: str) -> int:
    """A read-only descriptor of the regular file ``name`` under ``directory``, refusing a
    symbolic link anywhere on the way (none can lead outside) and anything but a regular file."""
    here = directory
    for part in PurePosixPath(name).parts:
        here = here / part
        try:
            st = os.lstat(here)
        except OSError as exc:
            raise ManifestError(f"{where}: file {name!r} is listed but {here} cannot be read "
                                f"({exc.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise ManifestError(f"{where}: file {name!r}: {here} is a symbolic link; a decoder directory holds "
                                f"plain files only") from None
    try:
        fd = os.open(here, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ManifestError(f"{where}: file {name!r} cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ManifestError(f"{where}: file {name!r} is not a regular file")
    if not here.resolve().is_relative_to(directory.resolve()):
        os.close(fd)
        raise ManifestError(f"{where}: file {name!r} resolves outside {directory}")
    return fd


def read_inside(directory: Path, name: str, where: str, limit: int | None, digest: str | None) -> bytes | None:
    """Hash ``name`` in 1 MiB chunks against ``digest`` (None: no check); keep and return its
    bytes when ``limit`` is given (refusing a larger file), else None."""
    h, kept, size = hashlib.sha256(), [], 0
    with os.fdopen(open_inside(directory, name, where), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            size += len(chunk)
            if limit is not None:
                if size > limit:
                    raise ManifestError(f"{directory / name}: {size}+ bytes, more than the {limit} allowed")
                kept.append(chunk)
            if digest is not None:
                h.update(chunk)
    if digest is not None and h.hexdigest() != digest:
        raise ManifestError(f"{directory / name}: its sha256 differs from the manifest's (the decoder was modified)")
    return b"".join(kept) if limit is not None else None


def parse_json(data: bytes, where: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            dup = next(k for i, (k, _) in enumerate(items) if k in dict(items[:i]))
            raise ManifestError(f"{where}: key {dup!r} appears twice in one object")
        return out

    def constant(name: str) -> Any:
        raise ManifestError(f"{where}: {name} is not a JSON number")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read for the manifest ({exc.strerror})") from None
    return h.hexdigest()
