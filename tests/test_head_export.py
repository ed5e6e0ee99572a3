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

pytestmark = pytest.mark.usefixtures("private_cache")

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
