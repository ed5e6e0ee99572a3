"""Retrieval from a corpus of the model's own answers (``draft.corpus``, ``decograph.heads.corpus``):
the index's lookups against a brute-force search, the file format and its errors, finding the
model's corpus, the op's verifier and strategy-file errors; lossless against Hugging Face greedy
on a tiny model with a random corpus and with an all-accept one (batch 1 and > 1); a chain-only
backend verifies the draft expected to commit the most."""
from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest

import decograph
from decograph.errors import ModelError, StrategyFileError, UnsupportedError, VerifyError
from decograph.frontends.strategy_file import load_strategy_text
from decograph.heads.corpus import DEPTH, Corpus, build_corpus, load_corpus, save_corpus
from decograph.heads.store import cached_corpus_path, resolve_corpus
from decograph.models.tiny import tiny_llama
from decograph.runtime.source import Drafted, one_chain

pytestmark = pytest.mark.usefixtures("private_cache")

V, N_NEW = 64, 24
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7, 2, 7, 2, 8, 1], [11, 13, 17, 19, 23, 29, 31, 37, 41]]


def brute(seqs: list[list[int]], ctx: list[int], k: int, max_n: int = DEPTH, min_n: int = 2, min_support: int = 1):
    """The longest suffix of ``ctx`` found, then the most common next token (smallest id on a
    tie) among the occurrences that agreed so far, ``k`` times, while ``min_support`` agree."""
    for n in range(min(max_n, len(ctx)), min_n - 1, -1):
        occ = [(s, j + n) for s in seqs for j in range(len(s) - n + 1) if s[j:j + n] == ctx[-n:]]
        occ = [(s, p) for s, p in occ if p < len(s)]
        if not occ:
            continue
        out = []
        for _ in range(k):
            nxt = collections.Counter(s[p] for s, p in occ if p < len(s))
            if not nxt:
                break
            top = max(nxt.values())
            if top < min_support:
                break
            t = min(x for x, c in nxt.items() if c == top)
            out.append(t)
            occ = [(s, p + 1) for s, p in occ if p < len(s) and s[p] == t]
        if out:
            return out, n
    return [], 0


