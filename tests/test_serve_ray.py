"""Scale-out: the prompt-file batch job (one process, resumable; and sharded over Ray Data
workers on a local Ray instance) and the server as a Ray Serve deployment of 2 replicas, each
giving the single-process outputs (tiny Llama exported with anpd, so each replica loads fast)."""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from decograph.cli import main
from decograph.exported import ExportedDecoder

pytestmark = pytest.mark.usefixtures("private_cache")

TEXTS = ["t1 t5 t9 t5 t9 t5 t9 t5", "t3 t4 t3 t4 t3", "t7", "t2 t2 t8 t2 t2 t8", "t6 t1 t6 t1 t6"]


@pytest.fixture(scope="module")
def exported(tiny_anpd_export):
    return tiny_anpd_export


@pytest.fixture(scope="module")
def want(exported):
    dec = ExportedDecoder(exported)
    return {str(i + 1): dec.decode(dec.generate(dec.encode(t, chat=False), 10)[0]) for i, t in enumerate(TEXTS)}


def prompt_file(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    return p


def read(out: Path) -> dict[str, str]:
    return {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}


def test_prompt_file_job_in_one_process_resumes(exported, want, tmp_path, capsys) -> None:
    inp, out = prompt_file(tmp_path), tmp_path / "out.jsonl"
    args = ["run", "--exported", str(exported), "--prompts-file", str(inp), "--out", str(out),
            "--max-new-tokens", "10", "--no-chat"]
    assert main(args) == 0
    assert read(out) == want
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])           # two done, one torn by a kill
    assert main(args) == 0
    assert read(out) == want and len(out.read_text().splitlines()) == len(TEXTS)
    assert "3 prompts decoded, 2 already in" in capsys.readouterr().err


def test_prompt_file_errors_name_the_line(exported, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "t1"}\n{"prompt": 3}\n')
    assert main(["run", "--exported", str(exported), "--prompts-file", str(bad), "--out",
                 str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2: 'prompt' must be a string" in capsys.readouterr().err
    assert main(["run", "--exported", str(exported), "--prompts-file", str(bad)]) == 2
    assert "--prompts-file needs --out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_prompt_file_job_on_ray_data_gives_the_single_process_outputs(local_ray, exported, want, tmp_path) -> None:
    inp, out = prompt_file(tmp_path), tmp_path / "out.jsonl"
    assert main(["run", "--exported", str(exported), "--prompts-file", str(inp), "--out", str(out),
                 "--max-new-tokens", "10", "--no-chat", "--ray", "--workers", "2"]) == 0
    assert read(out) == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_deployment_with_two_replicas(local_ray, exported, want) -> None:
    openai = pytest.importorskip("openai")
    from decograph.apps.serve.scale import serve_on_ray

    port = _free_port()
    ready, stop = threading.Event(), threading.Event()
    options = {"model": {"exported": str(exported), "name": "tiny"}, "max_batch": 4, "grace": 5, "num_cpus": 1}
    t = threading.Thread(target=serve_on_ray, args=(None, 2, options, "127.0.0.1", port, ready, stop), daemon=True)
    t.start()
    try:
        assert ready.wait(300), "the deployment did not come up"
        from ray import serve

        status = serve.status().applications["decograph"]
        assert status.status == "RUNNING"
        [dep] = status.deployments.values()
        assert sum(dep.replica_states.values()) == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2, timeout=120)
        got = {}
        for i, text in enumerate(TEXTS * 2):
            r = client.completions.create(model="tiny", prompt=text, max_tokens=10, stream=bool(i % 2))
            got[i] = "".join(c.choices[0].text for c in r) if i % 2 else r.choices[0].text
        assert got == {i: want[str(i % len(TEXTS) + 1)] for i in range(2 * len(TEXTS))}
    finally:
        stop.set()
        t.join(120)


def test_without_ray_the_ray_options_say_how_to_install_it(exported, tmp_path, monkeypatch, capsys) -> None:
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    inp = prompt_file(tmp_path)
    assert main(["run", "--exported", str(exported), "--prompts-file", str(inp), "--out", str(tmp_path / "o.jsonl"),
                 "--ray"]) == 2
    assert "needs Ray, which is not installed: pip install 'decograph[ray]'" in capsys.readouterr().err
    assert main(["serve", "--exported", str(exported), "--ray", "--port", "8123"]) == 2
    assert "needs Ray, which is not installed" in capsys.readouterr().err
