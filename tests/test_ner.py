"""PaDeLLM-NER: the join on crafted branch outputs, count parsing, templates, errors, and the
two-stage decoding on a tiny model (each branch exactly its own greedy decoding)."""
from __future__ import annotations

from pathlib import Path

import pytest

from decograph.runtime.branches import BranchResult
from decograph.errors import InputError, StrategyFileError
from decograph.apps.ner import NerTemplate, clean_mention, dedupe_mentions, ner_request, parse_count


def br(label: str, text: str, logprob: float, index: int = 1, tokens: tuple[int, ...] = (1, 2)) -> BranchResult:
    return BranchResult(0, "p", {"label": label, "index": index}, tokens, text, logprob, "stop")


def test_a_mention_claimed_by_several_labels_keeps_the_most_probable() -> None:
    out = dedupe_mentions([br("PER", " Paris", -3.0), br("LOC", "Paris", -0.5), br("ORG", "paris.", -1.0)])
    assert [(e.text, e.label, e.logprob) for e in out] == [("Paris", "LOC", -0.5)]


def test_duplicates_within_a_label_and_none_answers_collapse() -> None:
    out = dedupe_mentions([br("PER", "Ada Lovelace", -1.0, 1), br("PER", "Ada Lovelace", -2.0, 2),
                           br("PER", "none", -0.1, 3), br("ORG", "", -0.2), br("LOC", "  N/A ", -0.3)])
    assert [(e.text, e.label, e.index) for e in out] == [("Ada Lovelace", "PER", 1)]


def test_eos_at_once_gives_no_entity_and_an_empty_join_is_empty() -> None:
    assert dedupe_mentions([br("PER", "", 0.0, tokens=(0,))]) == []
    assert dedupe_mentions([]) == []


def test_entities_are_located_and_ordered_by_position_in_the_text() -> None:
    text = "Grace Hopper joined the Navy in New York."
    out = dedupe_mentions([br("LOC", "New York", -1.0), br("PER", "Grace Hopper", -1.0), br("ORG", "Acme", -1.0)],
                          text)
    assert [(e.text, e.start, e.end) for e in out] == [("Grace Hopper", 0, 12), ("New York", 32, 40), ("Acme", None, None)]
    assert text[out[1].start:out[1].end] == "New York"


@pytest.mark.parametrize("text, n", [(" 2", 2), ("3 people", 3), ("There are two.", 2), ("none", 0), ("", 0),
                                     ("zero", 0), ("12", 5), ("-", 0)])
def test_parse_count(text: str, n: int) -> None:
    assert parse_count(text, cap=5) == n


def test_clean_mention() -> None:
    assert clean_mention(' "Tim Cook".\nmore') == "Tim Cook"
    assert clean_mention("- Apple") == "Apple"
    assert clean_mention("2) Cupertino") == "Cupertino"
    assert clean_mention("None") == ""


def test_a_zero_count_label_gets_no_mention_branches(tiny_tokenizer) -> None:
    prompts, providers = ner_request(["t1 t2 t3"], ["PER", "ORG"], tiny_tokenizer,
                                     NerTemplate(chat=False, prefix="{text}", count_prompt="t4", mention_prompt="t5"))
    assert len(prompts) == 1 and len(providers["ner.count"](None)) == 2

    class Row:
        results = [[BranchResult(0, "t4", {"label": "PER"}, (7,), "t3", -1.0, "stop", (4,)),
                    BranchResult(1, "t4", {"label": "ORG"}, (9,), "zero", -1.0, "stop", (4,))]]

    mentions = providers["ner.mention"](Row())
    # "t3" holds the digit 3: three PER mentions, each prompted with the count branch's prompt and answer
    assert [b.meta for b in mentions] == [{"label": "PER", "index": k, "count": 3} for k in (1, 2, 3)]
    assert all(b.ids[:2] == (4, 7) for b in mentions)


def test_labels_and_texts_are_checked(tiny_tokenizer) -> None:
    with pytest.raises(InputError, match="at least one non-empty label"):
        ner_request(["x"], [], tiny_tokenizer)
    with pytest.raises(InputError, match="at least one non-empty label"):
        ner_request(["x"], ["PER", " "], tiny_tokenizer)
    with pytest.raises(InputError, match="labels must be distinct"):
        ner_request(["x"], ["PER", "PER"], tiny_tokenizer)
    with pytest.raises(InputError, match="text 1 is empty"):
        ner_request(["x", " "], ["PER"], tiny_tokenizer, NerTemplate(chat=False))


def test_template_files_load_and_errors_name_the_field(tmp_path: Path) -> None:
    good = tmp_path / "t.toml"
    good.write_text('prefix = "<text>{text}</text>"\nchat = false\nmax_count = 3\n[names]\nPER = "people"\n')
    t = NerTemplate.load(good)
    assert (t.prefix, t.chat, t.max_count, t.name("PER"), t.name("GENE")) == ("<text>{text}</text>", False, 3,
                                                                              "people", "GENE")
    cases = [('colour = "red"\n', "unknown field 'colour'"), ("max_count = \"3\"\n", "field 'max_count' must be int"),
             ('mention_prompt = "{label} {who}"\n', "field 'mention_prompt' uses {who}"),
             ("prefix = [\n", "not valid TOML")]
    for text, message in cases:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(StrategyFileError, match=message) as e:
            NerTemplate.load(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(StrategyFileError, match="cannot read"):
        NerTemplate.load(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from decograph.models.tiny import word_tokenizer

    return word_tokenizer(64)


def test_two_stage_decoding_on_a_tiny_model_is_each_branch_alone(tiny_tokenizer) -> None:
    from decograph.api import generate
    from decograph.models.tiny import tiny_llama
    from decograph.apps.ner import extract_entities

    model = tiny_llama(vocab_size=64)
    template = NerTemplate(chat=False, prefix="t1 t2 {text}", count_prompt="t3 t{label}", mention_prompt="t4 t{index}",
                           max_count=3, count_tokens=2, mention_tokens=5)
    texts = ["t9 t10 t11 t12", "t20 t21"]
    _, results = extract_entities(texts, ["5", "6", "7"], model, tiny_tokenizer, template, details=True)
    prompts, _ = ner_request(texts, ["5", "6", "7"], tiny_tokenizer, template)
    n_mentions = 0
    for prompt, r in zip(prompts, results):
        counts, mentions = r.branches
        assert [c.meta["label"] for c in counts] == ["5", "6", "7"]
        for c in list(counts) + list(mentions.branches):
            [alone] = generate(model, tiny_tokenizer, [prompt + list(c.prompt_ids)], "greedy", len(c.tokens) if
                               c.finish_reason != "max_new_tokens" else 5 if "index" in c.meta else 2, passes="none")
            assert list(c.tokens) == alone.new_token_ids
        expected = sum(parse_count(c.text, 3) for c in counts)
        assert len(mentions.branches) == expected
        n_mentions += expected
        assert r.stats.forward_passes <= 1 + 2 + 5          # prefill, count steps, mention steps: packed
    assert n_mentions > 0, "the crafted template should give the tiny model some mentions to decode"
