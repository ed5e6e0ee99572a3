"""Draft heads on ONNX Runtime: the step graphs' ``hidden`` output (Llama and Gemma 3) against
transformers' final hidden states through the engine (prefill tails, pending tokens, tree
nodes, rows of different lengths), the graphs without it unchanged and still exact, the head
as its own ONNX graph (``graph_head``) against the numpy reference, and the exported decoder
with a head (torch-free, its own greedy, batch 1 and 4, EOS and budgets)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from decograph.backends.onnxruntime.engine import OrtBatch
from decograph.backends.onnxruntime.export import export_step, graph_version, quantize_step
from decograph.backends.onnxruntime.kv import StepSession, causal_mask
from decograph.backends.onnxruntime.runner import width_invariant
from decograph.errors import UnsupportedError
from decograph.models.tiny import tiny_causal_lm, tiny_llama
from decograph.runtime.protocol import StepPlan
from decograph.runtime.rows import DraftTree, Row

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("private_cache", "untimed_heads")

PROMPTS = [[3, 9, 27, 17, 51, 25, 11, 33, 35, 41, 59, 49, 19], [9, 8, 7, 6, 5, 9, 8, 7, 6], [17, 2]]


def _model(family: str):
    return tiny_llama(seed=1) if family == "llama" else tiny_causal_lm("gemma3", seed=1)


def _hidden_ref(model, ids: list[int]) -> np.ndarray:
    """transformers' final hidden states (after the final norm) of every position of ``ids``."""
    with torch.no_grad():
        return model.model(torch.tensor([ids])).last_hidden_state[0].numpy()


def _plan(trees: list[DraftTree], hidden: bool = True) -> StepPlan:
    return StepPlan("tree", "sequence", trees, [[] for _ in trees], [[] for _ in trees], 0, hidden)


def _tree(chains: list[list[int]]) -> DraftTree:
    t = DraftTree()
    for c in chains:
        t.add_chain(c)
    return t


def _path_tokens(tree: DraftTree, node: int) -> list[int]:
    out = []
    while node >= 0:
        out.insert(0, tree.tokens[node])
        node = tree.parent[node]
    return out


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def hidden_graph(family, tmp_path_factory):
    model = _model(family)
    return model, export_step(model, tmp_path_factory.mktemp(f"h-{family}") / "model.onnx", hidden=True)


def test_the_hidden_rows_equal_transformers(hidden_graph) -> None:
    """Prefill tails, each row's pending tokens and tree nodes (its path's last position), over
    two steps of a batch of rows of different lengths (one a one-token prompt)."""
    model, path = hidden_graph
    step = StepSession(path, 1)
    assert step.hidden_size == model.config.hidden_size
    rows = [Row(i, list(p), len(p), 32) for i, p in enumerate(PROMPTS)]
    batch = OrtBatch(step, rows)
    batch.hidden_tail = 5
    batch.prefill()
    for r in rows:
        want = _hidden_ref(model, r.tokens)[: len(r.tokens) - 1][-5:]
        got = batch.prefill_hidden(r)
        assert got.shape == (min(5, len(r.tokens) - 1), model.config.hidden_size)
        assert np.abs(got - want).max() < 1e-4
    for trees in ([_tree([[5, 6, 7], [5, 8], [9]]), _tree([[1, 2]]), _tree([])],
                  [_tree([[4], [6, 2, 2]]), _tree([]), _tree([[3, 3, 3, 3]])]):
        out = batch.forward(_plan(trees))
        paths = []
        for b, (r, tree) in enumerate(zip(rows, trees)):
            got = out.hidden(b)
            pending = r.pending
            assert got.shape == (len(pending) + len(tree), model.config.hidden_size)
            ref = _hidden_ref(model, r.tokens)
            assert np.abs(got[: len(pending)] - ref[r.cached:]).max() < 1e-4
            for i in range(len(tree)):
                want = _hidden_ref(model, r.tokens + _path_tokens(tree, i))[-1]
                assert np.abs(got[len(pending) + i] - want).max() < 1e-4, (b, i)
            paths.append([0, 1] if len(tree) >= 2 and tree.parent[1] == 0 else [])
        batch.commit(out, paths, keep_nodes=True)
        for b, (r, tree, path) in enumerate(zip(rows, trees, paths)):     # as the runtime commits
            bonus = out.argmax(b)[len(path)]
            r.cached += len(r.pending) + len(path)
            r.tokens += [tree.tokens[i] for i in path] + [bonus]


