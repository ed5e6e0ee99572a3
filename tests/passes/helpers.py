"""Shared helpers of the pass tests: BEFORE/AFTER snapshot checks of passes and pipelines.

Imported by the ``test_*.py`` files next to it (pytest puts this folder on sys.path).

    pm = check_pass(MaskFusion(), BEFORE, AFTER)
    assert pm.report[0].stats == {"fused_sequence": 1, "forwards_per_step_before": 2}

Snapshot update: run the failing tests with ``DECOGRAPH_UPDATE_SNAPSHOTS=1`` in the
environment and ``check_pass`` rewrites the AFTER literal of the calling test file in place
with the program the pipeline printed (like expecttest's ``assertExpectedInline``), then
passes. It finds the literal by searching the caller's source for the AFTER text exactly as
passed, so AFTER must be a plain (no escapes) triple-quoted string that occurs once in the
file and differs from BEFORE; otherwise the update is refused with a message. Review the
diff (``git diff tests/passes``) before committing.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import textwrap
import warnings
from typing import Any, Sequence, Union

from decograph.ir.parser import parse_program
from decograph.ir.printer import print_program
from decograph.ir.verify import verify
from decograph.passes import parse_pipeline
from decograph.passes.manager import Pass, PassContext, PassManager

__all__ = ["check_pass", "canonical", "run_passes", "UPDATE_ENV"]

UPDATE_ENV = "DECOGRAPH_UPDATE_SNAPSHOTS"

PassLike = Union[str, Pass, Sequence[Pass]]


def canonical(text: str) -> str:
    """``text`` dedented, without leading/trailing blank lines, ending in one newline."""
    return textwrap.dedent(text).strip("\n") + "\n"


def _passes(p: PassLike) -> list[Pass]:
    if isinstance(p, str):
        return parse_pipeline(p)
    if isinstance(p, Pass):
        return [p]
    return list(p)


def run_passes(pass_or_pipeline: PassLike, before: str, context: PassContext | None = None,
               instruments: tuple[Any, ...] = (), verify_input: bool = True) -> tuple[str, PassManager]:
    """Parse and verify BEFORE (which must be canonical text), run the passes, verify the
    result; returns (printed result, manager). Asserts the input program is left untouched."""
    text = canonical(before)
    program = parse_program(text)
    if verify_input:
        verify(program)
    printed_in = print_program(program)
    assert printed_in == text, "BEFORE is not canonical text:\n" + _diff(text, printed_in, "BEFORE", "printed")
    pm = PassManager(_passes(pass_or_pipeline), context, instruments)
    out = pm.run(program)
    verify(out)
    assert print_program(program) == printed_in, "a pass mutated its input program"
    return print_program(out), pm


def check_pass(pass_or_pipeline: PassLike, before: str, after: str,
               context: PassContext | None = None, verify_input: bool = True) -> PassManager:
    """Run BEFORE through ``pass_or_pipeline`` (a pass, a list of passes or a pipeline string)
    with a ``PassManager`` (which verifies after each changing pass) and compare the printed
    program exactly with AFTER (both dedented). Returns the manager (``pm.report``).

    ``verify_input=False`` feeds BEFORE unverified (a pass that repairs invalid IR); the
    output is always verified. With ``DECOGRAPH_UPDATE_SNAPSHOTS=1`` a mismatch rewrites AFTER
    in the caller's file.
    """
    got, pm = run_passes(pass_or_pipeline, before, context, verify_input=verify_input)
    want = canonical(after)
    if got == want:
        return pm
    if os.environ.get(UPDATE_ENV) == "1":
        caller = inspect.stack()[1].filename
        _update_snapshot(caller, before, after, got)
        warnings.warn(f"updated a snapshot in {caller}", stacklevel=2)
        return pm
    raise AssertionError(f"pass output differs from AFTER (set {UPDATE_ENV}=1 to update):\n"
                         + _diff(want, got, "AFTER", "got"))


def _diff(a: str, b: str, na: str, nb: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), na, nb))


def _update_snapshot(path: str, before: str, after: str, got: str) -> None:
    """Replace the literal text ``after`` in ``path`` by ``got``, indented like the old one."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if canonical(after) == canonical(before):
        raise AssertionError("cannot update a snapshot whose AFTER is its BEFORE (a no-op case); edit it by hand")
    count = source.count(after)
    if count != 1:
        raise AssertionError(f"cannot update the snapshot: its AFTER text occurs {count} times in {path}; "
                             "edit it by hand")
    if "\\" in got or '"""' in got:
        raise AssertionError("cannot update the snapshot: the new text holds a backslash or triple quote")
    indent = re.match(r"\n*([ \t]*)", after).group(1)  # type: ignore[union-attr]
    lead = after[: len(after) - len(after.lstrip("\n"))]
    tail = after[len(after.rstrip(" \t")):] if after.rstrip(" \t").endswith("\n") else ""
    new = lead + textwrap.indent(got, indent) + tail
    with open(path, "w", encoding="utf-8") as f:
        f.write(source.replace(after, new))
