"""``decograph.files``: staging directories renamed into place whole, stale ones of killed runs
removed, and output places checked before any work."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decograph.errors import InputError, ModelError
from decograph.files import STALE_AFTER_S, check_output_dir, staging_dir


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _partial(parent: Path, target: str, pid: int, age_s: float = 0.0) -> Path:
    d = parent / f".{target}.partial-{pid}-0badc0de"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 1000)
    if age_s:
        t = time.time() - age_s
        os.utime(d, (t, t))
    return d


def test_a_stale_staging_dir_of_a_dead_process_is_removed(tmp_path) -> None:
    dead = _partial(tmp_path, "out", _dead_pid())
    live = _partial(tmp_path, "out", os.getpid())
    other = _partial(tmp_path, "other", _dead_pid())            # beside another target: not ours to judge
    with staging_dir(tmp_path / "out", "the test output") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.partial-{os.getpid()}-")
        (tmp / "a").write_text("done")
    assert not dead.exists() and live.exists() and other.exists()
    assert (tmp_path / "out" / "a").read_text() == "done" and not tmp.exists()


def test_an_old_staging_dir_is_removed_even_when_its_pid_lives(tmp_path) -> None:
    old = _partial(tmp_path, "out", os.getpid(), age_s=STALE_AFTER_S + 60)
    legacy = tmp_path / ".out.tmp-abc123"
    legacy.mkdir()
    young_legacy = tmp_path / ".out.tmp-def456"
    young_legacy.mkdir()
    t = time.time() - STALE_AFTER_S - 60
    os.utime(legacy, (t, t))
    with staging_dir(tmp_path / "out", "the test output", legacy=(".out.tmp-*",)):
        pass
    assert not old.exists() and not legacy.exists() and young_legacy.exists()


def test_an_exception_leaves_nothing(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with staging_dir(tmp_path / "out", "the test output") as tmp:
            (tmp / "half").write_bytes(b"half-written")
            raise RuntimeError("boom")
    assert sorted(tmp_path.iterdir()) == []


def test_publishing_onto_a_used_directory_fails_and_leaves_nothing(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs").write_text("keep")
    with pytest.raises(InputError, match="cannot put the test output in place"):
        with staging_dir(tmp_path / "out", "the test output") as tmp:
            (tmp / "ours").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["theirs"]


def test_an_empty_target_directory_is_replaced(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    with staging_dir(tmp_path / "out", "the test output", error=ModelError) as tmp:
        (tmp / "ours").write_text("x")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ours"]


def test_a_staging_dir_under_a_file_is_a_named_error(tmp_path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ModelError, match=r"f/out: cannot write the cache there"):
        with staging_dir(tmp_path / "f" / "out", "the cache", error=ModelError):
            pass


def test_check_output_dir(tmp_path) -> None:
    check_output_dir(tmp_path / "new" / "deeper", "x")           # missing parents are fine
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="file: exists and is not a directory"):
        check_output_dir(tmp_path / "file", "x")
    with pytest.raises(InputError, match="is not a directory; choose another place"):
        check_output_dir(tmp_path / "file" / "sub" / "out", "x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "a").write_text("")
    with pytest.raises(InputError, match="used: exists and is not empty"):
        check_output_dir(tmp_path / "used", "x")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(InputError, match="link: is a symbolic link"):
        check_output_dir(tmp_path / "link", "x")


def test_check_output_dir_refuses_an_unwritable_parent(tmp_path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: a 0o500 directory is still writable, nothing to refuse")
        with pytest.raises(InputError, match="ro is not writable"):
            check_output_dir(parent / "out", "x")
    finally:
        parent.chmod(0o700)


def test_check_output_dir_message_for_an_unwritable_parent(tmp_path, monkeypatch) -> None:
    # the check as an ordinary user sees it, also where the tests run as root
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(InputError, match=f"out: the directory {tmp_path} is not writable; choose another place"):
        check_output_dir(tmp_path / "out", "the exported decoder")
