"""The server's Prometheus metrics (``GET /metrics``), in a registry of the app's own."""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics"]

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("decograph_requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.started = Counter("decograph_decode_requests_started", "Prompts (choices) submitted for decoding",
                               registry=r)
        self.prompt_tokens = Counter("decograph_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("decograph_completion_tokens", "Tokens generated for finished requests",
                                         registry=r)
        self.forwards = Counter("decograph_forwards", "Forwards that finished requests took part in (prompts "
                                "included)", registry=r)
        self.accepted = Counter("decograph_accepted_draft_tokens", "Draft tokens accepted", registry=r)
        self.drafted = Counter("decograph_drafted_tokens", "Draft tokens proposed", registry=r)
        self.tokens_per_forward = Histogram("decograph_tokens_per_forward", "Generated tokens per decode forward, per "
                                            "request", buckets=(1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0),
                                            registry=r)
        self.batch_size = Gauge("decograph_batch_size", "Rows in the batch of the latest step", registry=r)
        self.queue = Gauge("decograph_queue_length", "Requests waiting to join a batch", registry=r)
        self.running = Gauge("decograph_running_requests", "Requests being decoded", registry=r)
        self.latency = Histogram("decograph_request_latency_seconds", "Request latency, submission to last token",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("decograph_time_to_first_token_seconds", "Submission to the first generated token",
                              buckets=_LATENCY, registry=r)
        self.queued = Histogram("decograph_queue_wait_seconds", "Submission to joining a batch", buckets=_LATENCY,
                                registry=r)

    def watch(self, scheduler: Any) -> None:
        self.queue.set_function(scheduler.queued)
        self.running.set_function(scheduler.running)

    def count(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def requests_started(self, n: int) -> None:
        self.started.inc(n)

    def finished(self, reqs: list[Any], started: float, route: str) -> None:
        self.count(route, 200)
        self.latency.labels(route).observe(time.perf_counter() - started)
        for r in reqs:
            st = r.stats
            self.prompt_tokens.inc(st.prompt_tokens)
            self.completion_tokens.inc(st.completion_tokens)
            self.forwards.inc(st.forwards)
            self.accepted.inc(st.accepted)
            self.drafted.inc(st.drafted)
            if st.tokens_per_forward:
                self.tokens_per_forward.observe(st.tokens_per_forward)
            if st.first_token_s:
                self.ttft.observe(st.first_token_s)
            self.queued.observe(st.queued_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