def test_a_graph_without_hidden_states_refuses_a_plan_that_asks(tmp_path) -> None:
    step = StepSession(export_step(tiny_llama(seed=1), tmp_path / "m.onnx"), 1)
    assert step.hidden_size == 0
    batch = OrtBatch(step, [Row(0, [1, 2, 3], 3, 8)])
    batch.prefill()
    with pytest.raises(UnsupportedError, match="without hidden states"):
        batch.forward(_plan([_tree([[4]])]))
    with pytest.raises(UnsupportedError, match="without hidden states"):
        batch.prefill_hidden(batch.rows[0])


def test_the_hidden_output_changes_nothing_else(family, hidden_graph, tmp_path) -> None:
    """The graph with ``hidden`` gives the logits of the graph without it bit for bit (fp32 and
    int4), its own version string, and its k-token steps stay k one-token steps (fp32; int4
    as the graph without it on this machine's kernels)."""
    model, path = hidden_graph
    plain = export_step(model, tmp_path / "plain.onnx")
    assert graph_version(model, hidden=True) == graph_version(model) + "+hidden"
    for bits in (0, 4):
        a = quantize_step(plain, tmp_path / f"p{bits}.onnx", bits) if bits else plain
        b = quantize_step(path, tmp_path / f"h{bits}.onnx", bits) if bits else path
        sa, sb = StepSession(a, 1), StepSession(b, 1)
        ka, kb = sa.new_kv(1, 40), sb.new_kv(1, 40)
        ids = PROMPTS[0]
        for lo, hi in ((0, 9), (9, 10), (10, 13)):
            x, p, m = np.array([ids[lo:hi]]), np.arange(lo, hi)[None], causal_mask(hi - lo, lo)
            assert np.array_equal(sa.run(ka, x, p, m), sb.run(kb, x, p, m))
        assert width_invariant(sb, 9, context=23) == width_invariant(sa, 9, context=23)
        if not bits:
            assert width_invariant(sb, 9, context=23)


# -- the head as its own ONNX graph ------------------------------------------------------------

def random_head(hidden: int = 32, vocab: int = 64, subset: int = 40, seed: int = 0, embed_scale: float = 1.5,
                model: str = "", half: bool = False):
    """A head of the spec's shapes with random weights (GQA: 4 query heads over 2 K/V heads),
    the target's embedding and LM head it binds to; ``half``: an embedding float16 holds exactly."""
    from decograph.heads.spec import WEIGHT_SHAPES, HeadConfig, HeadWeights

    rng = np.random.default_rng(seed)
    c = HeadConfig(hidden=hidden, heads=4, kv_heads=2, head_dim=hidden // 4, intermediate=2 * hidden,
                   embed_scale=embed_scale, model=model, model_name="a tiny model")
    w = {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in WEIGHT_SHAPES(c).items()}
    for k in ("ln1.weight", "ln2.weight", "norm.weight"):
        w[k] += 1.0
    embed = rng.standard_normal((vocab, hidden)).astype(np.float32)
    if half:
        embed = embed.astype(np.float16).astype(np.float32)
    lm = rng.standard_normal((vocab, hidden)).astype(np.float32)
    return HeadWeights(c, w, rng.permutation(vocab)[:subset].astype(np.int64)), embed, lm


