"""``decograph train-draft`` on tiny random models: the torch head equals the numpy reference
(one step, a tree mask, the training-time-test unroll), training lowers the loss, a resumed run
equals an uninterrupted one bit for bit, the head file round-trips and ``resolve_head`` finds
it, the acceptance metric counts what drafting would accept, the CLI refuses bad arguments, and
the data never reads the benchmark prompts."""
from __future__ import annotations

import builtins
import io
import itertools
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from decograph.cli import main
from decograph.errors import InputError
from decograph.heads import data as D
from decograph.heads import questions as Q
from decograph.heads.model import DraftHead, chain_mask, to_head_weights
from decograph.heads.spec import WEIGHT_SHAPES, HeadConfig, HeadWeights, load_head, save_head
from decograph.heads.store import cached_head_path, resolve_head
from decograph.heads.trainer import TrainOptions, acceptance

ROOT = Path(__file__).resolve().parents[1]
CONFIG = HeadConfig(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48, rope_theta=10000.0, eps=1e-5,
                    embed_scale=1.5)
TINY = TrainOptions(vocab=48, seq_len=96, batch=4, lr=5e-3, data_chunks=12, checkpoint_every=2, corpus_chars=50_000)


def _random_head(seed: int = 0, vocab: int = 50) -> tuple[HeadWeights, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in WEIGHT_SHAPES(CONFIG).items()}
    embed = rng.standard_normal((vocab, 32)).astype(np.float32)
    lm = rng.standard_normal((vocab, 32)).astype(np.float32)
    return HeadWeights(CONFIG, w, np.arange(0, vocab, 2)), embed, lm


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x)


# ------------------------------------------------------------------ the module is the reference math


def test_module_step_equals_numpy_reference_with_past_and_tree_mask() -> None:
    head, embed, lm = _random_head()
    ref, mod = head.bind(embed, lm), DraftHead.from_head_weights(head, embed, lm)
    rng = np.random.default_rng(1)
    P, q = 5, 4
    past_k = rng.standard_normal((P, 2, 8)).astype(np.float32)
    past_v = rng.standard_normal((P, 2, 8)).astype(np.float32)
    feats = rng.standard_normal((q, 32)).astype(np.float32)
    tokens, positions = rng.integers(0, 50, q), np.array([5, 6, 6, 7])
    # a tree: node 0 the root's child, nodes 1 and 2 its children, node 3 under node 1
    tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)
    mask = np.concatenate([np.ones((q, P), bool), tree], 1)
    want = ref.step(feats, tokens, positions, past_k, past_v, mask)
    with torch.no_grad():
        got = mod.step(_t(feats), _t(tokens), _t(positions), _t(past_k), _t(past_v), _t(mask))
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.numpy(), w, atol=1e-5, rtol=0)
        np.testing.assert_allclose(mod.logits(got[0]).numpy(), ref.logits(want[0]), atol=1e-5, rtol=0)
    assert set(mod.state_dict()) == set(WEIGHT_SHAPES(CONFIG))


def test_whole_chunk_forward_and_unroll_equal_incremental_drafting() -> None:
    """Depth 1 over a chunk equals stepping it token by token; depth d's row j equals drafting:
    the past is depth 1's keys up to the chain's root, then the chain's own nodes, each fed the
    previous depth's predicted feature."""
    head, embed, lm = _random_head(2)
    ref, mod = head.bind(embed, lm), DraftHead.from_head_weights(head, embed, lm)
    rng = np.random.default_rng(3)
    T = 9
    feats = rng.standard_normal((T, 32)).astype(np.float32)
    nxt = rng.integers(0, 50, T)
    with torch.no_grad():
        outs = [o[0].numpy() for o in mod(_t(feats)[None], _t(nxt)[None], depth=3)]
    empty = np.zeros((0, 2, 8), np.float32)
    f1, k1, v1 = ref.step(feats, nxt, np.arange(T), empty, empty)
    np.testing.assert_allclose(outs[0], f1, atol=1e-5, rtol=0)
    for r in range(T - 2):                                      # a chain rooted at r, drafted 3 deep
        past_k, past_v, feat = k1[:r + 1], v1[:r + 1], f1[r:r + 1]
        for d in (2, 3):
            j = r + d - 1
            out, k, v = ref.step(feat, nxt[j:j + 1], np.array([j]), past_k, past_v)
            np.testing.assert_allclose(outs[d - 1][j], out[0], atol=1e-5, rtol=0)
            past_k, past_v, feat = np.concatenate([past_k, k]), np.concatenate([past_v, v]), out


