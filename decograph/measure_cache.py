"""A JSON file of measurements keyed by what they depend on (graph, machine, threads, ...).

``cached(name, key, measure)`` returns the stored value for ``key`` in
``$XDG_CACHE_HOME/decograph/NAME``, or calls ``measure()`` (seconds of timing) and stores its
JSON-ready result. A first measurement is never silent: one line on stderr says what is
measured and where it is cached, another when it is done. With ``check``, a value that cannot
be right (timed while other jobs shared the machine) is measured again, and a cached one that
fails the check is not trusted. The file is rewritten atomically; a read-only or broken cache
only costs a re-measurement. Standard library only: the torch-free exported decoder uses it too.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["cache_path", "cached", "cpu_name"]

TRIES = 3            # measurements per round before an implausible value is kept anyway
ROUNDS = 2           # rounds (runs) that may end implausible before the kept value is trusted
_SUSPECT = "#implausible"     # key -> rounds that ended implausible (callers' keys are JSON lists)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), for
    keys of timings: a cost curve or kernel choice measured on one CPU says nothing about
    another (``platform.processor()`` is empty on Linux, so two machines looked the same)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_path(name: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decograph" / name


def _say(line: str) -> None:
    print(f"decograph: {line}", file=sys.stderr, flush=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _write(path: Path, table: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass                        # a read-only cache only costs a re-measurement next time


def _why_not(check: Callable[[Any], str | None] | None, value: Any) -> str | None:
    if check is None:
        return None
    try:
        return check(value)
    except Exception as exc:        # a malformed cached value (an older format, a hand edit)
        return f"unreadable ({type(exc).__name__}: {exc})"


def cached(name: str, key: str, measure: Callable[[], Any], *, what: str | None = None,
           eta: str | None = None, check: Callable[[Any], str | None] | None = None,
           rank: Callable[[Any], float] | None = None) -> Any:
    """The value stored for ``key`` in ``$XDG_CACHE_HOME/decograph/NAME``, else ``measure()``'s
    (JSON-ready), stored.

    Measuring prints ``decograph: measuring WHAT on this machine once (ETA; cached in PATH) ...``
    and a ``done`` line to stderr; ``what`` defaults to a name built from ``name`` and
    ``measure``. ``check(value)`` returns why a value is implausible, or ``None``: an implausible
    measurement is repeated up to ``TRIES`` times, then the best-looking one (lowest
    ``rank(value)``; default: the first) is kept with a warning. A cached value that fails
    ``check`` is measured again, until ``ROUNDS`` rounds have ended implausible for ``key``
    (so a machine whose numbers really look odd is not re-timed on every run).
    """
    path = cache_path(name)
    table = _read(path)
    rounds = _suspects(table).get(key, 0)
    label = what or _default_what(name, measure)
    if key in table:
        why = _why_not(check, table[key])
        if why is None or rounds >= ROUNDS:
            return table[key]
        _say(f"{label} (cached in {path}) looks wrong ({why}); measuring it again")
    value, why = _measure(measure, label, path, eta, check, rank)
    if why is not None:
        later = ("it is measured again on the next run" if rounds + 1 < ROUNDS
                 else f"delete {path} to measure it again")
        _say(f"warning: {label} still looks wrong after {TRIES} tries ({why}); keeping the "
             f"best-looking one. An idle machine measures it better: {later}")
    table = _read(path)             # another process may have stored other keys meanwhile
    suspect = _suspects(table)
    suspect.pop(key, None)
    if why is not None:
        suspect[key] = rounds + 1
    if suspect:
        table[_SUSPECT] = suspect
    else:
        table.pop(_SUSPECT, None)
    table[key] = value
    _write(path, table)
    return value


def _suspects(table: dict[str, Any]) -> dict[str, int]:
    """Keys whose stored value was kept although it looked wrong -> rounds that ended so."""
    found = table.get(_SUSPECT)
    return {k: v for k, v in found.items() if isinstance(v, int)} if isinstance(found, dict) else {}


def _default_what(name: str, measure: Callable[[], Any]) -> str:
    """``exported_machine.json`` and ``self._check_exact`` -> ``exported machine (check exact)``."""
    label = name.removesuffix(".json").replace("_", " ")
    fn = getattr(measure, "__name__", "<lambda>")
    return label if fn == "<lambda>" else f"{label} ({fn.strip('_').replace('_', ' ')})"


def _measure(measure: Callable[[], Any], what: str, path: Path, eta: str | None,
             check: Callable[[Any], str | None] | None,
             rank: Callable[[Any], float] | None) -> tuple[Any, str | None]:
    """(value, why it looks wrong or None): up to ``TRIES`` measurements, announced on stderr;
    when all look wrong, the best-looking one."""
    _say(f"measuring {what} on this machine once ({eta + '; ' if eta else ''}cached in {path}) ...")
    t0 = time.perf_counter()
    best, best_rank, best_why = None, math.inf, ""
    for attempt in range(1, TRIES + 1):
        value = measure()
        why = _why_not(check, value)
        if why is None:
            _say(f"measuring {what}: done ({time.perf_counter() - t0:.0f} s)")
            return value, None
        score = rank(value) if rank is not None else attempt
        if best is None or score < best_rank:
            best, best_rank, best_why = value, score, why
        if attempt < TRIES:
            _say(f"{what} looks wrong ({why}), probably timed while the machine was busy; "
                 f"measuring again (try {attempt + 1} of {TRIES})")
    return best, best_why
