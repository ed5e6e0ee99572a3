"""``generate_stream``, transformers-style streamers, prompt forms, input errors and ``Stats``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_helpers import BUILTINS, model_draft_program

from decograph.api import generate, generate_stream, resolve_model
from decograph.errors import InputError
from decograph.models.oracle import OracleLM
from decograph.models.tiny import tiny_model_dir

TEXT_PROMPTS = ["t1 t2 t3 t4 t1 t2 t3", "t5 t9", "t7 t7 t7 t7 t7 t7 t7 t7 t8"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("stream"), vocab_size=64, seed=0)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_dir: Path):
    return resolve_model(str(tiny_dir))


def _by_row(chunks, rows: int):
    out = {i: [] for i in range(rows)}
    for c in chunks:
        out[c.row].append(c)
    return out


@pytest.mark.parametrize("strategy", ["greedy", "ngram", "lookahead"])
def test_stream_equals_generate_with_a_real_tokenizer(strategy: str, tiny_loaded) -> None:
    adapter, tok = tiny_loaded
    results = generate(adapter, tok, TEXT_PROMPTS, strategy=strategy, max_new_tokens=15)
    assert [r.prompt_ids for r in results] == [tok(p)["input_ids"] for p in TEXT_PROMPTS]
    for r in results:
        assert r.text == " ".join(f"t{t}" for t in r.new_token_ids)
    # An EOS that one row produces early makes rows finish at different steps.
    eos = results[1].new_token_ids[2]
    for kw in ({}, {"eos_token_id": eos}):
        ref = generate(adapter, tok, TEXT_PROMPTS, strategy=strategy, max_new_tokens=15, **kw)
        rows = _by_row(generate_stream(adapter, tok, TEXT_PROMPTS, strategy=strategy, max_new_tokens=15, **kw), 3)
        for i, r in enumerate(ref):
            chunks = rows[i]
            assert "".join(c.text for c in chunks) == r.text
            assert [t for c in chunks for t in c.token_ids] == r.new_token_ids
            assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(ref[1].new_token_ids) == 3


def test_stream_from_a_model_directory(tiny_dir: Path) -> None:
    """A model given as a directory path: loaded with its own tokenizer."""
    [r] = generate(str(tiny_dir), None, "t3 t4 t5", strategy="jacobi", max_new_tokens=8)
    chunks = list(generate_stream(str(tiny_dir), None, "t3 t4 t5", strategy="jacobi", max_new_tokens=8))
    assert "".join(c.text for c in chunks) == r.text != ""
    assert sum(c.done for c in chunks) == 1 and chunks[-1].done


class ByteTokenizer:
    """Token i is one byte: odd ids a UTF-8 lead byte (0xC3), even ids an ASCII letter. A lead
    byte alone decodes to U+FFFD, so the stream must hold it back until the next token."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(0xC3 if i % 2 else 0x41 + i % 26 for i in ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("strategy", ["greedy", "jacobi"])
def test_stream_holds_incomplete_utf8_without_losing_token_ids(strategy: str) -> None:
    oracle, tok = OracleLM(), ByteTokenizer()
    prompts = [[1, 2, 3], [6, 7]]
    ref = generate(oracle, tok, prompts, strategy=strategy, max_new_tokens=20)
    assert any(t % 2 for t in ref[0].new_token_ids)          # the case is exercised
    rows = _by_row(generate_stream(oracle, tok, prompts, strategy=strategy, max_new_tokens=20), 2)
    for i, r in enumerate(ref):
        chunks = rows[i]
        assert [t for c in chunks for t in c.token_ids] == r.new_token_ids
        assert "".join(c.text for c in chunks) == r.text
        assert not any(c.text.endswith("\ufffd") for c in chunks[:-1])
        assert sum(c.done for c in chunks) == 1 and chunks[-1].done