def test_chain_mask_rows() -> None:
    m = chain_mask(5, 3).numpy().astype(int)
    # row 4 (root 2): depth 1 at 0..2, depth 2 at 3, depth 3 at 4
    assert m[4].tolist() == [1, 1, 1, 0, 0] + [0, 0, 0, 1, 0] + [0, 0, 0, 0, 1]
    assert m.sum(1).min() >= 1


def test_head_file_round_trip_through_the_module(tmp_path: Path) -> None:
    head, embed, lm = _random_head(4)
    mod = DraftHead.from_head_weights(head, embed, lm)
    back = load_head(save_head(to_head_weights(mod, head.vocab_ids), tmp_path / "h.npz"))
    assert back.config == head.config and np.array_equal(back.vocab_ids, head.vocab_ids)
    for k, v in head.weights.items():
        np.testing.assert_array_equal(back.weights[k], v.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------ the acceptance metric


class _Scripted:
    """A stand-in head whose depth-d guess at row j is ``guesses[d-1][j]`` (token ids)."""

    def __init__(self, guesses: list[list[int]], vocab: int = 16) -> None:
        self.guesses = guesses
        self.vocab_ids = torch.arange(vocab)
        self.sub_index = torch.arange(vocab)
        self.embed = torch.zeros(vocab, 2)

    def __call__(self, inp: torch.Tensor, nxt: torch.Tensor, depth: int) -> list[torch.Tensor]:
        return [torch.tensor(g[:inp.shape[1]])[None] for g in self.guesses[:depth]]

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(g, 16).float()


def _chunk(tokens: list[int], argmax: list[int], start: int = 0) -> D.Chunks:
    n = len(tokens)
    return D.Chunks(np.array([tokens], np.int32), np.array([n], np.int32), np.array([start], np.int32),
                    np.zeros((1, n, 2), np.float16), np.array([argmax], np.int32))


def test_acceptance_counts_chains_as_drafting_would() -> None:
    # greedy text: t_{i+1} == argmax[i] everywhere, so every row may root a chain
    argmax = [3, 4, 5, 6, 7, 8, 9]
    tokens = [1] + argmax[:-1]
    right = argmax[1:] + [0]                  # row j's right guess is argmax[j+1]
    wrong = [0] * 7
    d2 = list(right)
    d2[3] = 0                                 # depth 2 misses at row 3 (the chain rooted at 2)
    r = acceptance(_Scripted([right, d2, right]), _chunk(tokens, argmax), depth=3)
    # depth 1: rows 0..5 have a label, all right; depth 2: chains rooted 0..4, one wrong (row 3);
    # depth 3: chains rooted 0..3 whose depth 2 was right: roots 0, 1, 3 -> all right
    assert r["acc"] == [1.0, 0.8, 1.0] and r["positions"] == 6
    assert r["chain"] == pytest.approx(1 + 0.8 + 0.8)
    assert acceptance(_Scripted([wrong, right, right]), _chunk(tokens, argmax), depth=2)["acc"] == [0.0, 0.0]
    # a prompt (start 3): chains root at rows >= 3 only
    assert acceptance(_Scripted([right]), _chunk(tokens, argmax, start=3), depth=1)["positions"] == 3


def test_acceptance_skips_chains_through_text_the_target_would_not_write() -> None:
    argmax = [3, 4, 5, 6, 7, 8]
    tokens = [1, 3, 4, 9, 6, 7]              # t_3 = 9 is not the target's argmax[2] = 5
    right = argmax[1:] + [0]
    r = acceptance(_Scripted([right, right]), _chunk(tokens, argmax), depth=2)
    # roots with a greedy root token: rows 0, 1, 3, 4 (row 2 feeds t_3 = 9); depth 1 labels exist
    # for rows 0..4 -> 4 chains. Depth 2 needs the token fed at r+1 greedy: roots 0, 3 (and not 1: row 2)
    assert r["positions"] == 4 and r["acc"] == [1.0, 1.0]


# ------------------------------------------------------------------ training on a tiny model


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split
    from transformers import PreTrainedTokenizerFast

    chars = list(" \netaoinsrhldcumfpgwybvkxjqz_().,:=\"'[]#0123456789ABCDEFGHIJKLMNOPQRST")[:63] + ["?"]
    backend = Tokenizer(WordLevel({c: i for i, c in enumerate(chars)}, unk_token="?"))
    backend.pre_tokenizer = Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="?")