@pytest.mark.parametrize("vocab, alphabet, min_support", [(50, 12, 1), (70_000, 12, 1), (50, 40, 1), (50, 40, 2)])
def test_lookups_equal_a_brute_force_search(vocab, alphabet, min_support) -> None:
    """A small alphabet repeats a lot (many occurrences a suffix); a larger one leaves most
    suffixes with one occurrence (a faster path) or too little support."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, alphabet)
    seqs = [[int(ids[i]) for i in rng.integers(0, alphabet, rng.integers(1, 60))] for _ in range(40)]
    c = build_corpus(seqs, vocab)
    assert len(c) == sum(map(len, seqs)) and c.sequences == 40
    for trial in range(300):
        s = seqs[trial % len(seqs)]
        j = int(rng.integers(0, len(s) + 1))
        ctx = [int(ids[rng.integers(0, alphabet)])] + s[max(0, j - 10):j]
        if trial % 7 == 0:
            ctx.append(int(ids[rng.integers(0, alphabet)]))
        if trial % 11 == 0:
            ctx[-int(rng.integers(1, len(ctx) + 1))] = -1          # an id no corpus holds
        m = c.lookup(ctx, 6, min_support=min_support)
        assert (m.tokens, m.n) == brute(seqs, ctx, 6, min_support=min_support), ctx
        if m.tokens:
            assert len(m.support) == len(m.tokens) and all(0 < x <= 1 for x in m.share)
            assert all(x >= min_support for x in m.support)


def test_matches_never_cross_sequences_and_prefer_longer_suffixes() -> None:
    c = build_corpus([[1, 2, 3], [4, 5, 9, 9], [7, 4, 5, 6, 8]], 10)
    assert c.lookup([2, 3], 4).tokens == []                 # 3 ends its sequence: nothing follows
    assert c.lookup([0, 2], 4).tokens == []                 # no "0 2": the 1-token suffix is too short (min_n 2)
    assert c.lookup([0, 2], 4, min_n=1).tokens == [3]
    m = c.lookup([7, 4, 5], 4)
    assert (m.tokens, m.n) == ([6, 8], 3)                   # the 3-token match, not "4 5 -> 9 9"
    assert c.lookup([1, 4, 5], 4).tokens == [6, 8]          # a tie between 9 and 6: the smaller id
    assert c.lookup([4, 5], 1).tokens == [6]
    assert c.lookup([4, 5], 4, max_n=1, min_n=1).tokens == [6, 8]
    assert c.lookup([70, 4], 3, min_n=1).tokens == [5, 6, 8] and c.lookup([4, -1], 3, min_n=1).tokens == []


def test_files_round_trip_and_bad_files_name_themselves(tmp_path) -> None:
    seqs = [[1, 2, 3, 65530], [65530, 2, 3]]
    for vocab in (65531, 70_000):                           # uint16 and int32 storage
        c = build_corpus(seqs, vocab, "abc", "Tiny", {"note": 1})
        back = load_corpus(save_corpus(c, tmp_path / f"c{vocab}.npz"))
        assert np.array_equal(back.tokens, c.tokens) and back.vocab_size == vocab
        assert (back.model, back.model_name, back.meta["note"]) == ("abc", "Tiny", 1)
        assert back.lookup([2, 3], 2).tokens == [65530]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="junk.npz: not a decograph corpus file"):
        load_corpus(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ModelError, match="other.npz: not a decograph corpus file"):
        load_corpus(tmp_path / "other.npz")
    with pytest.raises(ModelError, match="missing.npz: no such corpus file"):
        load_corpus(tmp_path / "missing.npz")
    with pytest.raises(ModelError, match=r"token ids must lie in \[0, 10\)"):
        Corpus(np.array([1, 12]), 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c65531.npz", "c70000.npz", "junk.npz", "other.npz"]


def test_the_models_corpus_is_found_and_another_models_refused(tmp_path) -> None:
    save_corpus(build_corpus([[1, 2]], 10, "fp1", "Model one"), cached_corpus_path("fp1"))
    assert resolve_corpus("default", "fp1").lookup([1], 1, min_n=1).tokens == [2]
    save_corpus(build_corpus([[1, 2]], 10, "fp2", "Model two"), tmp_path / "two.npz")
    with pytest.raises(ModelError, match="two.npz: this corpus holds the answers of Model two"):
        resolve_corpus(str(tmp_path / "two.npz"), "fp1", "Model one")
    with pytest.raises(ModelError, match="no corpus of answers for Tiny .*decograph train-draft"):
        resolve_corpus("default", "fp3", "Tiny")


def test_the_default_model_ships_a_corpus() -> None:
    from decograph.heads.store import SHIPPED

    [path] = sorted((SHIPPED / "corpora").glob("*.npz"))
    c = load_corpus(path)
    assert c.model_name == "SmolLM2-135M-Instruct" and c.vocab_size == 49152 and len(c) > 100_000


# ------------------------------------------------------------------------------ the op


def corpus_program(**attrs) -> object:
    opts = "".join(f", {k}: {v}" for k, v in attrs.items())
    text = f"""strategy: corpus_test
description: "retrieval only"
steps:
  - prefill
  - iterate:
      body:
        - draft: {{source: corpus{opts}}}
        - forward: {{}}
        - verify: {{rule: greedy}}
        - commit: {{}}