@pytest.mark.parametrize("half", [False, True])
def test_the_ort_head_equals_the_numpy_reference(half, tmp_path) -> None:
    """Incremental calls (a causal first call, a tree-masked one over its K/V, a causal one
    after it) and the logits of the step's features, of rows sliced from them, of other ones."""
    import onnx

    from decograph.backends.onnxruntime.graph_head import OrtHead, export_head

    head, embed, lm = random_head(half=half)
    ref = head.bind(embed, lm)
    path = export_head(ref, tmp_path / "head.onnx")
    table = next(t for t in onnx.load(str(path)).graph.initializer if t.name == "embed.weight")
    assert table.data_type == (onnx.TensorProto.FLOAT16 if half else onnx.TensorProto.FLOAT)
    ort_head = OrtHead(path, threads=1)
    assert ort_head.config == head.config and np.array_equal(ort_head.vocab_ids, head.vocab_ids)
    runs = []
    session = ort_head.session

    class Counting:                 # one session run per step; logits of its features take none
        def run(self, *a, **k):
            runs.append(1)
            return session.run(*a, **k)

    ort_head.session = Counting()
    rng = np.random.default_rng(1)
    c = head.config
    pk = pv = np.zeros((0, c.kv_heads, c.head_dim), np.float32)
    tree = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
    for q, mask, pos in ((5, None, np.arange(300, 305)), (3, tree, np.array([305, 306, 306])),
                         (2, None, np.array([305, 306]))):
        feats = rng.standard_normal((q, c.hidden)).astype(np.float32)
        toks = rng.integers(0, len(embed), q)
        full = None if mask is None else np.concatenate([np.ones((q, len(pk)), bool), mask], 1)
        want, got = ref.step(feats, toks, pos, pk, pv, full), ort_head.step(feats, toks, pos, pk, pv, full)
        for a, b in zip(want, got):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
        out = got[0]
        runs.clear()
        for sel in (slice(None), slice(1, None), -1, 0):
            assert np.abs(ort_head.logits(out[sel]) - ref.logits(want[0][sel])).max() < 1e-4
        assert np.abs(ort_head.logits(out[-1][None]) - ref.logits(want[0][-1:])).max() < 1e-4
        assert not runs
        assert np.abs(ort_head.logits(out[[1, 0]]) - ref.logits(want[0][[1, 0]])).max() < 1e-4    # copies
        assert np.abs(ort_head.logits(feats) - ref.logits(feats)).max() < 1e-4
        assert len(runs) == 2
        if mask is None:
            pk, pv = np.concatenate([pk, got[1]]), np.concatenate([pv, got[2]])


def test_a_feed_computes_the_logits_of_its_last_rows_only(tmp_path) -> None:
    """``step(logits_rows=n)`` projects only the last n rows onto the vocabulary: their logits
    come with the run, an earlier row's take one more run, and every value is the reference's."""
    from decograph.backends.onnxruntime.graph_head import OrtHead, export_head

    head, embed, lm = random_head()
    ref = head.bind(embed, lm)
    ort_head = OrtHead(export_head(ref, tmp_path / "head.onnx"), threads=1)
    runs, session = [], ort_head.session

    class Counting:
        def run(self, names, feeds):
            runs.append(int(feeds["logits_keep"][0]))
            return session.run(names, feeds)

    ort_head.session = Counting()
    rng = np.random.default_rng(2)
    c, q = head.config, 6
    feats = rng.standard_normal((q, c.hidden)).astype(np.float32)
    toks, pos = rng.integers(0, len(embed), q), np.arange(40, 40 + q)
    pk = rng.standard_normal((7, c.kv_heads, c.head_dim)).astype(np.float32)
    pv = rng.standard_normal((7, c.kv_heads, c.head_dim)).astype(np.float32)
    want = ref.step(feats, toks, pos, pk, pv)
    for rows, kept in ((1, 1), (2, 2), (0, q), (q + 3, q)):
        runs.clear()
        out = ort_head.step(feats, toks, pos, pk, pv, logits_rows=rows)[0]
        assert np.abs(out - want[0]).max() < 1e-4 and runs == [kept]
        assert np.abs(ort_head.logits(out[-1]) - ref.logits(want[0][-1])).max() < 1e-4
        assert np.abs(ort_head.logits(out[q - kept:]) - ref.logits(want[0][q - kept:])).max() < 1e-4
        assert runs == [kept]                   # the kept rows' logits came with the step
        assert np.abs(ort_head.logits(out) - ref.logits(want[0])).max() < 1e-4
        assert np.abs(ort_head.logits(out[0]) - ref.logits(want[0][0])).max() < 1e-4
        assert len(runs) == (1 if kept == q else 3)