@pytest.fixture
def tiny(tmp_path_factory, monkeypatch):
    """A tiny Llama, a character tokenizer, and decograph's caches in a private directory."""
    from decograph.models.tiny import tiny_llama

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
    return tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2), _char_tokenizer()


def _train(tiny, **kw):
    from decograph.heads.train import train_head

    model, tok = tiny
    kw.setdefault("options", TINY)
    return train_head(model, tok, progress=False, threads=1, log=kw.pop("log", lambda m: None), **kw)


def test_training_lowers_the_loss_and_resolve_head_finds_the_head(tiny) -> None:
    from decograph.heads.store import model_fingerprint

    seen: list[dict] = []
    head = _train(tiny, steps=40, callback=lambda step, rec: seen.append(rec))
    first = np.mean([r["loss"] for r in seen[:5]])
    last = np.mean([r["loss"] for r in seen[-5:]])
    assert last < 0.9 * first, (first, last)       # soft targets: the floor is the target's own entropy
    meta = head.config.meta
    assert meta["steps"] == 40 and meta["tokens"] > 0
    assert set(meta["heldout"]) == {"chat", "text"} and len(meta["heldout"]["text"]["acc"]) == 3
    assert 0 < meta["coverage"]["heldout"] <= 1
    embed = tiny[0].get_input_embeddings().weight.detach().numpy()
    fp = model_fingerprint(tiny[0].config, embed)
    assert head.config.model == fp and cached_head_path(fp).is_file()
    found = resolve_head("default", fp)
    assert np.array_equal(found.vocab_ids, head.vocab_ids)
    np.testing.assert_array_equal(found.weights["fc.weight"], head.weights["fc.weight"].astype(np.float16))
    [curve_file] = (cached_head_path(fp).parent / "runs").glob("*/curve.jsonl")
    curve = curve_file.read_text().splitlines()
    assert len(curve) >= 5 and '"eval"' in curve[-1]


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny) -> None:
    whole = _train(tiny, steps=6)

    def stop_at_4(step, rec):
        if step == 4:                         # after the step-4 checkpoint (checkpoint_every=2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny, steps=6, fresh=True, callback=stop_at_4)
    steps: list[int] = []
    resumed = _train(tiny, steps=6, callback=lambda step, rec: steps.append(step))
    assert steps == [5, 6]
    for k, v in whole.weights.items():
        assert np.array_equal(resumed.weights[k], v), k
    assert resumed.config.meta["steps"] == 6
    # a finished run is not trained again; another budget is another run (its own checkpoint)
    again: list[int] = []
    said: list[str] = []
    _train(tiny, steps=6, callback=lambda step, rec: again.append(step), log=said.append)
    assert again == [] and any("at step 6 (finished)" in m for m in said)
    _train(tiny, steps=2, callback=lambda step, rec: again.append(step))
    assert again == [1, 2]
    _train(tiny, steps=6, callback=lambda step, rec: again.append(step))
    assert again == [1, 2]


