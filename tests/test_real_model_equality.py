"""The lossless promise on the real default model (SmolLM2-135M-Instruct, fp32).

For every built-in lossless strategy, on Spec-Bench prompts covering all six tasks: batch 1 on
one prompt per task, batch 4 in two batches with the pass pipeline (every task) and in one batch of the
four other prompts without it: the new tokens equal Hugging Face ``generate(do_sample=False)`` token for token.
(Fewer prompts than a benchmark: the suite must fit CI's time on a busy 2-core machine; the
benchmarks compare every output on 26 prompts.)
EOS inside an accepted draft ends the output exactly there; nothing exceeds max_new_tokens.
A mismatch reports the step and HF's top-2 logit margin there, so a genuine fp32 near-tie can
be told apart from a bug.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import decograph.api as api
from decograph.frontends.strategies import list_strategies, load_strategy

pytestmark = pytest.mark.real_model

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "spec_bench_questions.jsonl"
MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
N_NEW = 32
# strategies with draft heads need a head trained for the model
LOSSLESS = [name for name, _ in list_strategies() if load_strategy(name).lossless and not load_strategy(name).heads]


def _questions(per_task: int = 2) -> list[str]:
    if not DATA.exists():
        pytest.fail(f"Spec-Bench prompts not found at {DATA}")
    by_task: dict[str, list[str]] = defaultdict(list)
    for line in DATA.read_text().splitlines():
        q = json.loads(line)
        task = "mt_bench" if q["category"] in MT_BENCH else q["category"]
        by_task[task].append(q["turns"][0])
    # spread over each task (not just its first questions)
    return [qs[i * len(qs) // per_task] for qs in by_task.values() for i in range(per_task)]


@pytest.fixture(scope="module")
def setup(default_model, hf_greedy):
    model, tok = default_model
    prompts = []
    for q in _questions():
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)["input_ids"]
        prompts.append(list(ids)[-400:])   # keep the long RAG/summarization contexts affordable
    return model, tok, prompts, hf_greedy(model, prompts, N_NEW)


def _explain(model, ids: list[int], ref: list[int], got: list[int]) -> str:
    i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    with torch.inference_mode():
        top = torch.topk(model(torch.tensor([ids + ref[:i]])).logits[0, -1], 2).values
    return f"first difference at step {i} (len ref {len(ref)}, ours {len(got)}); HF top-2 logit margin {float(top[0] - top[1]):.3e}"


def test_twelve_prompts_all_tasks(setup):
    _, _, prompts, refs = setup
    assert len(prompts) == 12 and len(set(map(tuple, prompts))) == 12 and all(len(r) >= 1 for r in refs)


def _one_per_task(items: list) -> list:
    """Every other item of the task-ordered list: one prompt of each of the six tasks."""
    return items[::2]


@pytest.mark.parametrize("name", LOSSLESS)
def test_batch1_equals_hf_greedy(setup, name):
    model, tok, prompts, refs = setup
    program = load_strategy(name).program
    bad = []
    for ids, ref in zip(_one_per_task(prompts), _one_per_task(refs)):
        [r] = api.generate(model, tok, [ids], strategy=program, max_new_tokens=N_NEW)
        assert len(r.new_token_ids) <= N_NEW
        if r.new_token_ids != ref:
            bad.append(_explain(model, ids, ref, r.new_token_ids))
    assert not bad, f"{name}: {len(bad)} of 6 prompts differ: " + "; ".join(bad)


@pytest.mark.parametrize("passes", ["default", "none"])
@pytest.mark.parametrize("name", LOSSLESS)
def test_batch4_equals_hf_greedy(setup, name, passes):
    """The optimized pipeline and the strategy as written (no passes) both equal HF greedy."""
    model, tok, prompts, refs = setup
    program = load_strategy(name).program
    bad = []
    # with the pipeline: two batches, every task; as written: the four prompts batch 1 leaves out
    groups = [[0, 2, 4, 6], [8, 10, 1, 3]] if passes == "default" else [[5, 7, 9, 11]]
    for group in groups:
        results = api.generate(model, tok, [prompts[i] for i in group], strategy=program, max_new_tokens=N_NEW,
                               passes=passes)
        for i, r in zip(group, results):
            if r.new_token_ids != refs[i]:
                bad.append(f"prompt {i}: " + _explain(model, prompts[i], refs[i], r.new_token_ids))
    assert not bad, f"{name} batch 4: " + "; ".join(bad)


@pytest.mark.parametrize("name", LOSSLESS)
def test_eos_inside_accepted_draft_ends_there(setup, name):
    """Declare a token that greedy really produces mid-output to be EOS: output stops right there."""
    model, tok, prompts, refs = setup
    program = load_strategy(name).program
    checked = 0
    for ids, ref in zip(prompts[:6], refs[:6]):
        if len(ref) < 12:
            continue
        eos = ref[len(ref) // 2]
        want = ref[: ref.index(eos) + 1]
        [r] = api.generate(model, tok, [ids], strategy=program, max_new_tokens=N_NEW, eos_token_id=[eos, 2])
        assert r.new_token_ids == want, f"{name}: EOS {eos} not honoured exactly"
        assert r.stats.finish_reason == "eos"
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", LOSSLESS)
@pytest.mark.parametrize("budget", [0, 1, 9])     # none, the prefill's token only, a cut inside drafts
def test_max_new_tokens_exact(setup, name, budget):
    model, tok, prompts, refs = setup
    program = load_strategy(name).program
    results = api.generate(model, tok, prompts[:2], strategy=program, max_new_tokens=budget)
    for r, ref in zip(results, refs[:2]):
        assert r.new_token_ids == ref[:budget]