def test_a_head_graph_is_checked_on_load(hidden_graph, tmp_path) -> None:
    from decograph.backends.onnxruntime.graph_head import OrtHead, export_head
    from decograph.errors import ModelError

    import json

    import onnx

    with pytest.raises(ModelError, match="not a decograph draft-head graph"):
        OrtHead(hidden_graph[1])
    head, embed, lm = random_head()
    proto = onnx.load(str(export_head(head.bind(embed, lm), tmp_path / "h.onnx")))
    meta = json.loads(proto.metadata_props[0].value)
    for bad, match in (({**meta, "version": "head-0"}, "graph version 'head-0'"),
                       ({**meta, "config": {"hidden": 32}}, "metadata cannot be read")):
        proto.metadata_props[0].value = json.dumps(bad)
        onnx.save(proto, str(tmp_path / "bad.onnx"))
        with pytest.raises(ModelError, match=match):
            OrtHead(tmp_path / "bad.onnx")


# -- exported decoders with heads ----------------------------------------------------------------

TEXTS = ["t1 t5 t9 t5 t9 t5 t9 t5", "t3 t4 t3 t4 t3", "t7", "t2 t8 t6 t2 t8 t6 t2 t8 t6 t2"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from decograph.models.tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("m"))


def tiny_head(adapter, seed: int = 0):
    """A random head for ``adapter``'s model (its fingerprint), of the model's sizes (the input
    embedding's scale: Gemma's sqrt(H))."""
    from decograph.heads.store import model_fingerprint

    m = adapter.model
    fp = model_fingerprint(m.config, m.get_input_embeddings().weight.detach().numpy())
    scale = float(getattr(m.get_input_embeddings(), "embed_scale", 1.0))
    head, _, _ = random_head(hidden=m.config.hidden_size, vocab=m.config.vocab_size, seed=seed, embed_scale=scale,
                             model=fp)
    return head


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory):
    from decograph.models.tiny import word_tokenizer

    out = tmp_path_factory.mktemp("g3") / "tiny-gemma3"
    tiny_causal_lm("gemma3", seed=1).save_pretrained(out)
    word_tokenizer(64).save_pretrained(out)
    return out


_DECODE = """
from decograph.exported import ExportedDecoder
dec = ExportedDecoder(job["dir"], threads=1)
out["exact"] = dec.exact()
out["single"] = []
for p in job["prompts"]:
    for n in (0, 1, 9, 24):
        got, st = dec.generate(p, n)
        out["single"].append([p, n, got, dec.generate(p, n, draft=False)[0], st.drafted, st.accepted, st.forwards])
for draft in (True, False):
    out[f"batch-{draft}"] = [r[0] for r in dec.generate_batch(job["prompts"], 24, draft=draft)]
dec.eos = {job["eos"]}
rows = dec.generate_batch(job["prompts"], 24)
out["eos"] = [[r[0], r[1].finish_reason] for r in rows]
out["eos-1"] = [list(dec.generate(p, 24)[0]) for p in job["prompts"]]
"""


@pytest.mark.parametrize("strategy,quant,where,head_quant", [
    ("eagle", "none", "default", None), ("eagle_anpd", "int4", "file", "int4"), ("eagle_anpd", "int8", "file", None)])