def test_stream_leaves_no_inference_mode_behind() -> None:
    """Between chunks (and after an abandoned stream) the caller's autograd state is its own."""
    stream = generate_stream(OracleLM(), None, [1, 2, 3], strategy="jacobi", max_new_tokens=10)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    x = torch.ones(3, requires_grad=True)
    (x * 2).sum().backward()
    assert x.grad is not None and not x.is_inference()
    next(stream)
    assert not torch.is_inference_mode_enabled()
    stream.close()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


class Recorder:
    """A transformers-streamer look-alike that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []

    def put(self, value: torch.Tensor) -> None:
        self.calls.append(("put", value.tolist()))

    def end(self) -> None:
        self.calls.append(("end", []))


class FailingOracle(OracleLM):
    """Raises on its ``fail_at``-th forward (the prefill is the first)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def forward(self, cache, input_ids, position_ids, attend):  # type: ignore[override]
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return super().forward(cache, input_ids, position_ids, attend)


@pytest.mark.parametrize("strategy", ["greedy", "ngram"])
def test_streamer_gets_prompt_then_tokens_then_one_end(strategy: str) -> None:
    rec = Recorder()
    [r] = generate(OracleLM(), None, [1, 2, 3], strategy=strategy, max_new_tokens=12, streamer=rec)
    kinds = [k for k, _ in rec.calls]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    assert rec.calls[0] == ("put", [[1, 2, 3]])
    assert [t for k, v in rec.calls[1:-1] for t in v] == r.new_token_ids


def test_streamer_end_exactly_once_when_generation_raises() -> None:
    for fail_at in (2, 4):
        rec = Recorder()
        with pytest.raises(RuntimeError, match="boom"):
            generate(FailingOracle(fail_at), None, [1, 2, 3], strategy="greedy", max_new_tokens=12, streamer=rec)
        kinds = [k for k, _ in rec.calls]
        assert kinds.count("end") == 1 and kinds[-1] == "end"
        assert kinds.count("put") == fail_at - 1       # the prompt, then one put per finished step
    rec = Recorder()
    with pytest.raises(InputError, match="one prompt"):
        generate(OracleLM(), None, [[1, 2], [3, 4]], max_new_tokens=3, streamer=rec)
    assert rec.calls == []


