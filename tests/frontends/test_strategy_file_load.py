"""Strategy files that load: the built-ins, YAML/TOML equivalence, params and overrides."""
from __future__ import annotations

import re

import dataclasses
from pathlib import Path

import pytest

from decograph.errors import StrategyFileError
from decograph.frontends.strategies import builtin_names, builtin_path, list_strategies, load_strategy
from decograph.frontends.strategy_file import Strategy, load_strategy_file, load_strategy_text
from decograph.ir import parse_program, print_program, verify

BUILTINS = ["anpd", "anpd_corpus", "diffusion_gemma", "diffusion_gemma_fast", "eagle", "eagle_anpd", "fast_dllm", "fast_dllm_factor", "greedy", "gs_jacobi", "jacobi", "llada", "llada_semi_ar",
            "lookahead", "lud", "ngram", "padellm_ner", "parallel_reasoning"]
DIFFUSION = ("diffusion_gemma", "diffusion_gemma_fast", "fast_dllm", "fast_dllm_factor", "llada", "llada_semi_ar", "lud")   # unmask: not lossless

LOOKAHEAD_YAML = """\
strategy: lookahead
description: "Lookahead decoding (Fu et al. 2024): a Jacobi window, an n-gram pool and a verification branch in one tree-masked forward per step."
params: {window: 4, n: 4, candidates: 3}
steps:
  - prefill
  - iterate:
      until: [eos, max_new_tokens]
      max_steps: 0
      body:
        - draft: {source: jacobi, window: "${window}", as: guess}
        - draft: {source: ngram_pool, n: "${n}", candidates: "${candidates}", as: pool}
        - forward: {drafts: [guess, pool]}
        - verify: {rule: greedy}
        - commit: {}
  - emit
"""


def test_builtin_names_are_the_shipped_files() -> None:
    assert builtin_names() == BUILTINS
    assert [name for name, _ in list_strategies()] == BUILTINS
    assert Path(str(builtin_path("lookahead"))).suffix == ".toml"


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_verifies_and_round_trips(name: str) -> None:
    s = load_strategy(name)
    assert isinstance(s, Strategy)
    forks = name in ("parallel_reasoning", "padellm_ner")     # branches exact, the whole a new text
    assert (s.name, s.source, s.lossless) == (name, f"builtin:{name}", not forks and name not in DIFFUSION)
    assert s.description and "\n" not in s.description
    assert s.program.description == s.description
    text = print_program(verify(s.program))
    again = verify(parse_program(text))
    assert print_program(again) == text
    last = text.splitlines()[-2].strip()
    assert re.fullmatch(r"%\d+ = emit\(%\d+\) : Tokens\[B, G\]", last) and (forks or last.endswith("emit(%1) : Tokens[B, G]"))


@pytest.mark.parametrize("name, cite", [("jacobi", "Santilli et al. 2023"), ("gs_jacobi", "Santilli et al. 2023"),
                                        ("anpd", "Ou et al. 2024"), ("lookahead", "Fu et al. 2024"),
                                        ("ngram", "Saxena 2023"), ("greedy", "Greedy"),
                                        ("parallel_reasoning", "Yu 2025"), ("padellm_ner", "Lu et al. 2024"),
                                        ("llada", "Nie et al. 2025"), ("llada_semi_ar", "LLaDA"),
                                        ("fast_dllm", "Wu et al. 2025"), ("fast_dllm_factor", "Fast-dLLM"),
                                        ("lud", "Sun et al. 2024"), ("eagle", "Li et al. 2024"),
                                        ("eagle_anpd", "Ou et al. 2024")])
def test_builtin_descriptions_cite_the_method(name: str, cite: str) -> None:
    assert cite in dict(list_strategies())[name]


def test_builtin_ops_match_the_documented_methods() -> None:
    ops = {n: print_program(load_strategy(n).program) for n in BUILTINS}
    assert "draft." not in ops["greedy"] and "forward(%2, dedup=false, layout=sequence, mask=causal) : Logits[B, 1, V]" in ops["greedy"]
    assert "draft.jacobi(%2, init=repeat, window=4) : Tokens[B, 4]" in ops["jacobi"]
    assert "draft.gauss_seidel_jacobi(%2, block=4, init=repeat)" in ops["gs_jacobi"]
    assert "draft.ngram(%2, candidates=1, k=8, max_n=3, min_n=1) : Tokens[B, 8]" in ops["ngram"]
    assert "draft.adaptive_ngram(%2, adaptive=true, candidates=1, k=8, max_n=4, min_n=2)" in ops["anpd"]
    assert "draft.ngram_pool(%2, candidates=3, n=4) : Tokens[B, 3, 3]" in ops["lookahead"]
    assert "forward(%2, %3, %4, dedup=false, layout=sequence, mask=causal) : Logits[B, 14, V]" in ops["lookahead"]
    assert "verify.greedy(%2, %5, %3, %4)" in ops["lookahead"]
    assert "draft.mask(%2, k=0, mask_token=-1)" in ops["llada"] and "unmask.topk_per_step(%2, %4, k=1)" in ops["llada"]
    assert "draft.mask(%2, k=32, mask_token=-1)" in ops["llada_semi_ar"]
    assert "unmask.threshold(%2, %4, contiguous=false, threshold=0.9)" in ops["fast_dllm"]
    assert "commit(%2, %5, kv=block_approx_dual, rollback=copy)" in ops["fast_dllm"]
    assert "unmask.factor(%2, %4, factor=1.0)" in ops["fast_dllm_factor"]
    assert "unmask.threshold(%2, %4, contiguous=true, threshold=0.9)" in ops["lud"]