def test_an_exported_decoder_with_a_head_equals_its_own_greedy(strategy, quant, where, head_quant, tiny_dir, tmp_path,
                                                                monkeypatch, ort_greedy, run_without_torch) -> None:
    """Torch blocked: every prompt and budget (0, 1, 9, 24) equals the graph's own one-token
    greedy decoding, alone and in a batch of 4 (prompts of 8, 5, 1 and 10 tokens), an EOS inside
    drafts ends each row exactly there; the head drafts, and some drafts are accepted. The int4
    export asks for a compact (int4) head; by default a quantized export's head is int8, an fp32
    export's fp32."""
    import json

    from decograph.backends.onnxruntime.session import ORTCausalLM
    from decograph.export import export_decoder
    from decograph.heads.spec import save_head
    from decograph.heads.store import cached_head_path
    from decograph.models.adapters import HFCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = HFCausalLM.from_pretrained(str(tiny_dir))
    head = tiny_head(model)
    if where == "default":
        save_head(head, cached_head_path(head.config.model))
        spec = "default"
    else:
        spec = str(save_head(head, tmp_path / "my-head.npz"))
    asked = {"head_quant": head_quant} if head_quant else {}
    out = export_decoder(strategy, tmp_path / "dec", model=model, quant=quant, chat=False, **asked,
                         overrides={"head": spec, "nodes": 8}, progress=lambda m: None)
    head_quant = head_quant or ("none" if quant == "none" else "int8")
    assert sorted(p.name for p in out.iterdir()) == (["corpus.0.npz"] if strategy == "eagle_anpd" else []) + [
        "head.0.onnx", "manifest.json", "model.onnx", "strategy.json", "tokenizer.json"]   # the corpus: empty here
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["target"]["graph"].endswith("+hidden") and manifest["graphs"]["target"]["quant"] == quant
    assert manifest["graphs"]["head:0"] == {
        "file": "head.0.onnx", "quant": head_quant, "dtype": "float32", "graph": "head-2",
        "block_size": None if quant == "none" else 32,
        "num_layers": 1, "kv_heads": 2, "head_dim": 8, "vocab_size": 40, "max_positions": 512, "head": spec}
    graph = ORTCausalLM(out / "model.onnx")
    prompts = [model.tokenizer(t)["input_ids"] for t in TEXTS]
    want = [ort_greedy(graph, p, 24) for p in prompts]
    eos = want[1][4]
    got = run_without_torch(_DECODE, {"dir": str(out), "prompts": prompts, "eos": eos}, tmp_path)
    drafted = accepted = 0
    for p, n, tokens, plain, d, a, forwards in got["single"]:
        assert tokens == plain == ort_greedy(graph, p, n), (p, n)
        drafted, accepted = drafted + d, accepted + a
        assert forwards <= n + 1 and a <= d             # the prompt's forward, then one per token at most
    assert got["batch-True"] == got["batch-False"] == want
    for w, (tokens, reason) in zip(want, got["eos"]):
        assert tokens == (w[:w.index(eos) + 1] if eos in w else w)
        assert reason == ("eos" if eos in w else "max_new_tokens")
    assert got["eos-1"] == [t for t, _ in got["eos"]]
    if got["exact"]:                # where this machine's kernels keep drafting lossless (int4: not all CPUs)
        assert drafted > 0 and accepted > 0, (drafted, accepted)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_exported_head_drafts_the_trees_the_torch_path_drafts(family, tiny_dir, tiny_gemma_dir, tmp_path,
                                                                  monkeypatch) -> None:
    """One model, one head: the exported fp32 decoder (the step graph's hidden rows, ``OrtHead``)
    drafts, step for step, the trees the torch path drafts (transformers' hidden states,
    ``NumpyHead``), and accepts the same nodes: the hidden states reach the head alike (Gemma 3:
    across its sliding window, its head scaling the embedding as the model does)."""
    from decograph.api import generate
    from decograph.export import export_decoder
    from decograph.exported import ExportedDecoder
    from decograph.backends.torch_ref.head import bind_torch_head
    from decograph.heads.spec import load_head, save_head
    from decograph.models.adapters import HFCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = HFCausalLM.from_pretrained(str(tiny_dir if family == "llama" else tiny_gemma_dir))
    over = {"head": str(save_head(tiny_head(model, seed=3), tmp_path / "h.npz")), "nodes": 8}
    fp32 = bind_torch_head(load_head(over["head"]), model.model)
    dec = ExportedDecoder(export_decoder("eagle", tmp_path / "dec", model=model, chat=False, overrides=over,
                                         progress=lambda m: None), threads=1)
    keys = ("step", "draft", "accepted", "bonus", "committed")
    for text in TEXTS:
        ids = model.tokenizer(text)["input_ids"]
        trace: list = []
        [(tokens, _)] = dec.generate_batch([ids], 24, trace=trace)
        [ref] = generate(model, None, [ids], "eagle", max_new_tokens=24, overrides=over, trace=True,
                         draft_heads={over["head"]: fp32})       # torch binds int8 by default
        assert tokens == ref.new_token_ids
        steps = [{k: r[k] for k in keys} for r in trace if r["kind"] == "step"]
        assert steps == [{k: r[k] for k in keys} for r in ref.trace if r["kind"] == "step"]
        assert sum(len(s["draft"]["tokens"]) for s in steps) > 0


