"""The OpenAI-compatible HTTP app (FastAPI; streaming as server-sent events).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus). Requests decode through one
``decograph.runtime.scheduler.Scheduler`` (continuous batching). Bad input is a 4xx with an
OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``) and the server
keeps serving; a client that goes away has its row dropped at the next step.

``temperature``: omitted or 0 decodes with the strategy as written (greedy for the lossless
built-ins: exactly greedy decoding's tokens); above 0, the strategy's lossless speculative
sampling at that temperature and ``top_p``; ``seed`` makes a sampled request reproducible.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from decograph.apps.serve.metrics import Metrics
from decograph.apps.serve.models import ServedModel, lane_key, row_sampling
from decograph.errors import InputError
from decograph.runtime.scheduler import Request, Scheduler, SchedulerClosed

__all__ = ["create_app", "MAX_TOKENS_LIMIT"]

MAX_TOKENS_LIMIT = 32768
MAX_N = 8
MAX_STOP = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _token_limit(v: int | None) -> int | None:
    if v is not None and not 1 <= v <= MAX_TOKENS_LIMIT:
        raise ValueError(f"must be between 1 and {MAX_TOKENS_LIMIT}")
    return v


class _Params(BaseModel):
    """The sampling and length parameters both routes take. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    stream_options: dict[str, Any] | None = None

    _max_tokens = field_validator("max_tokens")(classmethod(lambda cls, v: _token_limit(v)))

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 2.0:
            raise ValueError("must be between 0 and 2")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if not 1 <= v <= MAX_N:
            raise ValueError(f"must be between 1 and {MAX_N}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops


class CompletionBody(_Params):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    max_tokens: int | None = 16


class ChatBody(_Params):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None

    _max_completion = field_validator("max_completion_tokens")(classmethod(lambda cls, v: _token_limit(v)))


class _Choice:
    """One choice's text as tokens commit: incremental detokenization (an incomplete UTF-8
    sequence waits for its end) and ``stop`` strings (the text is cut before the first one, the
    request cancelled; a stream holds back what could be the start of one)."""

    def __init__(self, served: ServedModel, req: Request, stops: list[str]) -> None:
        self.served, self.req, self.stops = served, req, stops
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, tokens: tuple[int, ...] | None) -> str:
        """The text that can be shown after ``tokens`` (None: the request ended)."""
        if self.finish is not None:
            return ""
        if tokens is None:
            self.text = self.served.decode(self.ids)
            # EOS, a stop token or a cancellation (a stop string, a client gone) end as "stop"
            self.finish = "length" if self.req.stats.finish_reason in ("max_new_tokens", "error") else "stop"
            return self._cut(final=True)
        self.ids.extend(tokens)
        text = self.served.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        return self._cut(final=False)

    def _cut(self, final: bool) -> str:
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
                self.req.cancel()
                final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def create_app(served: ServedModel, *, max_batch: int = 16, grace_s: float = 30.0,
               scheduler: Scheduler | None = None, prefill_tokens: int = 512) -> FastAPI:
    """The app over ``served``; its scheduler is ``app.state.scheduler`` (closed, with a grace
    period for requests in flight, when the app shuts down)."""
    metrics = Metrics()
    sched = scheduler or Scheduler(served.interpreter, max_batch=max_batch if served.continuous else 1,
                                   on_step=lambda lane, rows: metrics.batch_size.set(rows),
                                   lane_context=served.lane_context(), prefill_tokens=prefill_tokens)
    metrics.watch(sched)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(sched.close, grace_s)

    app = FastAPI(title="decograph", lifespan=lifespan)
    app.state.scheduler, app.state.served, app.state.metrics = sched, served, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        kind = first.get("type", "")
        if kind == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}"
            param = None
        elif kind == "extra_forbidden":
            msg = f"unknown field {param!r}"
        elif kind == "missing":
            msg = f"missing field {param!r}"
        else:
            msg = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        metrics.count(request.url.path, 400)
        return _error(400, msg, param, "invalid_" + (kind or "request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        metrics.count(request.url.path, exc.status_code)
        return _error(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404
                      else "invalid_request_error")

    @app.exception_handler(ApiError)
    async def _api(request: HttpRequest, exc: ApiError) -> JSONResponse:
        metrics.count(request.url.path, exc.status)
        return _error(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served.name, "running": sched.running(), "queued": sched.queued()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "decograph"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest, body: CompletionBody) -> Any:
        _check_model(served, body.model)
        prompts = _prompts(served, body.prompt)
        return await _serve(request, body, prompts, body.max_tokens or 16, chat=False,
                            echo=[served.decode(p) for p in prompts] if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest, body: ChatBody) -> Any:
        _check_model(served, body.model)
        try:
            prompt = served.chat(body.messages)
        except InputError as e:
            raise ApiError(400, str(e), "messages", "invalid_messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        if limit is None:       # the OpenAI default: as many as the context leaves (bounded here)
            limit = min(MAX_TOKENS_LIMIT, (served.max_positions - len(prompt)) if served.max_positions else 512)
            limit = max(1, limit)
        return await _serve(request, body, [prompt], limit, chat=True)

    async def _serve(request: HttpRequest, body: _Params, prompts: list[list[int]], max_tokens: int, *, chat: bool,
                     echo: list[str] | None = None) -> Any:
        for i, p in enumerate(prompts):
            if served.max_positions and len(p) + max_tokens > served.max_positions:
                raise ApiError(400, f"prompt {i} has {len(p)} tokens; with max_tokens={max_tokens} it exceeds the "
                                    f"model's context of {served.max_positions} tokens", "max_tokens",
                               "context_length_exceeded")
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        choices: list[_Choice] = []
        queues: list[asyncio.Queue] = []
        reqs: list[Request] = []
        try:
            for p in prompts:
                for k in range(body.n):
                    seed = None if body.seed is None else body.seed + k
                    lane = lane_key(body.temperature, body.top_p, seed, f"{rid}-{len(reqs)}")
                    q: asyncio.Queue = asyncio.Queue()
                    listener = _listener(loop, q)
                    req = sched.submit(p, max_tokens, lane, listener=listener,
                                       sampling=row_sampling(body.temperature, body.top_p, seed))
                    reqs.append(req)
                    queues.append(q)
                    choices.append(_Choice(served, req, body.stop or []))
        except SchedulerClosed:
            for r in reqs:
                r.cancel()
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down") from None
        except InputError as e:
            for r in reqs:
                r.cancel()
            raise ApiError(400, str(e)) from None
        metrics.requests_started(len(reqs))
        route = "/v1/chat/completions" if chat else "/v1/completions"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(request, rid, chat, choices, queues, include_usage, started, route),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await asyncio.gather(*(_drain(request, c, q) for c, q in zip(choices, queues)))
        finally:
            for r in reqs:
                if not r.done.is_set():
                    r.cancel()
        if await request.is_disconnected():
            metrics.count(route, 499)
            return Response(status_code=499)
        for r in reqs:
            if r.error is not None:
                metrics.count(route, 500)
                raise ApiError(500, f"decoding failed: {r.error}", kind="server_error", code="decode_failed")
        metrics.finished(reqs, started, route)
        out = []
        for i, c in enumerate(choices):
            text = (echo[i // body.n] if echo else "") + c.text
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": c.finish,
                        "logprobs": None} if chat else
                       {"index": i, "text": text, "finish_reason": c.finish, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": served.name, "choices": out, "usage": _usage(reqs, choices)}

    async def _drain(request: HttpRequest, c: _Choice, q: asyncio.Queue) -> None:
        while True:
            try:
                item = await asyncio.wait_for(q.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    c.req.cancel()
                    return
                continue
            c.feed(item)
            if item is None:
                return

    async def _stream(request: HttpRequest, rid: str, chat: bool, choices: list[_Choice], queues: list[asyncio.Queue],
                      include_usage: bool, started: float, route: str) -> AsyncIterator[bytes]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, q: asyncio.Queue) -> None:
            while True:
                item = await q.get()
                await merged.put((i, item))
                if item is None:
                    return

        pumps = [asyncio.create_task(pump(i, q)) for i, q in enumerate(queues)]

        def event(i: int, text: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({"id": rid, "object": kind, "created": created, "model": served.name, "choices": [choice]})

        open_ = len(choices)
        try:
            if chat:
                for i in range(len(choices)):
                    yield event(i, None, None, first=True)
            while open_:
                i, item = await merged.get()
                c = choices[i]
                was_done = c.finish is not None
                text = c.feed(item)
                if text:
                    yield event(i, text, None)
                if c.finish is not None and not was_done:
                    yield event(i, None, c.finish)
                if item is None:
                    open_ -= 1
            errors = [c.req.error for c in choices if c.req.error is not None]
            if errors:
                metrics.count(route, 500)
                yield _sse({"error": {"message": f"decoding failed: {errors[0]}", "type": "server_error",
                                      "param": None, "code": "decode_failed"}})
            else:
                metrics.finished([c.req for c in choices], started, route)
            if include_usage:
                yield _sse({"id": rid, "object": kind, "created": created, "model": served.name, "choices": [],
                            "usage": _usage([c.req for c in choices], choices)})
            yield b"data: [DONE]\n\n"
        finally:                    # the client went away (or the stream ended): free the rows now
            for c in choices:
                if not c.req.done.is_set():
                    c.req.cancel()
            for p in pumps:
                p.cancel()

    return app


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _listener(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Any:
    def put(item: tuple[int, ...] | None) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:            # the event loop has closed: nobody listens any more
            pass
    return put


def _usage(reqs: list[Request], choices: list[_Choice]) -> dict[str, Any]:
    prompt = sum(r.stats.prompt_tokens for r in reqs[:1]) if reqs else 0
    completion = sum(len(c.ids) for c in choices)
    forwards = sum(r.stats.forwards for r in reqs)
    steps = sum(max(0, r.stats.forwards - (1 if r.stats.prompt_tokens > 1 else 0)) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "decograph": {"forwards": forwards, "decode_forwards": steps,
                          "tokens_per_forward": round(completion / steps, 4) if steps else 0.0,
                          "drafted_tokens": sum(r.stats.drafted for r in reqs),
                          "accepted_draft_tokens": sum(r.stats.accepted for r in reqs)}}


def _check_model(served: ServedModel, name: str) -> None:
    if name != served.name:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {served.name!r} (GET /v1/models)",
                       "model", "model_not_found", kind="not_found_error")


def _prompts(served: ServedModel, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt", "empty_prompt")
    if len(prompt) > 64:
        raise ApiError(400, f"at most 64 prompts per request, got {len(prompt)}", "prompt")
    out = []
    vocab = getattr(served.decoder, "vocab_size", None)
    for i, p in enumerate(prompt):
        ids = served.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, f"prompt {i} is empty (no tokens)", "prompt", "empty_prompt")
        if vocab and any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt {i} has a token id outside the vocabulary of {vocab}", "prompt")
        out.append(ids)
    return out
