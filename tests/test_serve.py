"""``decograph serve``: the real server on a loopback port, the default model with anpd,
talked to with the official ``openai`` client (and httpx for what the client hides): outputs
equal the same prompt decoded alone, streamed or not, under concurrency; bad input is a 4xx
and the server keeps serving; a client that leaves frees its row; SIGTERM drains."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import decograph  # noqa: E402
from decograph.apps.serve.app import create_app  # noqa: E402
from decograph.apps.serve.models import load_served  # noqa: E402

pytestmark = pytest.mark.real_model

PROMPTS = ["Name three primary colors.", "What is the capital of France?", "Write a haiku about rain.",
           "List two prime numbers.", "Say hello in Spanish.", "What is 2 + 3?", "Name a large planet.",
           "Give one synonym of happy."]
N = 12


class Server:
    """uvicorn serving ``app`` in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def served():
    return load_served(strategy="anpd")


@pytest.fixture(scope="module")
def server(served):
    s = Server(create_app(served, max_batch=16))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def alone(served):
    """Each prompt decoded alone through the API (greedy: exactly Hugging Face greedy)."""
    dec = served.decoder
    cache: dict[tuple, str] = {}

    def run(ids: list[int], n: int = N) -> str:
        key = (tuple(ids), n)
        if key not in cache:
            [r] = decograph.generate(dec.source, dec.tokenizer, [ids], "greedy", n)
            cache[key] = r.text
        return cache[key]
    return run


def test_completion_equals_the_prompt_alone_with_usage(served, client, alone) -> None:
    r = client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=N)
    assert r.choices[0].text == alone(served.encode(PROMPTS[0]))
    assert r.choices[0].finish_reason in ("length", "stop")
    u = r.usage
    assert u.prompt_tokens == len(served.encode(PROMPTS[0])) and 1 <= u.completion_tokens <= N
    extra = u.model_extra["decograph"]
    assert extra["forwards"] >= 1 and extra["tokens_per_forward"] >= 1.0
    assert extra["accepted_draft_tokens"] <= extra["drafted_tokens"]


def test_chat_multi_turn_with_a_system_prompt_uses_the_models_template(served, client, alone) -> None:
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What is the boiling point of water?"},
                {"role": "assistant", "content": "100 degrees Celsius at sea level."},
                {"role": "user", "content": "And in Fahrenheit?"}]
    ids = served.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert served.chat(messages) == ids                 # our Jinja rendering = transformers'
    r = client.chat.completions.create(model=served.name, messages=messages, max_tokens=N)
    assert r.choices[0].message.content == alone(ids)
    assert r.choices[0].message.role == "assistant"


def test_streaming_gives_the_same_text(served, client) -> None:
    whole = client.completions.create(model=served.name, prompt=PROMPTS[2], max_tokens=N).choices[0].text
    parts, finish = [], None
    for chunk in client.completions.create(model=served.name, prompt=PROMPTS[2], max_tokens=N, stream=True):
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == whole and finish in ("length", "stop") and len(parts) > 2
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    whole = client.chat.completions.create(model=served.name, messages=msgs, max_tokens=N).choices[0].message.content
    stream = client.chat.completions.create(model=served.name, messages=msgs, max_tokens=N, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == whole
    assert usage is not None and usage.completion_tokens >= 1


def test_sixteen_concurrent_requests_each_equal_their_prompt_alone(served, client, alone) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            p = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                r = client.completions.create(model=served.name, prompt=p, max_tokens=N - i % 5)
                results[i] = r.choices[0].text
            else:
                chunks = client.completions.create(model=served.name, prompt=p, max_tokens=N - i % 5, stream=True)
                results[i] = "".join(c.choices[0].text for c in chunks)
        except BaseException as e:      # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i in range(16):
        assert results[i] == alone(served.encode(PROMPTS[i % len(PROMPTS)]), N - i % 5), i


def test_stop_sequences_cut_the_text(served, client, alone) -> None:
    text = alone(served.encode(PROMPTS[0]))
    word = re.findall(r"[A-Za-z]{3,}", text)[1]           # a word inside the greedy output
    r = client.completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=N, stop=["@@", word])
    assert r.choices[0].text == text[:text.index(word)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_gives_choices(served, client) -> None:
    kw = dict(model=served.name, prompt=PROMPTS[4], max_tokens=8, temperature=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    r = client.completions.create(model=served.name, prompt=PROMPTS[5], max_tokens=4, n=3, temperature=1.0, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_models_health_and_metrics(served, server, client) -> None:
    assert [m.id for m in client.models.list().data] == [served.name]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    body = httpx.get(server.url + "/metrics").text
    for name in ("decograph_requests_total", "decograph_completion_tokens_total", "decograph_batch_size",
                 "decograph_queue_length", "decograph_request_latency_seconds_bucket",
                 "decograph_tokens_per_forward_bucket", "decograph_time_to_first_token_seconds_bucket"):
        assert name in body, name


BAD = [
    ("malformed JSON", b'{"model": "x", "prompt": ', 400, None),
    ("unknown field", {"prompt": "hi", "max_tokens": 4, "frobnicate": 1}, 400, "frobnicate"),
    ("unknown model", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("huge max_tokens", {"prompt": "hi", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("too many stops", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty stop", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("prompt past the context", {"prompt": [17] * 9000, "max_tokens": 4}, 400, "max_tokens"),
    ("token outside the vocabulary", {"prompt": [10 ** 7], "max_tokens": 4}, 400, "prompt"),
    ("empty prompt", {"prompt": "", "max_tokens": 4}, 400, "prompt"),
    ("temperature out of range", {"prompt": "hi", "temperature": 7}, 400, "temperature"),
]


@pytest.mark.parametrize("what, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(served, server, client, what, body, status, param) -> None:
    if isinstance(body, dict):
        body = json.dumps({"model": served.name} | body).encode()
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param or param in err["message"], err
    ok = client.completions.create(model=served.name, prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


def test_bad_chat_messages_are_400(served, server) -> None:
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}], "hello"):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": served.name, "messages": messages},
                       timeout=60)
        assert r.status_code == 400, (messages, r.text)
        assert r.json()["error"]["message"]


def test_a_client_that_leaves_mid_stream_frees_its_row(served, server, client) -> None:
    sched = server.server.config.app.state.scheduler
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": served.name, "prompt": PROMPTS[6], "max_tokens": 5000, "stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break                               # one chunk, then hang up
    deadline = time.monotonic() + 60
    while sched.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sched.running() == 0
    ok = client.completions.create(model=served.name, prompt="Hi", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_sigterm_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    """The real command: a request in flight when SIGTERM arrives completes; the process exits 0."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "decograph", "serve", "--port", "0", "--strategy", "greedy",
                             "--grace", "60"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 180
        for line in proc.stderr:                    # uvicorn prints the bound address
            m = re.search(r"Uvicorn running on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
            assert time.monotonic() < deadline
        assert url
        out: dict = {}

        def call() -> None:
            out["r"] = httpx.post(url + "/v1/completions", json={"model": "SmolLM2-135M-Instruct",
                                                                 "prompt": PROMPTS[0], "max_tokens": 24}, timeout=120)

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:          # the request is being decoded
            if httpx.get(url + "/health").json()["running"]:
                break
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] >= 1
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
