"""Parallel branches on the real default model: every branch's tokens equal Hugging Face greedy
``generate`` of that branch alone (the shared prefix, then the branch prompt), batch of 2, for
PaDeLLM-NER (count and mention branches) and parallel reasoning (whose joined sequence then
continues exactly as greedy decoding of the joined text)."""
from __future__ import annotations

import pytest

from decograph.api import generate
from decograph.apps.ner import dedupe_mentions, extract_entities, ner_request, newline_ids

pytestmark = pytest.mark.real_model

NER_TEXTS = ["Tim Cook is the chief executive of Apple, which is based in Cupertino, California.",
             "Angela Merkel met Emmanuel Macron in Paris to discuss the European Union budget."]
REASONING = ["Work through these steps one by one.\n1. Add 17 and 25.\n2. Name the largest planet.\n"
             "3. Give a synonym of happy.",
             "Plan a short trip.\n- Pick a city.\n- Choose a hotel.\n- List two sights.\n- Pack a bag."]


@pytest.mark.parametrize("passes", ["default", "none"])
def test_ner_branches_equal_greedy_alone(default_model, hf_greedy, passes: str) -> None:
    model, tok = default_model
    labels = ["PER", "ORG", "LOC"]
    _, results = extract_entities(NER_TEXTS, labels, model, tok, passes=passes, details=True)
    prompts, _ = ner_request(NER_TEXTS, labels, tok)
    ends = [model.generation_config.eos_token_id] + list(newline_ids(tok))
    checked = 0
    for prompt, r in zip(prompts, results):
        counts, mentions = r.branches
        assert [c.meta["label"] for c in counts] == labels
        for c in list(counts) + list(mentions.branches):
            budget = 16 if "index" in c.meta else 4
            assert list(c.tokens) == hf_greedy(model, [prompt + list(c.prompt_ids)], budget, ends)[0], c
            checked += 1
        assert mentions.entities == dedupe_mentions(mentions.branches)
    assert checked > len(labels) * len(NER_TEXTS)     # some mention branches were decoded


def test_parallel_reasoning_branches_and_continuation_equal_greedy(default_model, hf_greedy) -> None:
    model, tok = default_model
    eos = model.generation_config.eos_token_id
    results = generate(model, tok, REASONING, "parallel_reasoning", 400, chat=True,
                       overrides={"branch_tokens": 24, "conclusion_steps": 16,
                                  "delimiter": r"\s*(?:\d+[.)]|-)\s"})
    for q, r in zip(REASONING, results):
        prompt = r.prompt_ids
        [branches] = r.branches
        assert len(branches) >= 3
        joined: list[int] = []
        for b in branches:
            assert list(b.tokens) == hf_greedy(model, [prompt + list(b.prompt_ids)], 24, [eos])[0]
            body = list(b.tokens[:-1]) if b.tokens and b.tokens[-1] == eos else list(b.tokens)
            joined += list(b.prompt_ids) + body
        assert r.new_token_ids[: len(joined)] == joined
        rest = r.new_token_ids[len(joined):]
        # 16 steps of the conclusion (ANPD drafts: 16 or more tokens), or fewer ending at EOS
        assert len(rest) >= 16 or rest[-1:] == [eos]
        assert rest == hf_greedy(model, [prompt + joined], len(rest), [eos])[0]
