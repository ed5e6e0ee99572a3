"""Continuous batching: requests join a running batch at the next step and leave when they end.

A ``Scheduler`` owns one backend's decoder for a server. Requests go to a *lane*: one running
``Interpreter`` whose top-level loop admits new rows at every step boundary
(``RunConfig.admit``) and drops cancelled ones there. Requests that decode the same way share
a lane (greedy ones and unseeded sampling ones, whatever their temperature and top-p: each row
carries its own, ``RowSampling``); a seeded request gets a lane of its own, so that its draws
(how many per step depends on its drafts, which depend on the batch's load) are its own and a
rerun gives the same tokens.
Each lane runs in a thread of its own, and the lanes take turns step by step (one forward on
the device at a time, first come first served), so a long sampling request never stalls
greedy ones. A lane with nothing left to do ends; the next request starts it again.

Every row gets exactly the tokens it would get alone: the backend prefills an admitted
prompt in a forward of its own and keeps a cache row per request (see ``Batch.admit``).

Torch-free, like the rest of the runtime: the exported decoder serves through it.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator

from decograph.errors import InputError
from decograph.runtime.interp import Admission, Event, Interpreter, RunConfig

__all__ = ["Scheduler", "Request", "RequestStats", "SchedulerClosed"]


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new request."""


@dataclass
class RequestStats:
    """What decoding one request cost: forwards it took part in (its prompt's included), draft
    tokens proposed and accepted, and the batch sizes it saw."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    finish_reason: str = ""
    queued_s: float = 0.0             # submission to admission
    first_token_s: float = 0.0        # submission to the first committed token

    @property
    def tokens_per_forward(self) -> float:
        steps = self.forwards - (1 if self.prompt_tokens > 1 else 0)
        return self.completion_tokens / steps if steps > 0 else 0.0


class Request:
    """A submitted prompt: iterate it for its token chunks (tuples, as they commit); ``stats``
    when it has ended; ``cancel()`` drops its row at the next step boundary."""

    def __init__(self, scheduler: Scheduler, rid: int, prompt: list[int], max_new: int, lane: Hashable,
                 listener: Callable[[tuple[int, ...] | None], None] | None = None, sampling: Any = None) -> None:
        self.id, self.prompt, self.max_new, self.lane, self.listener = rid, prompt, max_new, lane, listener
        self.sampling = sampling
        self.stats = RequestStats(prompt_tokens=len(prompt))
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._chunks: queue.Queue[tuple[int, ...] | None] = queue.Queue()
        self._scheduler = scheduler
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self._scheduler._cancel(self)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        while True:
            chunk = self._chunks.get()
            if chunk is None:
                if self.error is not None:
                    raise self.error
                return
            yield chunk

    def result(self, timeout: float | None = None) -> list[int]:
        """All its tokens, when it has ended."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.tokens)

    # -- the lane's side ------------------------------------------------------------------

    def _push(self, tokens: tuple[int, ...]) -> None:
        if tokens and not self.tokens:
            self.stats.first_token_s = time.perf_counter() - self.submitted
        self.tokens += tokens
        self.stats.completion_tokens = len(self.tokens)
        if tokens:
            self._chunks.put(tokens)
            if self.listener is not None:
                self.listener(tokens)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.stats.finish_reason = reason
        self.error = error
        self.done.set()
        self._chunks.put(None)
        if self.listener is not None:
            self.listener(None)


@dataclass
class _Lane:
    key: Hashable
    pending: collections.deque = field(default_factory=collections.deque)
    cancels: set[int] = field(default_factory=set)
    live: dict[int, Request] = field(default_factory=dict)
    thread: threading.Thread | None = None
    closed: bool = False
    interp: Interpreter | None = None