def test_an_export_whose_head_cannot_be_found_fails_cleanly(tiny_dir, tmp_path, monkeypatch) -> None:
    """No head for the model (none shipped, none trained), or a head of another model: a
    ``ModelError`` naming the model, and nothing written."""
    from decograph.errors import ModelError
    from decograph.export import export_decoder
    from decograph.heads.spec import save_head
    from decograph.models.adapters import HFCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = HFCausalLM.from_pretrained(str(tiny_dir))
    with pytest.raises(ModelError, match=r"no draft head for .*tiny-llama \(fingerprint [0-9a-f]{12}\).*train-draft"):
        export_decoder("eagle", tmp_path / "dec", model=model, quant="int4", chat=False, progress=lambda m: None)
    other = tiny_head(model)
    other = type(other)(type(other.config)(**{**other.config.__dict__, "model": "0123456789ab",
                                             "model_name": "another model"}), other.weights, other.vocab_ids)
    path = save_head(other, tmp_path / "other.npz")
    with pytest.raises(ModelError, match=r"trained for another model .*not .*tiny-llama"):
        export_decoder("eagle_anpd", tmp_path / "dec", model=model, chat=False, overrides={"head": str(path)},
                       progress=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "xdg") == ["other.npz"]     # nothing half-written


def test_a_manifest_with_heads_is_checked(tiny_dir, tmp_path, monkeypatch) -> None:
    """A head graph the program needs is missing, a head without a hidden-state target, a head
    field outside a head graph: each refused naming the field."""
    import json
    import shutil

    from decograph.backends.onnxruntime.manifest import ManifestError, load_manifest
    from decograph.export import export_decoder
    from decograph.heads.spec import save_head
    from decograph.models.adapters import HFCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = HFCausalLM.from_pretrained(str(tiny_dir))
    over = {"head": str(save_head(tiny_head(model), tmp_path / "h.npz"))}
    out = export_decoder("eagle", tmp_path / "dec", model=model, chat=False, overrides=over, progress=lambda m: None)
    good = json.loads((out / "manifest.json").read_text())
    assert load_manifest(out).heads["" + over["head"]].file == "head.0.onnx"

    def broken(edit, match: str) -> None:
        d = tmp_path / "bad"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(out, d)
        m = json.loads(json.dumps(good))
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ManifestError, match=match):
            load_manifest(d)

    broken(lambda m: m["graphs"].pop("head:0"), r"strategy.json: step `draft.head\(head=.*h.npz\)` has no head graph")
    broken(lambda m: m["graphs"]["target"].update(graph="fused-8"),
           r"field 'graphs.target.graph' is 'fused-8': a decoder with draft heads needs")
    broken(lambda m: m["graphs"]["head:0"].update(head="other"), r"step `draft.head\(head=.*\)` has no head graph")
    broken(lambda m: m["graphs"]["head:0"].pop("head"), r"field 'graphs.head:0.head' is missing")
    broken(lambda m: m["graphs"]["target"].update(head="x"), r"field 'graphs.target.head' a draft head's graph has")
    broken(lambda m: m["graphs"].update({"head:1": dict(m["graphs"]["head:0"])}),
           r"field 'graphs' has two graphs for one draft head")


