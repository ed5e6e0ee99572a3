"""Bad input from outside is a named ``InputError`` (exit 2 in the CLI, no traceback), found
before any slow work: invalid UTF-8 in prompts (argv, stdin, the Python API) and an export
target that cannot become a decoder directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from decograph.errors import InputError
from decograph.text import check_utf8

ROOT = Path(__file__).resolve().parents[1]


def _cli(*argv: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``python -m decograph ARGV`` with raw bytes in argv (as a shell passes $'\\xff')."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), LC_ALL="C.UTF-8")
    return subprocess.run([sys.executable, "-m", "decograph", *argv], input=stdin, capture_output=True, env=env,
                          timeout=300)


def _named_error(proc: subprocess.CompletedProcess[bytes], message: str) -> None:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert f"decograph: error: {message}" in err, err
    assert "Traceback" not in err


def test_check_utf8() -> None:
    assert check_utf8("héllo", "prompt 1") == "héllo" and check_utf8("héllo".encode(), "stdin") == "héllo"
    with pytest.raises(InputError, match="^prompt 1 is not valid UTF-8: byte 0xff at offset 2;"):
        check_utf8(b"ab\xff", "prompt 1")
    with pytest.raises(InputError, match="^prompt 2 is not valid UTF-8: byte 0xc3 at offset 1;"):
        check_utf8(os.fsdecode(b"x\xc3"), "prompt 2")                 # argv's surrogateescape
    with pytest.raises(InputError, match="^prompt 0 is not valid UTF-8: it holds a lone surrogate U[+]D800 at "
                                         "character 1"):
        check_utf8("a\ud800b", "prompt 0")


def test_run_with_an_invalid_utf8_prompt() -> None:
    _named_error(_cli("run", "--strategy", "greedy", "--prompt", "fine", "--prompt", b"\xff"),
                 "prompt 2 is not valid UTF-8: byte 0xff at offset 0")


def test_run_exported_with_an_invalid_utf8_prompt(tmp_path) -> None:
    # checked before the decoder directory is even opened
    _named_error(_cli("run", "--exported", str(tmp_path), "--prompt", b"caf\xe9"),
                 "prompt 1 is not valid UTF-8: byte 0xe9 at offset 3")


def test_ner_with_invalid_utf8_on_stdin_and_in_argv() -> None:
    _named_error(_cli("ner", "-", "--labels", "PER", stdin=b"Tim \xff Cook"),
                 "stdin is not valid UTF-8: byte 0xff at offset 4")
    _named_error(_cli("ner", "Tim Cook", b"\x80x", "--labels", "PER"),
                 "text 2 is not valid UTF-8: byte 0x80 at offset 0")


def test_ner_request_checks_its_texts() -> None:
    from decograph.apps.ner import ner_request
    from decograph.models.tiny import word_tokenizer

    with pytest.raises(InputError, match="^text 0 is not valid UTF-8: byte 0xff at offset 1;"):
        ner_request(["a\udcffb"], ["PER"], word_tokenizer(64))


def test_generate_with_a_lone_surrogate() -> None:
    from decograph import generate
    from decograph.models.tiny import tiny_llama, word_tokenizer

    with pytest.raises(InputError, match="^prompt 1 is not valid UTF-8: it holds a lone surrogate U[+]D800"):
        generate(tiny_llama(), word_tokenizer(64), ["t1 t2", "t3 \ud800"], "greedy", 2, passes="none")


def test_export_to_an_existing_file(tmp_path) -> None:
    (tmp_path / "out").write_text("mine")
    _named_error(_cli("export", "greedy", str(tmp_path / "out")),
                 f"{tmp_path / 'out'}: exists and is not a directory; choose a new directory for the exported decoder")
    assert (tmp_path / "out").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_under_a_file(tmp_path) -> None:
    from decograph.export import export_decoder

    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match=f"{tmp_path / 'f'} is not a directory; choose another place"):
        export_decoder("greedy", tmp_path / "f" / "out", model="/nonexistent", progress=lambda m: None)


def test_export_into_a_used_directory(tmp_path) -> None:
    from decograph.export import export_decoder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("")
    with pytest.raises(InputError, match="out: exists and is not empty"):
        export_decoder("greedy", tmp_path / "out", model="/nonexistent", progress=lambda m: None)


def test_export_into_an_unwritable_directory(tmp_path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: a 0o500 directory is still writable, so the export could succeed "
                        "(tests/test_files.py checks the message with os.access patched)")
        _named_error(_cli("export", "greedy", str(parent / "out")), f"the directory {parent} is not writable")
    finally:
        parent.chmod(0o700)