class Scheduler:
    """Continuous batching over ``make_interpreter(lane_key, config)``, which returns the
    runtime's interpreter for a lane (its program, on the backend's engine) with ``config``
    (a ``RunConfig`` whose ``admit`` is the lane's). ``max_batch``: the most rows a lane
    decodes at once (the rest wait their turn). ``on_step(lane_key, rows)``: called before
    each step with the lane's batch size (metrics). ``prefill_tokens``: the most prompt tokens
    a step boundary admits (at least one request; 0: no limit), so that a burst of requests
    has its prompts' forwards spread over the running batch's steps instead of all before the
    next one (default 512)."""

    def __init__(self, make_interpreter: Callable[[Hashable, RunConfig], Interpreter], *, max_batch: int = 16,
                 idle_s: float = 0.05, on_step: Callable[[Hashable, int], None] | None = None,
                 lane_context: Callable[[], Any] | None = None, prefill_tokens: int = 512) -> None:
        if max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_tokens < 0:
            raise InputError(f"prefill_tokens must be >= 0, got {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
        self.make_interpreter, self.max_batch, self.idle_s, self.on_step = make_interpreter, max_batch, idle_s, on_step
        self.lane_context = lane_context        # entered by each lane's thread (torch: inference mode)
        self._lock = threading.Condition()
        self._lanes: dict[Hashable, _Lane] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._turns: collections.deque[_Lane] = collections.deque()
        self._owner: _Lane | None = None

    # -- the server's side ------------------------------------------------------------------

    def submit(self, prompt: list[int], max_new: int, lane: Hashable = "greedy",
               listener: Callable[[tuple[int, ...] | None], None] | None = None, sampling: Any = None) -> Request:
        """Queue ``prompt`` for ``max_new`` tokens in ``lane``; ``listener`` (called from the
        lane's thread) gets each committed chunk, then None when the request has ended;
        ``sampling`` (a ``RowSampling``): the row's own temperature and top-p, in place of the
        lane program's verification (rows of different temperatures share a batch)."""
        if not prompt:
            raise InputError("the prompt is empty: give at least one token")
        with self._lock:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            req = Request(self, next(self._ids), list(prompt), int(max_new), lane, listener, sampling)
            self._enqueue(req)
        return req

    def _enqueue(self, req: Request) -> None:
        """Queue ``req`` in its lane, starting the lane when none runs (the lock held)."""
        ln = self._lanes.get(req.lane)
        if ln is None or ln.closed:
            ln = self._lanes[req.lane] = _Lane(req.lane)
            ln.thread = threading.Thread(target=self._run_lane, args=(ln,), daemon=True,
                                         name=f"decograph-lane-{req.lane}")
            ln.thread.start()
        ln.pending.append(req)
        self._lock.notify_all()

    def queued(self) -> int:
        """Requests waiting to join a batch."""
        with self._lock:
            return sum(len(ln.pending) for ln in self._lanes.values())

    def running(self) -> int:
        """Rows being decoded, over every lane."""
        with self._lock:
            return sum(len(ln.live) for ln in self._lanes.values())

    def close(self, grace_s: float = 30.0) -> bool:
        """Take no new request; let the admitted and queued ones finish within ``grace_s``
        seconds, then cancel what is left. True when everything ended in time."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        deadline = time.monotonic() + grace_s
        for ln in list(self._lanes.values()):
            if ln.thread is not None:
                ln.thread.join(max(0.0, deadline - time.monotonic()))
        clean = all(ln.thread is None or not ln.thread.is_alive() for ln in self._lanes.values())
        if not clean:
            with self._lock:
                for ln in self._lanes.values():
                    for req in list(ln.live.values()) + list(ln.pending):
                        ln.cancels.add(req.id)
                    ln.pending.clear()
                self._lock.notify_all()
        return clean

    def _cancel(self, req: Request) -> None:
        with self._lock:
            ln = self._lanes.get(req.lane)
            if ln is None:
                return
            if req in ln.pending:
                ln.pending.remove(req)
                req._finish("cancelled")
            elif req.id in ln.live:
                ln.cancels.add(req.id)
                self._lock.notify_all()

    # -- turns: one lane steps at a time, first come first served -----------------------------

    def _enter(self, ln: _Lane) -> None:
        with self._lock:
            self._turns.append(ln)
            while self._owner is not None or self._turns[0] is not ln:
                self._lock.wait()
            self._turns.popleft()
            self._owner = ln

    def _leave(self, ln: _Lane) -> None:
        with self._lock:
            if self._owner is ln:
                self._owner = None
            self._lock.notify_all()

    # -- a lane ---------------------------------------------------------------------------------

    def _admit(self, ln: _Lane, idle: bool) -> Admission:
        """The lane's step boundary: give the device to a waiting lane, then take in queued
        requests (while idle, wait a moment for one) and hand over cancellations."""
        self._leave(ln)
        with self._lock:
            if idle:
                end = time.monotonic() + self.idle_s
                while not ln.pending and not ln.cancels and time.monotonic() < end:
                    self._lock.wait(max(0.0, end - time.monotonic()))
                if not ln.pending:
                    ln.closed = True            # the lane ends; a new request starts another
                    for rid in list(ln.cancels):
                        ln.cancels.discard(rid)
                    return Admission()
            new = []
            engine_rows = getattr(ln.interp.engine, "max_rows", 0) if ln.interp is not None else 0
            limit = min(self.max_batch, engine_rows) if engine_rows else self.max_batch
            left = self.prefill_tokens or None          # prompt tokens this boundary may still take
            while ln.pending and len(ln.live) < limit:
                size = len(ln.pending[0].prompt)
                if new and left is not None and size > left:
                    break                       # its prompt's forward waits for the next boundary
                req = ln.pending.popleft()
                if left is not None:
                    left -= size
                req.stats.queued_s = time.perf_counter() - req.submitted
                ln.live[req.id] = req
                new.append((req.id, req.prompt, req.max_new, req.sampling))
            cancel = [rid for rid in ln.cancels if rid in ln.live]
            ln.cancels.clear()
            gone = [ln.live.pop(rid) for rid in cancel]
        for req in gone:
            req._finish("cancelled")
        if new or cancel or not idle:
            self._enter(ln)
        if self.on_step is not None:
            self.on_step(ln.key, len(ln.live))
        return Admission(new=new, cancel=cancel)

    def _run_lane(self, ln: _Lane) -> None:
        cfg = RunConfig(admit=lambda idle: self._admit(ln, idle))
        self._enter(ln)
        try:
            with self.lane_context() if self.lane_context is not None else contextlib.nullcontext():
                interp = ln.interp = self.make_interpreter(ln.key, cfg)
                for event in interp.run([]):
                    self._dispatch(ln, interp, event)
        except BaseException as e:                  # noqa: BLE001 -- every live request learns of it
            with self._lock:
                ln.closed = True
                reqs = list(ln.live.values()) + list(ln.pending)
                ln.live.clear()
                ln.pending.clear()
            for req in reqs:
                req._finish("error", e)
        finally:
            self._leave(ln)
            with self._lock:
                ln.closed = True
                if self._lanes.get(ln.key) is ln:
                    del self._lanes[ln.key]
                orphans = list(ln.pending)      # came in as the lane closed: start them again
                ln.pending.clear()
                for req in orphans:
                    self._enqueue(req)

    def _dispatch(self, ln: _Lane, interp: Interpreter, event: Event) -> None:
        req = ln.live.get(event.row)
        if req is None:
            return
        req._push(event.tokens)
        if event.done:
            row = next((r for r in interp.state.rows if r.index == event.row), None) if interp.state else None
            if row is not None:
                req.stats.forwards = row.forwards
                req.stats.drafted, req.stats.accepted = sum(row.drafted), sum(row.accepted)
                reason = row.finish_reason or "max_new_tokens"
            else:
                reason = "max_new_tokens"
            with self._lock:
                ln.live.pop(event.row, None)
            req._finish(reason)