def test_the_onnxruntime_backends_run_heads_on_a_graph_with_hidden_states(tiny_dir, tmp_path, monkeypatch) -> None:
    """``generate(..., backend="onnxruntime-int4")`` with ``eagle``: the head (the model's,
    resolved from the cache) drafts on a second graph of the model that returns hidden states;
    tokens are the backend's own greedy's, batch 1 and 4."""
    from decograph.api import generate
    from decograph.backends.onnxruntime.backend import export_dir
    from decograph.heads.spec import save_head
    from decograph.heads.store import cached_head_path
    from decograph.models.adapters import HFCausalLM

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = HFCausalLM.from_pretrained(str(tiny_dir))
    head = tiny_head(model)
    save_head(head, cached_head_path(head.config.model))
    for backend in ("onnxruntime", "onnxruntime-int4"):
        greedy = [r.new_token_ids for r in generate(model, None, [model.tokenizer(t)["input_ids"] for t in TEXTS],
                                                     "greedy", max_new_tokens=20, backend=backend)]
        for batch in (TEXTS[:1], TEXTS):
            got = generate(model, None, [model.tokenizer(t)["input_ids"] for t in batch], "eagle", max_new_tokens=20,
                           backend=backend, overrides={"nodes": 6})
            assert [r.new_token_ids for r in got] == greedy[: len(batch)]
            assert sum(sum(r.stats.drafted_per_step) for r in got) > 0
    names = sorted(p.name for p in export_dir(model.model).iterdir())
    assert "model.hidden.onnx" in names and "model.onnx" in names and any(n.startswith("head-") for n in names)
    # int4 (int8 activations, exact for dense chains only): one chain a step; fp32: trees
    for backend, chains in (("onnxruntime-int4", True), ("onnxruntime", False)):
        got = generate(model, None, [model.tokenizer(t)["input_ids"] for t in TEXTS], "eagle", max_new_tokens=20,
                       backend=backend, overrides={"nodes": 6}, trace=True)
        parents = [s["draft"]["parent"] for r in got for s in r.trace if s["kind"] == "step"]
        assert all(p == list(range(-1, len(p) - 1)) for p in parents) == chains, (backend, parents)
    # fp32: the head's graph drafts the trees the torch path's NumpyHead drafts
    ids = [model.tokenizer(TEXTS[0])["input_ids"]]
    keys = ("step", "draft", "accepted", "bonus")
    [a] = generate(model, None, ids, "eagle", max_new_tokens=20, backend="onnxruntime", overrides={"nodes": 6},
                   trace=True)
    from decograph.backends.torch_ref.head import bind_torch_head

    [b] = generate(model, None, ids, "eagle", max_new_tokens=20, overrides={"nodes": 6}, trace=True,
                   draft_heads={"default": bind_torch_head(head, model.model)})     # the float32 runner
    steps = [[{k: r[k] for k in keys} for r in x.trace if r["kind"] == "step"] for x in (a, b)]
    assert steps[0] == steps[1] and steps[0]


def test_a_compact_head_quantizes_every_matmul_and_stays_close(tmp_path) -> None:
    """``bits=4``: the six MatMuls (fc, Q/K/V, O, gate/up, down, LM rows) block-wise int4 with
    int8 activations, the embedding float16; an approximation of the fp32 head (it only drafts)."""
    import onnx

    from decograph.backends.onnxruntime.graph_head import OrtHead, export_head

    head, embed, lm = random_head(hidden=64, vocab=96, subset=80)
    ref = head.bind(embed, lm)
    path = export_head(ref, tmp_path / "h4.onnx", bits=4)
    proto = onnx.load(str(path))
    levels = [a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"]
    assert levels == [4] * 6 and not any(n.op_type == "MatMul" and "weight" in "".join(n.input) for n in proto.graph.node)
    assert next(t for t in proto.graph.initializer if t.name == "embed.weight").data_type == onnx.TensorProto.FLOAT16
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((6, 64)).astype(np.float32)
    toks, pos = rng.integers(0, 96, 6), np.arange(6)
    none = np.zeros((0, 2, 16), np.float32)
    want, got = ref.step(feats, toks, pos, none, none), OrtHead(path, 1).step(feats, toks, pos, none, none)
    for a, b in zip(want, got):             # each row's direction kept (random weights: int4 errors add up)
        a, b = a.reshape(6, -1), b.reshape(6, -1)
        assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.9
