"""``train-mdm``: corpus split, tokenizer, the LLaDA objective, checkpoint reuse and atomicity,
and the CLI. Trains on a small synthetic "standard library" so it takes seconds."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

import decograph
from decograph.apps import distill_mdm as D
from decograph.apps import train_mdm as T
from decograph.cli import main
from decograph.errors import InputError, ModelError
from decograph.models.mdm import MDMConfig, MDMTransformer

TINY = T.TrainConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=48, batch_size=8,
                     lr=3e-3, minutes=0, max_steps=40, distill_minutes=0)
DISTILLED = T.TrainConfig(**{**TINY.__dict__, "distill_rows": 48, "distill_steps": 60, "distill_lr": 3e-3})


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    rng = random.Random(0)
    for i in range(24):
        lines = [f"def f{i}_{j}(x):\n    return x + {rng.randrange(10)}\n" for j in range(30)]
        (root / f"mod{i}.py").write_text("".join(lines))
    (root / "test").mkdir()
    (root / "test" / "test_skip.py").write_text("SKIPPED = True\n" * 50)
    return root


def test_corpus_skips_tests_and_splits_by_path(stdlib) -> None:
    files = T.stdlib_files(stdlib)
    assert [rel for rel, _ in files] == sorted(rel for rel, _ in files)
    assert not any(rel.startswith("test/") for rel, _ in files) and len(files) == 24
    held = [rel for rel, _ in files if T.held_out(rel)]
    assert held == [rel for rel, _ in T.stdlib_files(stdlib) if T.held_out(rel)]   # deterministic
    real = T.stdlib_files()
    share = sum(T.held_out(rel) for rel, _ in real) / len(real)
    assert 0.02 < share < 0.10                                                       # ~1 in 20
    with pytest.raises(InputError, match="not found"):
        T.stdlib_files(stdlib / "nope")


def test_tokenizer_round_trips_and_has_special_tokens(stdlib) -> None:
    texts = [t for _, t in T.stdlib_files(stdlib)]
    tok = T.train_tokenizer(texts, 320)
    assert tok.decode(tok(texts[0])["input_ids"]) == texts[0]
    assert {tok.eos_token, tok.mask_token, tok.pad_token} == {T.EOS, T.MASK, T.PAD}
    assert len(tok) <= 320
    ws = T.train_tokenizer(texts, 300, merges="whitespace")
    assert ws.decode(ws(texts[0])["input_ids"]) == texts[0]
    pieces = [ws.decode([i]) for i in range(len(ws)) if i not in ws.all_special_ids]
    runs = [p for p in pieces if len(p) > 1]
    assert runs and all(p.isspace() for p in runs)                 # merges of whitespace only
    assert "\n    " in pieces and " " in pieces
    assert len(ws(texts[0])["input_ids"]) < len(texts[0].encode())
    with pytest.raises(InputError, match="merges"):
        T.train_tokenizer(texts, 300, merges="words")


def test_masked_batch_follows_the_llada_objective() -> None:
    data = [torch.arange(10, 200, dtype=torch.int32) % 50 + 10 for _ in range(3)] + [torch.tensor([11, 12], dtype=torch.int32)]
    cfg = T.TrainConfig(seq_len=32, batch_size=64, block_rows=0.0)
    inp, tgt, w = T._masked_batch(data, cfg, eos=0, mask=1, rng=random.Random(0), gen=torch.Generator().manual_seed(0))
    masked = inp == 1
    assert torch.equal(masked, w > 0) and (tgt != 1).all()
    assert torch.equal(inp[~masked], tgt[~masked])
    assert (w[masked] >= 1).all()                        # 1/t with t in (0, 1]
    assert (tgt == 0).any()                              # a short file ends: EOS padding


def test_block_rows_are_the_canvas_of_semi_autoregressive_infilling() -> None:
    """A clean prefix, the block masked with ratio t (its masked tokens the loss, 1/t), the
    later positions all masked, then a clean suffix or none."""
    data = [torch.arange(10, 300, dtype=torch.int32) % 50 + 10 for _ in range(3)]
    cfg = T.TrainConfig(seq_len=96, batch_size=64, block_rows=1.0, blocks=(16, 32))
    inp, tgt, w = T._masked_batch(data, cfg, eos=0, mask=1, rng=random.Random(0), gen=torch.Generator().manual_seed(0))
    masked = inp == 1
    suffixes, sizes = 0, set()
    for m, wt in zip(masked.tolist(), w.tolist()):
        assert all(x >= 1 for x in wt if x > 0) and all(m[i] for i, x in enumerate(wt) if x > 0)
        end = max(i for i, x in enumerate(m) if x) + 1
        fits = [(s, b) for s in range(1, cfg.seq_len) for b in cfg.blocks
                if not any(m[:s]) and all(m[s + b:end]) and not any(wt[:s]) and not any(wt[s + b:])
                and all(wt[i] > 0 for i in range(s, min(s + b, end)) if m[i])]
        assert fits, (m, wt)
        sizes.add(fits[-1][1])
        suffixes += end < cfg.seq_len
    assert sizes == {16, 32} and 10 < suffixes < 54


def test_training_reduces_the_loss_and_reuses_the_checkpoint(stdlib, tmp_path, capsys) -> None:
    logs: list[str] = []
    d = T.train_mdm(TINY, tmp_path, progress=False, stdlib_root=stdlib, log=logs.append)
    info = json.loads((d / "train.json").read_text())
    assert info["steps"] == 40 and info["curve"][-1]["loss"] < info["curve"][0]["loss"]
    model, tok = T.load_trained_mdm(TINY, tmp_path)
    assert model.config.mask_token_id == tok.mask_token_id and model.config.eos_token_id == tok.eos_token_id
    [r] = decograph.generate(model, tok, ["def f1_0(x):\n"], strategy="fast_dllm", max_new_tokens=16)
    assert len(r.new_token_ids) <= 16 and tok.mask_token_id not in r.new_token_ids
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert T.train_mdm(TINY, tmp_path, progress=False, stdlib_root=stdlib, log=logs.append) == d
    assert "reusing" in logs[-1] and (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert main(["run", "--model", str(d), "--strategy", "lud", "--prompt", "def f1_0(x):", "--max-new-tokens", "12",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["strategy"] == "lud" and 1 <= record["new_tokens"] <= 12 and record["chat"] is False
    samples = T.held_out_samples(tok, 8, 8, 5, stdlib_root=stdlib)
    assert len(samples) == 5 and all(len(p) == 8 and len(c) == 8 for p, c in samples)


def test_failed_save_leaves_nothing_half_written(stdlib, tmp_path, monkeypatch) -> None:
    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(T, "save_mdm", fail)
    cfg = T.TrainConfig(**{**TINY.__dict__, "max_steps": 2})
    with pytest.raises(OSError, match="disk full"):
        T.train_mdm(cfg, tmp_path, progress=False, stdlib_root=stdlib, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ModelError, match="train-mdm"):
        T.load_trained_mdm(cfg, tmp_path)


def test_cli_train_mdm_errors_and_missing_model(tmp_path, monkeypatch, capsys) -> None:
    assert main(["train-mdm", "--minutes", "0"]) == 2
    assert "--max-steps" in capsys.readouterr().err
    assert main(["train-mdm", "--distill-minutes", "-1", "--cache-dir", str(tmp_path)]) == 2
    assert "distill_minutes must be >= 0" in capsys.readouterr().err and not any(tmp_path.iterdir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["run", "--model", "mdm", "--strategy", "fast_dllm", "--prompt", "x"]) == 2
    assert "decograph train-mdm" in capsys.readouterr().err


def test_mask_ratios_are_stratified_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    orders = set()
    for batch in (1, 7, 16, 16, 16):
        t = T.draw_t(batch, gen)
        assert t.shape == (batch,) and (t >= 1e-3).all() and (t <= 1).all()
        assert sorted((t * batch).floor().long().tolist()) == list(range(batch))    # one per slice
        orders.add(tuple(t.argsort().tolist()))
    assert len(orders) == 5                                                         # rows get shuffled slices


def test_compile_falls_back_to_eager_or_raises(monkeypatch) -> None:
    model = MDMTransformer(MDMConfig(vocab_size=16, mask_token_id=1, eos_token_id=0, d_model=8, n_layers=1, n_heads=2,
                                     d_ff=16))
    ids, pos = torch.randint(0, 16, (2, 5)), torch.arange(5).expand(2, -1)
    want = model(ids, pos)[0]

    def broken(m):
        def run(*a):
            raise RuntimeError("no C++ compiler\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    logs: list[str] = []
    fwd = T._train_forward(model, T.TrainConfig(compile="auto"), logs.append)
    assert torch.equal(fwd(ids, pos), want) and torch.equal(fwd(ids, pos), want)
    assert len(logs) == 1 and "torch.compile failed (RuntimeError: no C++ compiler)" in logs[0]
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        T._train_forward(model, T.TrainConfig(compile="on"), logs.append)(ids, pos)
    assert torch.equal(T._train_forward(model, T.TrainConfig(compile="off"), logs.append)(ids, pos), want)
    with pytest.raises(InputError, match="compile must be auto, on or off"):
        T._train_forward(model, T.TrainConfig(compile="sometimes"), logs.append)


def test_distill_canvas_masks_one_block_and_the_span_after_it() -> None:
    """The canvas semi-autoregressive infilling sees: prompt, earlier blocks and suffix clean,
    one block masked (its masked positions the loss, at least one), the span after it masked."""
    assert D.distill_geometry(448) == (128, 64, 32, 32)
    plen, span, slen, block = D.distill_geometry(48)
    x = torch.arange(plen + span + slen).repeat(64, 1) + 10
    inp, loss_at = D._distill_canvas(x, plen, span, block, mask=1, rng=random.Random(0),
                                     gen=torch.Generator().manual_seed(0))
    masked = inp == 1
    assert torch.equal(inp[~masked], x[~masked]) and not (loss_at & ~masked).any()
    seen = set()
    for m, at in zip(masked.tolist(), loss_at.tolist()):
        k = (at.index(True) - plen) // block
        lo, hi = plen + k * block, plen + (k + 1) * block
        seen.add(k)
        assert not any(m[:lo]) and all(m[hi:plen + span]) and not any(m[plen + span:])
        assert at[lo:hi] == m[lo:hi] and not any(at[:lo] + at[hi:])
    assert seen == set(range(span // block))


def test_certainty_forcing_loss_adds_the_entropy_of_right_predictions_only() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    target = logits.argmax(-1)
    target[0, 1] = (target[0, 1] + 1) % 7                       # one wrong prediction
    at = torch.zeros(2, 5, dtype=torch.bool)
    at[0, :3] = True
    at[1, 4] = True
    ce = F.cross_entropy(logits[at], target[at], reduction="none")
    p = logits[at].softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    right = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.allclose(D._certainty_forcing_loss(logits, target, at, 0.0), ce.mean())
    assert torch.allclose(D._certainty_forcing_loss(logits, target, at, 0.5), (ce + 0.5 * entropy * right).mean())
    own = torch.tensor([[True], [False]]) & at                   # row 1 is the text itself: no entropy term
    assert torch.allclose(D._certainty_forcing_loss(logits, target, at, 0.5, own),
                          (ce + 0.5 * entropy * right * torch.tensor([1.0, 1.0, 1.0, 0.0])).mean())


def _confidence_on_own_fills(model, tok, stdlib) -> float:
    """The model's mean confidence (max probability) at each masked position of a span whose
    earlier positions hold its own one-token-per-step fill (the canvas of each step)."""
    plen, span, slen, block = D.distill_geometry(TINY.seq_len)
    confs = []
    for prompt, cont in T.held_out_samples(tok, plen, span + slen, 6, stdlib_root=stdlib):
        [r] = decograph.generate(model, tok, [prompt], "fast_dllm", span, suffixes=[cont[span:]], passes="none",
                                 eos_token_id=[], overrides={"block": block, "threshold": 1.0})
        fill = list(r.new_token_ids)
        for i in range(span):
            ids = torch.tensor([prompt + fill[:i] + [model.config.mask_token_id] * (span - i) + cont[span:]])
            with torch.no_grad():
                p = model(ids, torch.arange(ids.shape[1])[None])[0][0, plen + i:plen + span].softmax(-1)
            confs.append(float(p.max(-1).values.mean()))
    return sum(confs) / len(confs)


def test_self_distillation_makes_the_model_sure_of_its_own_fills(stdlib, tmp_path) -> None:
    """The stage runs after the LLaDA objective (same fingerprint family, recorded in
    train.json) and raises the model's confidence in what one-at-a-time decoding would write."""
    assert TINY.fingerprint() != DISTILLED.fingerprint()
    assert DISTILLED.fingerprint() == T.TrainConfig(**{**DISTILLED.__dict__, "distill_rows": 8, "distill_steps": 3}).fingerprint()
    plain = T.train_mdm(TINY, tmp_path, progress=False, stdlib_root=stdlib, log=lambda m: None)
    d = T.train_mdm(DISTILLED, tmp_path, progress=False, stdlib_root=stdlib, log=lambda m: None)
    info = json.loads((d / "train.json").read_text())
    assert info["pretrain"]["steps"] == 40 and info["distill"]["rows"] == 48 and info["distill"]["steps"] == 60
    assert info["distill"]["curve"][-1]["loss"] < info["distill"]["curve"][0]["loss"]
    before = _confidence_on_own_fills(*T.load_trained_mdm(TINY, tmp_path), stdlib)
    after = _confidence_on_own_fills(*T.load_trained_mdm(DISTILLED, tmp_path), stdlib)
    assert plain != d and after > before + 0.1, (before, after)
    for bad in ({"distill_minutes": -1}, {"distill_mix": 1.5}):
        with pytest.raises(InputError, match="distill"):
            T.train_mdm(T.TrainConfig(**{**DISTILLED.__dict__, **bad}), tmp_path, progress=False,
                        stdlib_root=stdlib, log=lambda m: None)