def test_a_foreign_or_torn_checkpoint_is_not_trusted(tiny) -> None:
    from decograph.heads.store import model_fingerprint
    from decograph.heads.train import head_dir

    _train(tiny, steps=2)
    fp = model_fingerprint(tiny[0].config, tiny[0].get_input_embeddings().weight.detach().numpy())
    [ckpt] = (head_dir(fp) / "runs").glob("*/train.pt")
    ckpt.write_bytes(b"not a checkpoint")
    said: list[str] = []
    seen: list[int] = []
    _train(tiny, steps=2, callback=lambda step, rec: seen.append(step), log=said.append)
    assert seen == [1, 2] and any("ignoring the unreadable checkpoint" in m for m in said)


def test_a_minutes_budget_bounds_data_and_training(tiny) -> None:
    import time

    t = time.monotonic()
    head = _train(tiny, minutes=0.25, options=TrainOptions(vocab=48, seq_len=96, corpus_chars=50_000))
    meta = head.config.meta
    assert meta["steps"] > 0 and meta["data"]["chunks"]["text/train"] > 0
    assert meta["data"]["chunks"]["chat/heldout"] >= 2 and meta["data"]["chunks"]["text/heldout"] >= 2
    assert meta["train_minutes"] <= 0.25 and time.monotonic() - t < 60