def test_yaml_and_toml_give_identical_ir() -> None:
    from_yaml = load_strategy_text(LOOKAHEAD_YAML, "lookahead.yaml")
    from_toml = load_strategy("lookahead")
    assert print_program(from_yaml.program) == print_program(from_toml.program)


def test_toml_inline_array_form_equals_yaml() -> None:
    toml = """\
strategy = "ngram"
description = "Prompt lookup decoding (Saxena 2023): draft the 8 tokens that followed the latest earlier match of the last 3, 2 or 1 tokens, verified greedily."
params = {k = 8, max_n = 3, min_n = 1}
steps = ["prefill", {iterate = {body = [
  {draft = {source = "ngram", k = "${k}", max_n = "${max_n}", min_n = "${min_n}"}},
  {forward = {mask = "causal"}},
  {verify = {rule = "greedy"}},
  {commit = {}},
]}}, "emit"]
"""
    a = load_strategy_text(toml, "ngram.toml", fmt="toml")
    assert print_program(a.program) == print_program(load_strategy("ngram").program)


def test_toml_array_of_tables_form() -> None:
    toml = """\
strategy = "greedy"
description = "Greedy decoding: one forward per token with no draft, taking the argmax (the baseline for every lossless strategy)."
[[steps]]
prefill = {}
[[steps]]
[steps.iterate]
[[steps.iterate.body]]
forward = {}
[[steps.iterate.body]]
verify = {rule = "greedy"}
[[steps.iterate.body]]
commit = {}
"""
    a = load_strategy_text(toml, "greedy.toml", fmt="toml")
    assert print_program(a.program) == print_program(load_strategy("greedy").program)


def test_params_substitution_and_overrides() -> None:
    s = load_strategy("jacobi", overrides={"window": 7})
    text = print_program(s.program)
    assert "strategy jacobi(window=7)" in text and "draft.jacobi(%2, init=repeat, window=7) : Tokens[B, 7]" in text
    assert "window=4" in print_program(load_strategy("jacobi").program)
    s = load_strategy_text(LOOKAHEAD_YAML, "la.yaml", overrides={"n": 3, "candidates": 5})
    assert "draft.ngram_pool(%2, candidates=5, n=3) : Tokens[B, 5, 2]" in print_program(s.program)


def test_substitution_inside_lists_and_strings() -> None:
    text = LOOKAHEAD_YAML.replace("params: {", 'params: {stop: max_new_tokens, rule: greedy, ').replace(
        "until: [eos, max_new_tokens]", 'until: [eos, "${stop}"]').replace("{rule: greedy}", '{rule: "${rule}"}')
    s = load_strategy_text(text, "la.yaml")
    assert "until=[eos, max_new_tokens]" in print_program(s.program)


def test_unknown_override_is_named() -> None:
    with pytest.raises(StrategyFileError) as e:
        load_strategy("jacobi", overrides={"widow": 7})
    assert str(e.value) == "jacobi.yaml: unknown parameter 'widow' in overrides; parameters: window"


def test_override_out_of_range_names_the_using_field() -> None:
    with pytest.raises(StrategyFileError) as e:
        load_strategy("jacobi", overrides={"window": 0})
    assert str(e.value).splitlines()[0] == "jacobi.yaml:8: steps[1].iterate.body[0].draft.window: 0 is out of range [1, 64]"


def test_defaults_emit_and_draft_names(tmp_path: Path) -> None:
    text = LOOKAHEAD_YAML.replace("  - emit\n", "").replace("drafts: [guess, pool], ", "")
    path = tmp_path / "la.yml"
    path.write_text(text)
    s = load_strategy_file(path)
    assert print_program(s.program) == print_program(load_strategy("lookahead").program)
    assert s.source == str(path) and load_strategy(str(path)).source == str(path)


def test_strategy_is_frozen() -> None:
    s = load_strategy("greedy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"  # type: ignore[misc]


def test_lossy_strategies_are_marked() -> None:
    thr = LOOKAHEAD_YAML.replace("{rule: greedy}", "{rule: threshold, threshold: 0.8}")
    assert load_strategy_text(thr, "t.yaml").lossless is False
    sampling = LOOKAHEAD_YAML.replace("{rule: greedy}", "{rule: sampling, temperature: 0.7, top_p: 0.9}")
    s = load_strategy_text(sampling, "s.yaml")
    assert s.lossless is True and "temperature=0.7" in print_program(s.program)
    diffusion = """\
strategy: fast_dllm
description: "Block diffusion with threshold unmasking."
steps:
  - prefill
  - iterate:
      body:
        - draft: {source: mask, k: 32}
        - forward: {mask: block}
        - unmask: {rule: threshold, threshold: 1}
        - commit: {kv: block_approx}
"""
    s = load_strategy_text(diffusion, "d.yaml")
    assert s.lossless is False
    assert "unmask.threshold(%2, %4, contiguous=false, threshold=1.0)" in print_program(s.program)


def test_fork_and_join() -> None:
    text = """\
strategy: parallel_branches
description: "Fork one branch per delimited prompt, decode them packed, join."
steps:
  - prefill
  - draft: {source: branches, delimiter: "\\n", max_branches: 4}
  - fork
  - iterate:
      max_steps: 64
      body:
        - forward: {mask: packed}
        - verify: {rule: greedy}
        - commit
  - join: {rule: concat}
  - emit
"""
    p = print_program(load_strategy_text(text, "b.yaml").program)
    assert "%2 = fork(%0, %1) : State[4]" in p and "%8 = join(%3, rule=concat) : State" in p
