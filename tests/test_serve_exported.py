"""``decograph serve --exported DIR`` in a process where torch and transformers cannot be
imported (tiny Llama exported with anpd): concurrent requests, streamed or not, each give the
exported decoder's own tokens for that prompt alone; SIGTERM ends it with status 0."""
from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from decograph.exported import ExportedDecoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_cache")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 5, 9, 5, 9, 5], [3, 4, 3, 4, 3], [7], [11, 12, 13, 11, 12, 13, 11], [2, 2, 2, 2], [8, 1, 8, 1]]


@pytest.fixture(scope="module")
def exported(tiny_anpd_export):
    return tiny_anpd_export


@pytest.fixture(scope="module")
def server(exported, cli_without_torch):
    proc = subprocess.Popen([*cli_without_torch, "serve", "--exported", str(exported), "--port", "0",
                             "--max-batch", "4", "--served-model-name", "tiny"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    url, seen = None, []
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        seen.append(line)
        m = re.search(r"Uvicorn running on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
        if time.monotonic() > deadline:
            break
    if url is None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(seen)[-3000:])
    drain = threading.Thread(target=lambda: [seen.append(x) for x in proc.stderr], daemon=True)
    drain.start()
    yield proc, url, seen
    if proc.poll() is None:
        proc.kill()


def test_exported_server_without_torch(exported, server) -> None:
    proc, url, seen = server
    dec = ExportedDecoder(exported)
    want = {i: dec.decode(dec.generate(p, 6 + i)[0]) for i, p in enumerate(PROMPTS)}
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(k: int) -> None:
        i = k % len(PROMPTS)
        try:
            if k % 2:
                got[k] = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=6 + i).choices[0].text
            else:
                got[k] = "".join(c.choices[0].text for c in client.completions.create(
                    model="tiny", prompt=PROMPTS[i], max_tokens=6 + i, stream=True))
        except BaseException as e:       # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert {k: got[k] for k in range(12)} == {k: want[k % len(PROMPTS)] for k in range(12)}
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                      "content": "hi"}]})
    assert r.status_code in (200, 400)          # the tiny tokenizer may have no chat template: then a 400
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(seen)[-3000:]
