"""The BEFORE/AFTER helper itself: mismatches fail with a diff, and ``DECOGRAPH_UPDATE_SNAPSHOTS=1``
rewrites the AFTER literal of the calling file in place."""
from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest
from helpers import UPDATE_ENV, check_pass

from decograph.passes.cache_reuse import CacheReuse

BEFORE = """
    strategy g {
      %0 = prefill(%prompt) : State
      %1 = iterate(%0, max_steps=0, until=[eos, max_new_tokens]) : State {
      ^(%2: State):
        %3 = forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]
        %4 = verify.greedy(%2, %3) : Tokens[B, A]
        %5 = commit(%2, %4, kv=recompute, rollback=copy) : State
        yield(%5)
      }
      %6 = emit(%1) : Tokens[B, G]
    }
    """

MODULE = '''
from helpers import check_pass
from decograph.passes.cache_reuse import CacheReuse


def run():
    before = """BEFORE"""
    after = """
    strategy stale {
    }
    """
    return check_pass(CacheReuse(), before, after)
'''


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"snap_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)     # type: ignore[union-attr]
    return module


def test_mismatch_fails_with_a_diff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UPDATE_ENV, raising=False)
    with pytest.raises(AssertionError) as err:
        check_pass(CacheReuse(), BEFORE, BEFORE)
    text = str(err.value)
    assert text.startswith(f"pass output differs from AFTER (set {UPDATE_ENV}=1 to update):\n--- AFTER\n+++ got\n")
    assert "-    %5 = commit(%2, %4, kv=recompute, rollback=copy) : State\n" in text
    assert "+    %5 = commit(%2, %4, kv=keep_accepted, rollback=in_place) : State\n" in text


def test_update_flag_rewrites_after_in_the_callers_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "snap_case.py"
    path.write_text(MODULE.replace('"""BEFORE"""', '"""' + BEFORE + '"""'))
    monkeypatch.setenv(UPDATE_ENV, "1")
    with pytest.warns(UserWarning, match="updated a snapshot in .*snap_case.py"):
        _load(path).run()
    expected = textwrap.indent(textwrap.dedent(BEFORE).strip("\n") + "\n", "    ").replace(
        "kv=recompute, rollback=copy", "kv=keep_accepted, rollback=in_place")
    assert '    after = """\n' + expected + '    """\n' in path.read_text()
    monkeypatch.delenv(UPDATE_ENV)
    pm = _load(path).run()                         # now it passes without the flag
    assert pm.report[0].stats == {"kv_keep_accepted": 1, "rollback_in_place": 1}


def test_update_flag_refuses_a_no_op_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(UPDATE_ENV, "1")
    with pytest.raises(AssertionError, match="AFTER is its BEFORE"):
        check_pass(CacheReuse(), BEFORE, BEFORE)


def test_before_must_be_canonical_text() -> None:
    unsorted = BEFORE.replace("dedup=false, layout=sequence, mask=causal", "mask=causal")
    with pytest.raises(AssertionError, match="BEFORE is not canonical text"):
        check_pass(CacheReuse(), unsorted, BEFORE)