def test_transformers_text_streamer_prints_the_text(tiny_loaded, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import TextStreamer

    adapter, tok = tiny_loaded
    [r] = generate(adapter, tok, "t1 t2 t3", strategy="lookahead", max_new_tokens=10,
                   streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out == r.text + "\n"


def test_prompt_forms_agree(tiny_loaded) -> None:
    adapter, tok = tiny_loaded
    ids = [[1, 2, 3, 4], [5, 9]]
    texts = ["t1 t2 t3 t4", "t5 t9"]
    want = [r.new_token_ids for r in generate(adapter, None, ids, strategy="ngram", max_new_tokens=6)]
    forms = {
        "str": (texts[0], want[:1]),
        "list[str]": (texts, want),
        "ids": (ids[0], want[:1]),
        "list[ids]": (ids, want),
        "2-D tensor": (torch.tensor([ids[0]]), want[:1]),
        "1-D tensor": (torch.tensor(ids[0]), want[:1]),
    }
    for name, (prompts, expected) in forms.items():
        out = generate(adapter, tok, prompts, strategy="ngram", max_new_tokens=6)
        assert [r.new_token_ids for r in out] == expected, name
        assert out[0].prompt_ids == ids[0], name


def test_bad_prompts_raise_input_error(tiny_loaded) -> None:
    adapter, tok = tiny_loaded
    with pytest.raises(InputError, match="empty"):
        generate(adapter, tok, "", max_new_tokens=3)
    with pytest.raises(InputError, match="empty"):
        generate(adapter, tok, ["t1", ""], max_new_tokens=3)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate(adapter, None, [[1, 2], []], max_new_tokens=3)
    with pytest.raises(InputError, match="no prompts"):
        generate(adapter, None, [], max_new_tokens=3)
    with pytest.raises(InputError, match="tokenizer"):
        generate(OracleLM(), None, "t1 t2", max_new_tokens=3)
    with pytest.raises(InputError, match="-1"):
        generate(adapter, None, [3, -1], max_new_tokens=3)
    for bad in (-1, 2.5):
        with pytest.raises(InputError, match="max_new_tokens"):
            generate(adapter, None, [3, 4], max_new_tokens=bad)
    with pytest.raises(InputError, match="empty"):
        list(generate_stream(adapter, tok, "", max_new_tokens=3))


def test_prompt_longer_than_the_context() -> None:
    oracle = OracleLM(max_positions=16)
    with pytest.raises(InputError, match=r"20 tokens.*16 positions"):
        generate(oracle, None, list(range(1, 21)), max_new_tokens=1)
    with pytest.raises(InputError, match=r"prompt 1 has 10 tokens; with max_new_tokens=7.*16"):
        generate(oracle, None, [[1, 2], list(range(1, 11))], max_new_tokens=7)
    # Exactly filling the context is fine, for a drafting strategy too.
    p = list(range(1, 11))
    for strategy in ("greedy", "lookahead", "jacobi"):
        [r] = generate(oracle, None, p, strategy=strategy, max_new_tokens=6)
        assert r.new_token_ids == oracle.reference(p, 6)
    [r] = generate(oracle, None, p, strategy=model_draft_program(8), max_new_tokens=6,
                   draft_models={"draft": OracleLM(max_positions=16)})
    assert r.new_token_ids == oracle.reference(p, 6)


@pytest.mark.parametrize("strategy", BUILTINS)
def test_stats_are_consistent(strategy: str) -> None:
    prompts = [[1, 2, 3], [7, 3, 7, 3, 7, 3, 9], [4]]
    rs = generate(OracleLM(), None, prompts, strategy=strategy, max_new_tokens=21)
    for r, p in zip(rs, prompts):
        s = r.stats
        assert s.new_tokens == len(r.new_token_ids) == 21
        assert s.forward_passes == s.decode_steps + (len(p) > 1)   # a one-token prompt needs no prefill
        assert len(s.accepted_per_step) == len(s.drafted_per_step) == s.decode_steps
        assert all(0 <= a <= d for a, d in zip(s.accepted_per_step, s.drafted_per_step))
        assert sum(s.accepted_per_step) + s.decode_steps == s.new_tokens
        assert s.tokens_per_forward == pytest.approx(s.new_tokens / s.decode_steps)
        assert s.mean_accepted == pytest.approx(sum(s.accepted_per_step) / s.decode_steps)
        assert s.wall_time_s > 0 and s.tokens_per_s > 0
        d = s.as_dict()
        assert d["new_tokens"] == s.new_tokens and d["decode_steps"] == s.decode_steps
        assert d["accepted_per_step"] == list(s.accepted_per_step)
        assert d["tokens_per_forward"] == round(s.tokens_per_forward, 4)
        if strategy == "greedy":
            assert s.decode_steps == 21 and s.tokens_per_forward == 1.0 and s.mean_accepted == 0.0
            assert set(s.drafted_per_step) == {0}


def test_strategy_forms_agree(tmp_path: Path) -> None:
    """A built-in name, a Strategy, its Program, a strategy file path, and overrides."""
    from decograph.frontends.strategies import builtin_path, load_strategy

    oracle, p = OracleLM(), [[1, 2, 3], [7, 3, 7, 3, 9]]
    want = [oracle.reference(q, 17) for q in p]
    path = tmp_path / "mine.yaml"
    path.write_text(builtin_path("ngram").read_text(encoding="utf-8"), encoding="utf-8")
    forms = ["ngram", load_strategy("ngram"), load_strategy("ngram").program, str(path)]
    for form in forms:
        rs = generate(oracle, None, p, strategy=form, max_new_tokens=17)
        assert [r.new_token_ids for r in rs] == want, form
    rs = generate(oracle, None, p, strategy="ngram", max_new_tokens=17, overrides={"k": 1})
    assert [r.new_token_ids for r in rs] == want
    assert max(d for r in rs for d in r.stats.drafted_per_step) == 1
