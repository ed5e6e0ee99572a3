"""The pass manager: named passes, pipelines, instruments and per-pass statistics.

A pass is a frozen dataclass with a kebab-case ``name`` and typed options; ``run`` returns
``PassResult(graph, changed, stats)`` and never mutates its input. The manager verifies the
IR after every pass, invalidates cached analyses when a pass changes the program, records
each pass's statistics and time, and runs instruments (print before/after, timing).

    pm = PassManager(parse_pipeline("canonicalize,mask-fusion{layout=auto},cache-reuse"))
    optimized = pm.run(program)
    pm.report        # [PassRecord(name='canonicalize', changed=False, stats={}, seconds=...), ...]
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from decograph.errors import DecographError, PassError
from decograph.ir import ops as O
from decograph.ir.printer import print_program
from decograph.ir.verify import verify
from decograph.passes.analysis import AnalysisManager

__all__ = ["Pass", "PassResult", "PassRecord", "PassContext", "PassManager", "Instrument",
           "PrintIR", "Timing"]


@dataclass(frozen=True)
class PassResult:
    """A pass's output: the (new) program, whether it differs, and what changed, counted."""

    graph: O.Program
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """What passes may consult beyond the IR: the backend, the model's forward-cost curve
    (``q -> cost of q query tokens / cost of 1``) and the acceptance observed so far."""

    backend: str = "torch"
    cost_curve: Any = None
    acceptance: Any = None


class Pass(ABC):
    """Base of all passes. Subclasses are frozen dataclasses whose fields are the options."""

    name: ClassVar[str] = ""
    preserves: ClassVar[tuple[str, ...]] = ()     # analyses still valid after a change

    @abstractmethod
    def run(self, program: O.Program, am: AnalysisManager) -> PassResult:
        """Valid IR in, valid IR out; ``program`` is left untouched."""

    def spelled(self) -> str:
        """The pass as a pipeline element: ``name`` or ``name{opt=value,...}`` (non-defaults)."""
        import dataclasses

        opts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class PassRecord:
    """One pass run: its spelling, whether it changed the program, its stats and time."""

    name: str
    changed: bool
    stats: dict[str, Any]
    seconds: float


class Instrument:
    """Hooks around each pass (TVM-style pass instruments)."""

    def before(self, p: Pass, program: O.Program) -> None:
        pass

    def after(self, p: Pass, result: PassResult, seconds: float) -> None:
        pass


class PrintIR(Instrument):
    """Prints the IR before/after the named passes (``"*"``: every pass) to ``write``."""

    def __init__(self, before: tuple[str, ...] = (), after: tuple[str, ...] = (),
                 write: Callable[[str], Any] = print) -> None:
        self.before_names, self.after_names, self.write = set(before), set(after), write

    def before(self, p: Pass, program: O.Program) -> None:
        if p.name in self.before_names or "*" in self.before_names:
            self.write(f"// ----- IR before {p.spelled()} -----\n{print_program(program)}")

    def after(self, p: Pass, result: PassResult, seconds: float) -> None:
        if p.name in self.after_names or "*" in self.after_names:
            note = "changed" if result.changed else "unchanged"
            self.write(f"// ----- IR after {p.spelled()} ({note}) -----\n{print_program(result.graph)}")


class Timing(Instrument):
    """Collects each pass's wall time in seconds."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def after(self, p: Pass, result: PassResult, seconds: float) -> None:
        self.times.append((p.name, seconds))


class PassManager:
    """Runs passes in order; ``verify_each`` checks the IR after every pass."""

    def __init__(self, passes: list[Pass], context: PassContext | None = None,
                 instruments: tuple[Instrument, ...] = (), verify_each: bool = True) -> None:
        self.passes = list(passes)
        self.context = context or PassContext()
        self.instruments = instruments
        self.verify_each = verify_each
        self.report: list[PassRecord] = []

    def run(self, program: O.Program) -> O.Program:
        """The optimized program; raises ``PassError`` naming the failing pass and those before it."""
        am = AnalysisManager(self.context)
        self.report = []
        for i, p in enumerate(self.passes):
            for ins in self.instruments:
                ins.before(p, program)
            start = time.perf_counter()
            try:
                result = p.run(program, am)
                if self.verify_each and result.changed:
                    verify(result.graph)
            except DecographError as exc:
                raise PassError(self._where(i) + f": {exc}") from exc
            except Exception as exc:        # a bug in a pass: still say which one
                raise PassError(self._where(i) + f": {type(exc).__name__}: {exc}") from exc
            seconds = time.perf_counter() - start
            if result.changed:
                am.invalidate(p.preserves)
                program = result.graph
            self.report.append(PassRecord(p.spelled(), result.changed, dict(result.stats), seconds))
            for ins in self.instruments:
                ins.after(p, result, seconds)
        return program

    def _where(self, i: int) -> str:
        before = ", ".join(p.spelled() for p in self.passes[:i]) or "none"
        return f"pass {self.passes[i].spelled()!r} failed (passes run before it: {before})"
