"""Directories written whole: built under a hidden staging name beside their final place, then
renamed into place in one step, so a crash never leaves a half-written target.

    with staging_dir(Path("out"), "the exported decoder") as tmp:
        (tmp / "model.onnx").write_bytes(...)          # renamed to out/ when the block ends

A staging directory is named ``.{target}.partial-{pid}-{random}``. A run killed outright
(SIGKILL, a power cut) cannot remove its own, so each later run beside the same target
removes those whose process is gone or that are more than a day old.

Files written atomically (a temporary name, then a rename) get the permissions a plain
``open`` or ``mkdir`` would give them: ``tempfile.mkstemp``/``mkdtemp`` make them private."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from decograph.errors import DecographError, InputError

__all__ = ["plain_permissions", "staging_dir", "check_output_dir", "remove_stale_staging", "STALE_AFTER_S"]

STALE_AFTER_S = 24 * 3600          # a staging directory this old is abandoned, whatever its pid says
_PARTIAL = re.compile(r"\.partial-(\d+)-[0-9a-f]+$")


def plain_permissions(path: str | Path) -> None:
    """``path`` (a file, or a directory) gets mode 0666 (0777) less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts: we may not signal it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_staging(target: Path, legacy: Sequence[str] = ()) -> list[Path]:
    """Remove the staging directories of earlier runs beside ``target`` whose process is gone or
    that are older than ``STALE_AFTER_S``, and those matching a ``legacy`` glob (names earlier
    versions used, which hold no pid) older than that; returns what was removed. Never raises
    for a directory that cannot be read or removed (another run may be removing it too)."""
    removed: list[Path] = []
    now = time.time()
    prefix = f".{target.name}.partial-"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _PARTIAL.search(p.name)
        legacy_hit = any(p.match(g) for g in legacy)
        if not ((p.name.startswith(prefix) and m) or legacy_hit):
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        old = now - st.st_mtime > STALE_AFTER_S
        dead = bool(m) and p.name.startswith(prefix) and not _alive(int(m.group(1)))
        if (dead or old) and not p.is_symlink() and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _staging_name(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _publish(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)            # onto a missing target or an empty directory: one step


@contextmanager
def staging_dir(target: Path, what: str, *, publish: Callable[[Path, Path], None] | None = None,
                legacy: Sequence[str] = (), error: type[DecographError] = InputError) -> Iterator[Path]:
    """A new, empty staging directory beside ``target`` (``what`` names it in errors), after
    removing stale ones of earlier runs (``remove_stale_staging``). When the block ends without
    an exception, the directory gets plain permissions and ``publish(tmp, target)`` (default:
    ``os.replace``, which needs ``target`` missing or an empty directory) puts it in place; on
    any exception, or when publishing fails, it is removed and the exception propagates. A
    place that cannot be written, or an ``OSError`` of ``publish``, is an ``error`` naming ``target``.
    Guarantees: no staging directory of this run outlives the block."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target, legacy)
        tmp = _staging_name(target)
        tmp.mkdir()
    except OSError as exc:
        raise error(f"{target}: cannot write {what} there ({exc.strerror or exc})") from None
    try:
        yield tmp
        plain_permissions(tmp)
        try:
            (publish or _publish)(tmp, target)
        except OSError as exc:
            raise error(f"{target}: cannot put {what} in place ({exc.strerror or exc}); was it created "
                             f"meanwhile? choose a new directory") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(target: Path, what: str) -> None:
    """Refuse, with an ``InputError`` naming ``target``, an output directory that cannot become
    ``what``: an existing file, a non-empty directory, or a place whose nearest existing parent
    is not a writable directory. Cheap (no file is written); call it before any slow work."""
    target = Path(target)
    if target.is_symlink():
        raise InputError(f"{target}: is a symbolic link; choose a new directory for {what}")
    if target.exists() and not target.is_dir():
        raise InputError(f"{target}: exists and is not a directory; choose a new directory for {what}")
    if target.is_dir():
        try:
            used = any(target.iterdir())
        except OSError as exc:
            raise InputError(f"{target}: cannot be read ({exc.strerror or exc}); choose a new directory") from None
        if used:
            raise InputError(f"{target}: exists and is not empty; choose a new directory for {what}")
    parent = target.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{target}: {parent} is not a directory; choose another place for {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{target}: the directory {parent} is not writable; choose another place for {what}")