"""
    return load_strategy_text(text, "corpus_test.yaml").program


@pytest.mark.parametrize("opts,msg", [({"max_n": 9}, "max_n"), ({"min_n": 5, "max_n": 3}, "min_n=5 exceeds"),
                                      ({"corpus": '" "'}, "names no corpus"), ({"k": 0}, "k")])
def test_bad_fields_name_the_field(opts, msg) -> None:
    with pytest.raises((VerifyError, StrategyFileError), match=msg):
        corpus_program(**opts)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V, hidden=32, seed=3, init_std=0.3)


@pytest.fixture(scope="module")
def refs(model, hf_greedy):
    return hf_greedy(model, PROMPTS, N_NEW)


def run(model, prompts, program, path, n=N_NEW):
    return decograph.generate(model, None, prompts, program, n, eos_token_id=[], overrides={"corpus": str(path)})


def check_equal(model, refs, program, path):
    for i, p in enumerate(PROMPTS[:2]):
        [r] = run(model, [p], program, path)
        assert r.new_token_ids == refs[i], ("batch 1", i)
    out = run(model, PROMPTS, program, path)
    assert [r.new_token_ids for r in out] == refs
    return out


def test_a_random_corpus_is_lossless(model, refs, tmp_path) -> None:
    rng = np.random.default_rng(1)
    path = save_corpus(build_corpus(rng.integers(0, 8, (30, 40)).tolist() + PROMPTS, V), tmp_path / "r.npz")
    program = corpus_program(corpus=f'"{path}"', k=4)
    out = check_equal(model, refs, program, path)
    assert sum(sum(r.stats.drafted_per_step) for r in out) > 0


def test_a_corpus_of_the_answers_themselves_is_accepted(model, refs, tmp_path) -> None:
    path = save_corpus(build_corpus([p + r for p, r in zip(PROMPTS, refs)], V), tmp_path / "all.npz")
    out = check_equal(model, refs, "anpd_corpus", path)
    for r in out:
        assert r.stats.forward_passes < N_NEW // 2               # long accepted runs


def test_eagle_anpd_without_a_corpus_warns_and_stays_lossless(model, refs, monkeypatch) -> None:
    from decograph.api.heads import model_corpus

    adapter = decograph.api.resolve_model(model)[0]
    adapter.__dict__.pop("_corpora", None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        c = model_corpus(adapter, "default")
    assert len(c) == 0 and any("no corpus of answers" in str(w.message) for w in seen)
    [r] = decograph.generate(model, None, [PROMPTS[0]], "anpd_corpus", N_NEW, eos_token_id=[])
    assert r.new_token_ids == refs[0]


def test_a_missing_corpus_file_is_an_error_naming_it(model, tmp_path) -> None:
    with pytest.raises(ModelError, match="nope.npz: no such corpus file"):
        run(model, [PROMPTS[0]], "anpd_corpus", tmp_path / "nope.npz")


def test_a_runtime_without_the_corpus_names_the_op(model) -> None:
    from decograph.runtime.drafts import make_source

    op = next(op for op in corpus_program().walk() if op.NAME == "draft.corpus")
    with pytest.raises(UnsupportedError, match=r"draft.corpus\(corpus=default\) has no corpus"):
        make_source(op, {}, {}, {})


def test_a_chain_only_backend_verifies_the_draft_expected_to_commit_most() -> None:
    class Src:
        pass

    a, b = Drafted(Src(), [[[1, 2, 3]], [[4]]], [0.5, 0.11]), Drafted(Src(), [[[5, 6]], [[7, 8]]], [1.2, 0.1])
    one_chain([a, b], 2)
    assert (a.chains, b.chains) == ([[], [[4]]], [[[5, 6]], []])
    c, d = Drafted(Src(), [[[1, 2]]]), Drafted(Src(), [[[3, 4]]])
    one_chain([c, d], 1)                                          # no values: the longest, the earliest on a tie
    assert (c.chains, d.chains) == ([[[1, 2]]], [[]])


def test_train_draft_puts_the_corpus_beside_the_head(tmp_path) -> None:
    from decograph.heads.train import corpus_path

    assert corpus_path(tmp_path / "h.npz", "fp") == tmp_path / "h.corpus.npz"
    assert corpus_path(None, "fp") == cached_corpus_path("fp")


# ------------------------------------------------------------------------------ the exported decoder


def test_an_exported_decoder_carries_its_corpus_and_equals_its_own_greedy(tmp_path, monkeypatch, ort_greedy) -> None:
    """``anpd_corpus`` exported int4 with a corpus holding the graph's own greedy answers: the
    corpus travels as a file of the decoder (listed in the manifest), every output equals the
    graph's one-token greedy decoding, alone and in a batch, and the corpus's drafts are
    accepted; a manifest without the corpus the program names is refused naming the step."""
    import json
    import shutil

    from decograph.backends.onnxruntime.manifest import ManifestError, load_manifest
    from decograph.backends.onnxruntime.session import ORTCausalLM
    from decograph.export import export_decoder
    from decograph.exported import ExportedDecoder
    from decograph.models.adapters import HFCausalLM
    from decograph.models.tiny import tiny_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = HFCausalLM.from_pretrained(str(tiny_model_dir(tmp_path / "m")))
    prompts = [model.tokenizer(t)["input_ids"] for t in ["t1 t5 t9 t5 t9", "t3 t4 t3", "t2 t8 t6 t2"]]
    empty = save_corpus(build_corpus([], model.vocab_size), tmp_path / "empty.npz")
    first = export_decoder("anpd_corpus", tmp_path / "d1", model=model, quant="int4", chat=False,
                           overrides={"corpus": str(empty)}, progress=lambda m: None)
    graph = ORTCausalLM(first / "model.onnx")
    want = [ort_greedy(graph, p, 20) for p in prompts]
    path = save_corpus(build_corpus([p + w for p, w in zip(prompts, want)], model.vocab_size), tmp_path / "c.npz")
    out = export_decoder("anpd_corpus", tmp_path / "d2", model=model, quant="int4", chat=False,
                         overrides={"corpus": str(path)}, progress=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpora"] == {str(path): "corpus.0.npz"} and "corpus.0.npz" in manifest["files"]
    dec = ExportedDecoder(out)
    accepted = 0
    for p, w in zip(prompts, want):
        toks, st = dec.generate(p, 20)
        assert toks == w == dec.generate(p, 20, draft=False)[0]
        accepted += st.accepted
    assert [t for t, _ in dec.generate_batch(prompts, 20)] == want
    if dec.exact:                       # where this machine's kernels keep drafting lossless
        assert accepted > 10

    def broken(edit, match: str) -> None:
        d = tmp_path / "bad"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(out, d)
        m = json.loads(json.dumps(manifest))
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ManifestError, match=match):
            load_manifest(d)

    broken(lambda m: m.pop("corpora"), r"strategy.json: step `draft.corpus\(corpus=.*c.npz\)` has no corpus file")
    broken(lambda m: m["files"].pop("corpus.0.npz"), r"names 'corpus.0.npz', which is not listed in 'files'")
    broken(lambda m: m.update(corpora=["corpus.0.npz"]), r"field 'corpora'")


def test_an_adapter_without_a_hugging_face_model_takes_a_file_or_drafts_nothing(tmp_path) -> None:
    from decograph.api.heads import model_corpus

    class Oracle:
        vocab_size = 10

    with pytest.warns(RuntimeWarning, match="no corpus of answers for Oracle"):
        assert len(model_corpus(Oracle(), "default")) == 0
    path = save_corpus(build_corpus([[1, 2, 3]], 10), tmp_path / "o.npz")
    assert model_corpus(Oracle(), str(path)).lookup([1, 2], 1).tokens == [3]


def test_a_decoder_without_the_corpus_refuses_a_program_that_needs_it(tmp_path, monkeypatch) -> None:
    from decograph.export import export_decoder
    from decograph.exported import ExportedDecoder
    from decograph.frontends.strategies import load_strategy
    from decograph.models.adapters import HFCausalLM
    from decograph.models.tiny import tiny_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = HFCausalLM.from_pretrained(str(tiny_model_dir(tmp_path / "m")))
    dec = ExportedDecoder(export_decoder("anpd", tmp_path / "d", model=model, chat=False, progress=lambda m: None))
    with pytest.raises(UnsupportedError, match=r"step `draft.corpus\(corpus=default\)` needs a corpus this decoder "
                                               r"does not carry \(it has none\): export a strategy with that step"):
        dec.with_program(load_strategy("anpd_corpus").program)