# ------------------------------------------------------------------ the command


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be a positive whole number, got 0"),
    (["--minutes", "-1"], "--minutes must be a positive number, got -1"),
    (["--minutes", "nan"], "--minutes must be a positive number"),
    (["--vocab", "0"], "--vocab must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--data-chunks", "8"], "--data-chunks goes with --steps"),
    (["--steps", "3", "--data-chunks", "1"], "--data-chunks must be at least 2, got 1"),
    (["--out", "head.bin"], "a draft head is an .npz file"),
    (["--questions", "no-such-questions.jsonl"], "--questions no-such-questions.jsonl: no such file"),
    (["--self-questions", "-1"], "--self-questions must be at least 0, got -1"),
    (["--init", "no-such-head.npz"], "--init no-such-head.npz: no such head file"),
])
def test_cli_refuses_bad_arguments(argv, message, capsys) -> None:
    assert main(["train-draft", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_an_unwritable_or_directory_out(tmp_path: Path, capsys) -> None:
    assert main(["train-draft", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train-draft", "--out", str(blocker / "head.npz")]) == 2
    assert f"--out {blocker / 'head.npz'}: cannot write there" in capsys.readouterr().err
    assert main(["train-draft", "--minutes", "3", "--steps", "3"]) == 2       # argparse: not both
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_trains_a_tiny_model_and_says_how_to_use_the_head(tmp_path: Path, monkeypatch, capsys) -> None:
    from decograph.models.tiny import tiny_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = tiny_model_dir(tmp_path, vocab_size=64, hidden=32)
    out = tmp_path / "heads" / "tiny.npz"
    assert main(["train-draft", "--model", str(model), "--steps", "2", "--data-chunks", "4", "--vocab", "16",
                 "--out", str(out), "--quiet", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert f"{out} (" in text and "held-out text: top-1 acceptance by draft depth" in text
    assert f"decograph run --strategy eagle --model {model} --set head={out}" in text
    assert len(load_head(out).vocab_ids) == 16


# ------------------------------------------------------------------ the data


def test_the_data_reads_the_standard_library_and_never_the_benchmarks(tiny, monkeypatch) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert [p.resolve() for p in D.SOURCES()] == [stdlib]
    opened: list[Path] = []
    real_open = builtins.open

    def spy(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            opened.append(Path(file).resolve())
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    D._documents.cache_clear()
    _train(tiny, steps=1, options=TrainOptions(vocab=16, seq_len=96, data_chunks=4, corpus_chars=50_000))
    cache = Path(os.environ["XDG_CACHE_HOME"]).resolve()
    forbidden = [ROOT / "benchmarks", Path("/work/shared/data")]
    assert not [p for p in opened if any(p.is_relative_to(f) for f in forbidden)]
    outside = {p for p in opened if not (p.is_relative_to(stdlib) or p.is_relative_to(cache))}
    assert not [p for p in outside if p.suffix in (".py", ".txt", ".json", ".jsonl", ".md")
                and "site-packages" not in p.parts], outside
    assert any(p.is_relative_to(stdlib) and p.suffix == ".py" for p in opened)


def test_a_questions_file_adds_the_models_answers_but_never_a_benchmark_prompt(tiny, tmp_path: Path) -> None:

    from decograph.bench.prompts import load_prompts

    bench = load_prompts(None, 0)[0].text
    rows = [{"question_id": i, "category": "cat", "turns": [f"first {i}"]} for i in range(5)]     # skipped
    rows += [{"question_id": 10 + i, "category": "cat", "turns": [f"ask {i} about tea"]} for i in range(20)]
    rows.append({"question_id": 99, "category": "other", "turns": [bench]})
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qs = Q.question_requests(path, Q.benchmark_texts(path))
    assert qs == tuple(f"ask {i} about tea" for i in range(20))
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a question"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(rows[0]) + "\n{}\n")
        Q.question_requests(bad)
    head = _train(tiny, steps=2, options=TrainOptions(vocab=16, seq_len=96, data_chunks=6, corpus_chars=50_000),
                  questions=path)
    meta = head.config.meta
    assert meta["data"]["chunks"]["questions"] == {"chat/train": 2, "chat/heldout": 2, "text/train": 0,
                                                   "text/heldout": 0}
    assert set(meta["heldout"]) == {"chat", "text", "questions"}
    again = _train(tiny, steps=2, options=TrainOptions(vocab=16, seq_len=96, data_chunks=6, corpus_chars=50_000))
    assert "questions" not in again.config.meta["heldout"]       # another run, without them


def test_held_out_documents_give_no_training_requests() -> None:
    docs = D.documents()
    held = [d for d in docs if D.held_out(d.name)]
    assert 0 < len(held) < len(docs) / 10
    train_prompts = [r for _, r in itertools.islice(D.chat_prompts(docs, "train"), 60)]
    assert train_prompts and not set(train_prompts) & {r for _, r in D.chat_prompts(docs, "heldout")}
    assert all("benchmarks" not in d.name for d in docs)


def test_one_writer_at_a_time_extends_the_feature_store(tmp_path: Path) -> None:
    a, b = D.FeatureStore(tmp_path, {"m": 1}), D.FeatureStore(tmp_path, {"m": 1})
    chunk = _chunk([1, 2, 3], [2, 3, 4])
    with a.writer() as first:
        assert first
        with b.writer() as second:
            assert not second
        a.add("text/train", chunk, 7)
    with b.writer() as now:
        assert now and b.count("text/train") == 1 and b.cursor("text/train") == 7    # b sees a's shard
    assert len(D.FeatureStore(tmp_path, {"m": 2}).load("text/train", 1, 3, 2)) == 0  # another key: empty


def test_vocab_ranking_orders_by_how_often_the_target_predicts_a_token() -> None:
    ch = _chunk([0] * 6, [5, 5, 2, 5, 2, 9])
    ch.argmax[0, 5] = -1                      # padding is not counted
    assert D.vocab_ranking(ch)[:2].tolist() == [5, 2]
    prior = np.zeros(12)
    prior[[7, 2]] = [4, 1]                    # a corpus prior ranks the unseen 7 before the other unseen
    order = D.vocab_ranking(ch, prior).tolist()
    assert order[:3] == [5, 2, 7] and sorted(order) == list(range(12))


def test_train_head_refuses_bad_budgets(tiny) -> None:
    from decograph.errors import InputError

    with pytest.raises(InputError, match="--minutes must be a positive number"):
        _train(tiny, minutes=0)
    with pytest.raises(InputError, match="--steps must be a positive whole number"):
        _train(tiny, steps=-3)


# ------------------------------------------------------------------ requests the model writes itself


def _chat_tokenizer():
    tok = _char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    return tok


def test_self_questions_are_sampled_in_the_chat_template_deterministically_and_resume(tiny, tmp_path: Path,
                                                                                        monkeypatch) -> None:
    from decograph.heads import self_questions as SQ

    model, _ = tiny
    tok = _chat_tokenizer()
    head, end = SQ.pre_query(tok)
    assert tok.decode(head) == "[" and tok.decode([end]) == "]"
    monkeypatch.setattr(SQ, "_MIN_WORDS", 1)
    whole = SQ.self_questions(model, tok, 12, tmp_path / "a.jsonl", seed=3, batch=8)
    assert len(whole) == 12 and len({q.strip().casefold() for q in whole}) == 12
    assert all("]" not in q for q in whole)          # cut where the turn ends
    assert SQ.self_questions(model, tok, 12, tmp_path / "b.jsonl", seed=3, batch=8) == whole
    # interrupted after a few, then extended: the same requests
    first = SQ.self_questions(model, tok, 3, tmp_path / "c.jsonl", seed=3, batch=8)
    assert first == whole[:3]
    assert SQ.self_questions(model, tok, 12, tmp_path / "c.jsonl", seed=3, batch=8) == whole
    with open(tmp_path / "c.jsonl", "a") as f:                         # a write cut short
        f.write('{"question_id": "self-3-9-0", "turns": ["cut')
    assert SQ.self_questions(model, tok, 12, tmp_path / "c.jsonl", seed=3, batch=8) == whole
    # another seed writes other requests; a benchmark prompt is never kept
    assert SQ.self_questions(model, tok, 12, tmp_path / "d.jsonl", seed=4, batch=8) != whole
    skipped = SQ.self_questions(model, tok, 12, tmp_path / "e.jsonl", seed=3, batch=8, skip=frozenset(whole[:5]))
    assert not set(skipped) & set(whole[:5]) and set(whole[5:]) <= set(skipped)
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert Q.question_requests(tmp_path / "a.jsonl")[:12] == whole       # Spec-Bench's format: --questions reads it
    assert {r.get("category") for r in rows if "turns" in r} == {"self"}


def test_self_questions_need_a_chat_template(tiny, tmp_path: Path) -> None:
    from decograph.heads import self_questions as SQ

    with pytest.raises(InputError, match="--self-questions needs a chat model"):
        SQ.self_questions(tiny[0], _char_tokenizer(), 4, tmp_path / "q.jsonl")
    with pytest.raises(InputError, match="--self-questions must be at least 1"):
        SQ.self_questions(tiny[0], _chat_tokenizer(), 0, tmp_path / "q.jsonl")


def test_train_on_self_questions_and_start_from_an_earlier_head(tiny, tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from decograph.heads import self_questions as SQ

    monkeypatch.setattr(SQ, "_MIN_WORDS", 1)
    model, _ = tiny
    tiny_chat = (model, _chat_tokenizer())
    opts = TrainOptions(vocab=16, seq_len=128, data_chunks=6, corpus_chars=50_000)
    head = _train(tiny_chat, steps=2, options=opts, self_questions=20, out=tmp_path / "first.npz")
    meta = head.config.meta
    assert meta["data"]["chunks"]["questions"]["chat/heldout"] == 2       # every 10th of the 20
    assert meta["data"]["chunks"]["questions"]["chat/train"] == 2         # a third of --data-chunks
    assert set(meta["heldout"]) == {"chat", "text", "questions"}
    from decograph.heads.corpus import load_corpus
    corpus = load_corpus(tmp_path / "first.corpus.npz")               # the training answers, for draft.corpus
    assert corpus.sequences >= 2 and corpus.model == head.config.model and len(corpus) > 0
    # --init: the earlier head's weights (as stored) and vocabulary are the start (lr 0: nothing moves)
    still = _train(tiny_chat, steps=2, options=dataclasses.replace(opts, lr=0.0), init=tmp_path / "first.npz",
                   out=tmp_path / "second.npz")
    np.testing.assert_array_equal(still.vocab_ids, head.vocab_ids)
    for k, w in load_head(tmp_path / "first.npz").weights.items():
        np.testing.assert_array_equal(still.weights[k], w, err_msg=k)
    wider = _train(tiny_chat, steps=2, options=dataclasses.replace(opts, lr=0.0), init=tmp_path / "first.npz",
                   vocab=24, out=tmp_path / "wider.npz")            # a larger --vocab extends the subset
    assert len(wider.vocab_ids) == 24 and np.array_equal(wider.vocab_ids[:16], head.vocab_ids)
    assert len(set(wider.vocab_ids.tolist())) == 24
    for k, w in load_head(tmp_path / "first.npz").weights.items():
        np.testing.assert_array_equal(wider.weights[k], w, err_msg=k)
    # more requests extend the answers made so far (one store per request sequence), not start over
    from decograph.heads.train import head_dir

    [store] = head_dir(head.config.model).glob("questions-*-self0-128")
    manifest = json.loads((store / "manifest.json").read_text())
    shards = {s: list(v["shards"]) for s, v in manifest["streams"].items()}
    more = _train(tiny_chat, steps=2, options=opts, self_questions=30, out=tmp_path / "more.npz")
    assert more.config.meta["data"]["chunks"]["questions"]["chat/heldout"] == 3
    assert [p.name for p in head_dir(head.config.model).glob("questions-*")] == [store.name]
    after = json.loads((store / "manifest.json").read_text())["streams"]
    assert after["chat/heldout"]["shards"][: len(shards["chat/heldout"])] == shards["chat/heldout"]
    fresh = _train(tiny_chat, steps=2, options=dataclasses.replace(opts, lr=0.0), out=tmp_path / "third.npz")
    assert any(not np.array_equal(fresh.weights[k], w) for k, w in head.weights.items())
    with pytest.raises(InputError, match="--init nope.npz: no such head file"):
        _train(tiny_chat, steps=2, options=opts, init="nope.npz")


def test_a_run_whose_request_writing_was_cut_short_resumes_on_the_same_requests(tiny, monkeypatch) -> None:
    from decograph.heads import self_questions as SQ
    from decograph.heads import train as T

    monkeypatch.setattr(SQ, "_MIN_WORDS", 1)
    model, _ = tiny
    tiny_chat = (model, _chat_tokenizer())
    opts = TrainOptions(vocab=16, seq_len=128, data_chunks=6, corpus_chars=50_000, checkpoint_every=2)
    write = SQ.self_questions

    def cut_at_12(hf, tok, n, path, **kw):         # as a deadline would: fewer requests than asked
        return write(hf, tok, min(n, 12), path, **kw)

    monkeypatch.setattr(SQ, "self_questions", cut_at_12)
    whole = _train(tiny_chat, steps=6, options=opts, self_questions=30, fresh=True)

    def stop_at_4(step, rec):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_chat, steps=6, options=opts, self_questions=30, fresh=True, callback=stop_at_4)
    monkeypatch.setattr(SQ, "self_questions", write)    # the rerun has time to write all 30: it must not
    steps: list[int] = []
    resumed = _train(tiny_chat, steps=6, options=opts, self_questions=30, callback=lambda s, r: steps.append(s))
    assert steps == [5, 6]
    for k, v in whole.weights.items():
        assert np.array_equal(resumed.weights[k], v), k
    assert resumed.config.meta["data"]["chunks"] == whole.config.meta["data"]["chunks"]
    # the cache lost the requests the checkpoint names: start over (and say so), never train on others
    [cache] = T.head_dir(whole.config.model).glob("self-questions-s0.jsonl")
    cache.unlink()
    said: list[str] = []
    again: list[int] = []
    _train(tiny_chat, steps=6, options=opts, self_questions=30, log=said.append,
           callback=lambda s, r: again.append(s))
    assert again == [1, 2, 3, 4, 5, 6] and any("no longer in" in m for m in said)
