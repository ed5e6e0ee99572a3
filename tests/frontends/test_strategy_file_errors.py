"""Malformed and hostile strategy files: refused at load with file, line and field path."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from decograph.errors import StrategyFileError
from decograph.frontends.strategies import builtin_path, load_strategy
from decograph.frontends.strategy_file import load_strategy_file, load_strategy_text

BASE = """\
strategy: jacobi
description: "Jacobi decoding (Santilli et al. 2023)."
params: {window: 4}
steps:
  - prefill
  - iterate:
      body:
        - draft: {source: jacobi, window: "${window}"}
        - forward: {mask: causal}
        - verify: {rule: greedy}
        - commit: {kv: keep_accepted}
  - emit
"""
BODY = "steps[1].iterate.body"
TOML_BASE = builtin_path("lookahead").read_text()


def edit(old: str, new: str, base: str = BASE) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


CASES = [
    ("unknown_step", edit("- forward: {mask: causal}", "- forwrd: {mask: causal}"),
     f"{{f}}:9: {BODY}[1]: unknown step 'forwrd'; steps are prefill, draft, forward, verify, unmask, commit, iterate, fork, join, emit"),
    ("unknown_key", edit('window: "${window}"', "windw: 4"),
     f"{{f}}:8: {BODY}[0].draft.windw: unknown key 'windw'; valid keys: as, init, source, window"),
    ("wrong_type", edit('window: "${window}"', "window: four"),
     f"{{f}}:8: {BODY}[0].draft.window: must be an integer, got 'four'"),
    ("bool_for_int", edit('window: "${window}"', "window: true"),
     f"{{f}}:8: {BODY}[0].draft.window: must be an integer, got True"),
    ("window_zero", edit("{window: 4}", "{window: 0}"),
     f"{{f}}:8: {BODY}[0].draft.window: 0 is out of range [1, 64]"),
    ("window_negative", edit('window: "${window}"', "window: -3"),
     f"{{f}}:8: {BODY}[0].draft.window: -3 is out of range [1, 64]"),
    ("window_too_big", edit("{window: 4}", "{window: 65}"),
     f"{{f}}:8: {BODY}[0].draft.window: 65 is out of range [1, 64]"),
    ("negative_threshold", edit("{rule: greedy}", "{rule: threshold, threshold: -0.5}"),
     f"{{f}}:10: {BODY}[2].verify.threshold: -0.5 is out of range [0, 1]"),
    ("bad_mask", edit("{mask: causal}", "{mask: diagonal}"),
     f"{{f}}:9: {BODY}[1].forward.mask: 'diagonal' is not one of causal, tree, block, packed"),
    ("unknown_draft_name", edit("{mask: causal}", "{drafts: [jacobi, pool]}"),
     f"{{f}}:9: {BODY}[1].forward.drafts[1]: unknown draft 'pool'; drafts in this body: jacobi"),
    ("verify_before_forward", edit("        - forward: {mask: causal}\n", ""),
     f"{{f}}:9: {BODY}[1].verify: verify needs a forward step before it in this body (it reads that forward's logits)"),
    ("commit_without_verify", edit("        - verify: {rule: greedy}\n", ""),
     f"{{f}}:10: {BODY}[2].commit: commit needs a verify or unmask step before it (it appends what they accepted)"),
    ("missing_description", edit('description: "Jacobi decoding (Santilli et al. 2023)."\n', ""),
     "{f}:1: description: is required"),
    ("multiline_description", edit('"Jacobi decoding (Santilli et al. 2023)."', '"two\\nlines"'),
     "{f}:2: description: must be one non-empty line of text, got 'two\\nlines'"),
    ("bad_until", edit("      body:", "      until: [eos, forever]\n      body:"),
     "{f}:7: steps[1].iterate.until: 'forever' is not one of eos, max_new_tokens, stop"),
    ("until_not_list", edit("      body:", "      until: eos\n      body:"),
     "{f}:7: steps[1].iterate.until: must be a list of strings, got 'eos'"),
    ("non_mapping_top", "- prefill\n- emit\n",
     "{f}:1: the top level must be a mapping with keys strategy, description, params, steps; got list"),
    ("empty_file", "# nothing\n",
     "{f}:1: the top level must be a mapping with keys strategy, description, params, steps; got an empty file"),
    ("duplicate_key", edit("        - commit: {kv: keep_accepted}", "        - commit:\n            kv: keep_accepted\n            kv: recompute"),
     f"{{f}}:13: {BODY}[3].commit.kv: duplicate key 'kv' (first given at line 12)"),
    ("yaml_syntax", edit("- prefill", "- prefill: [unclosed"),
     "{f}:6: YAML syntax error: expected ',' or ']', but got ':'"),
    ("unknown_param", edit('"${window}"', '"${width}"'),
     f"{{f}}:8: {BODY}[0].draft.window: unknown parameter 'width' in '${{width}}'; parameters: window"),
    ("partial_reference", edit('"${window}"', '"w${window}"'),
     f"{{f}}:8: {BODY}[0].draft.window: 'w${{window}}': a ${{name}} reference must be the whole value"),
    ("unknown_source", edit("source: jacobi", "source: jacoby"),
     f"{{f}}:8: {BODY}[0].draft.source: 'jacoby' is not one of adaptive_ngram, branches, corpus, gauss_seidel_jacobi, head, jacobi, mask, model, ngram, ngram_pool, noise"),
    ("emit_inside_body", edit("        - commit: {kv: keep_accepted}", "        - commit: {kv: keep_accepted}\n        - emit"),
     f"{{f}}:12: {BODY}[4].emit: emit may only be the last step of the strategy (top level)"),
    ("no_prefill", edit("  - prefill\n", ""),
     "{f}:5: steps[0].iterate: needs a state: start the strategy with `prefill`"),
    ("unknown_top_key", edit("params:", "parms:"),
     "{f}:3: parms: unknown key 'parms'; valid keys: strategy, description, params, steps"),
    ("merge_key", edit("params: {window: 4}", "base: &b {window: 4}\nparams: {<<: *b}"),
     "{f}:4: params: merge keys (<<) are not supported"),
    ("duplicate_draft_name", edit("        - forward:", "        - draft: {source: ngram, as: jacobi}\n        - forward:"),
     f"{{f}}:9: {BODY}[1].draft.as: draft name 'jacobi' is already used in this body; set another `as:`"),
    ("min_above_max", edit('{source: jacobi, window: "${window}"}', "{source: ngram, min_n: 3, max_n: 2}"),
     f"{{f}}:8: {BODY}[0].draft.min_n: min_n=3 exceeds max_n=2"),
    ("batch_layout_causal", edit("        - forward: {mask: causal}", "        - forward: {mask: causal, layout: batch}"),
     f"{{f}}:9: {BODY}[1].forward.layout: 'batch' lays out the chains or branches of a tree or packed forward, not mask=causal"),
    ("infinite_threshold", edit("{rule: greedy}", "{rule: threshold, threshold: .inf}"),
     f"{{f}}:10: {BODY}[2].verify.threshold: must be a finite number, got inf"),
]


@pytest.mark.parametrize("name, text, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_yaml(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(StrategyFileError) as e:
        load_strategy_file(path)
    assert str(e.value).splitlines()[0] == expected.replace("{f}", str(path))


def test_verifier_errors_keep_the_verifier_text() -> None:
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(edit("{window: 4}", "{window: 65}"), "j.yaml")
    lines = str(e.value).splitlines()
    assert lines[1] == "verify error at line 5, op `draft.jacobi`, field 'window': 65 is out of range [1, 64]"
    assert lines[-1] == "fix: choose window within [1, 64]"


def test_merge_keys_refused() -> None:
    text = "strategy: &s jacobi\ndescription: x\nsteps:\n  - {<<: {prefill: {}}}\n"
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(text, "m.yaml")
    assert str(e.value) == "m.yaml:4: steps[0]: merge keys (<<) are not supported"


TOML_CASES = [
    ("toml_syntax", TOML_BASE.replace("[params]", "[params"),
     "{f}:5: TOML syntax error: Expected ']' at the end of a table declaration (at line 5, column 8)"),
    ("toml_window", TOML_BASE.replace("window = 4", "window = -3"),
     "{f}:17: steps[1].iterate.body[0].draft.window: -3 is out of range [1, 64]"),
    ("toml_unknown_key", TOML_BASE.replace('as = "pool"', 'as = "pool", size = 2'),
     "{f}:18: steps[1].iterate.body[1].draft.size: unknown key 'size'; valid keys: as, candidates, n, source"),
    ("toml_bad_mask", TOML_BASE.replace('drafts = ["guess", "pool"]}', 'drafts = ["guess", "pool"], mask = "diagonal"}'),
     "{f}:20: steps[1].iterate.body[2].forward.mask: 'diagonal' is not one of causal, tree, block, packed"),
    ("toml_duplicate_key", TOML_BASE.replace("n = 4\n", "n = 4\nn = 5\n"),
     "{f}:8: TOML syntax error: Cannot overwrite a value (at line 8, column 6)"),
    ("toml_top_level_array", TOML_BASE.replace('strategy = "lookahead"', 'strategy = ["lookahead"]'),
     "{f}:2: strategy: must be an identifier, got ['lookahead']"),
]


@pytest.mark.parametrize("name, text, expected", TOML_CASES, ids=[c[0] for c in TOML_CASES])
def test_malformed_toml(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(StrategyFileError) as e:
        load_strategy_file(path)
    assert str(e.value).splitlines()[0] == expected.replace("{f}", str(path))


@pytest.mark.parametrize("payload", [
    'strategy: !!python/object/apply:os.system ["touch {marker}"]\n',
    'strategy: jacobi\ndescription: x\nsteps:\n  - draft: !!python/object/apply:os.system ["touch {marker}"]\n',
    '!!python/object/apply:os.system ["touch {marker}"]\n',
    'strategy: jacobi\n!!python/object/apply:os.system ["touch {marker}"]: 1\n',
    'strategy: !!python/object/new:subprocess.check_output [["touch", "{marker}"]]\n',
    'strategy: !!python/name:os.system\n',
])
def test_object_tags_refused_and_no_code_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: str) -> None:
    marker = tmp_path / "pwned"
    called: list[str] = []
    monkeypatch.setattr(os, "system", lambda cmd: called.append(cmd) or 0)
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(payload.format(marker=marker), "evil.yaml")
    assert "is not allowed" in str(e.value) and "!!python/" in str(e.value)
    assert str(e.value).startswith("evil.yaml:")
    assert not marker.exists() and not called


def test_object_tag_message_names_tag_and_line() -> None:
    text = BASE.replace("{kv: keep_accepted}", '!!python/object/apply:os.system ["echo hi"]')
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(text, "evil.yaml")
    assert str(e.value) == (f"evil.yaml:11: {BODY}[3].commit: tag !!python/object/apply:os.system is not allowed: "
                            "strategy files hold only strings, numbers, booleans, null, lists and mappings")


@pytest.mark.parametrize("text, tag", [("strategy: !custom x\n", "!custom"), ("strategy: !!binary aGk=\n", "!!binary"),
                                       ("strategy: !!set {a: null}\n", "!!set")])
def test_nonstandard_tags_refused(text: str, tag: str) -> None:
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(text, "t.yaml")
    assert str(e.value).startswith(f"t.yaml:1: strategy: tag {tag} is not allowed")


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join(['*' + p] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text", [BOMB, "a: &a [*a]\n", "a: &a {b: *a}\n"])
def test_anchor_bombs_and_cycles_refused_quickly(text: str) -> None:
    start = time.perf_counter()
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(text, "bomb.yaml")
    assert time.perf_counter() - start < 2.0
    assert str(e.value) in ("bomb.yaml:1: more than 10000 values once aliases are expanded (an anchor bomb?); refused",
                            "bomb.yaml:1: nested deeper than 64 levels; refused")


def test_too_many_nodes_refused_during_composition() -> None:
    with pytest.raises(StrategyFileError, match=r"^big\.yaml:1: more than 10000 YAML nodes; refused$"):
        load_strategy_text("[" + ", ".join(["1"] * 20000) + "]\n", "big.yaml")


@pytest.mark.parametrize("text, fmt", [("[" * 5000 + "]" * 5000, "yaml"), ("a = " + "[" * 5000 + "]" * 5000, "toml")])
def test_deep_nesting_refused(text: str, fmt: str) -> None:
    with pytest.raises(StrategyFileError, match="nested"):
        load_strategy_text(text, f"deep.{fmt}", fmt=fmt)


def test_huge_file_refused(tmp_path: Path) -> None:
    text = BASE + "# " + "x" * (300 * 1024) + "\n"
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    with pytest.raises(StrategyFileError) as e:
        load_strategy_file(path)
    assert str(e.value) == f"{path}: over the 256 KiB limit; refused"
    with pytest.raises(StrategyFileError, match=r"^huge\.yaml: \d+ bytes is over the 256 KiB limit; refused$"):
        load_strategy_text(text, "huge.yaml")


@pytest.mark.parametrize("text, fmt, expected", [
    ("strategy: x\ndescription: y\nsteps: [prefill]\nparams: {a: " + "9" * 5000 + "}\n", "yaml", "y.yaml:4: params.a: cannot read"),
    ('strategy = "x"\ndescription = "y"\nsteps = []\n[params]\na = ' + "9" * 5000 + "\n", "toml", "y.toml:1: TOML error: Exceeds"),
])
def test_huge_integers_refused(text: str, fmt: str, expected: str) -> None:
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(text, f"y.{fmt}", fmt=fmt)
    assert str(e.value).startswith(expected)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(StrategyFileError, match=r"missing\.yaml: cannot read: No such file or directory"):
        load_strategy_file(tmp_path / "missing.yaml")
    with pytest.raises(StrategyFileError, match=r"s\.json: unknown strategy file type '\.json'; use \.yaml, \.yml or \.toml"):
        load_strategy_file(tmp_path / "s.json")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"strategy: x\ndescription: caf\xe9\n")
    with pytest.raises(StrategyFileError, match=r"latin1\.yaml:2: not UTF-8 text"):
        load_strategy_file(bad)
    with pytest.raises(StrategyFileError, match=r"^x: unknown format 'json'; use 'yaml' or 'toml'$"):
        load_strategy_text(BASE, "x", fmt="json")


def test_unknown_strategy_name_lists_builtins() -> None:
    with pytest.raises(StrategyFileError) as e:
        load_strategy("medusa")
    assert str(e.value) == ("unknown strategy 'medusa'; built-in strategies: anpd, anpd_corpus, diffusion_gemma, diffusion_gemma_fast, eagle, eagle_anpd, fast_dllm, "
                            "fast_dllm_factor, greedy, "
                            "gs_jacobi, jacobi, llada, llada_semi_ar, lookahead, lud, ngram, padellm_ner, "
                            "parallel_reasoning; or give the path of a .yaml, .yml or .toml file")
    with pytest.raises(StrategyFileError, match="unknown built-in strategy 'medusa'; built-in strategies: anpd, anpd_corpus, diffusion_gemma, diffusion_gemma_fast, eagle, eagle_anpd, fast_dllm"):
        builtin_path("medusa")


@pytest.mark.parametrize("old, new, expected", [
    ("strategy: jacobi", 'strategy: "jacobi\\n"', "t.yaml:1: strategy: must be an identifier, got 'jacobi\\n'"),
    ('"${window}"', '"${window}\\n"', f"t.yaml:8: {BODY}[0].draft.window: '${{window}}\\n': a ${{name}} reference must be the whole value"),
])
def test_trailing_newline_is_not_an_identifier(old: str, new: str, expected: str) -> None:
    with pytest.raises(StrategyFileError) as e:
        load_strategy_text(edit(old, new), "t.yaml")
    assert str(e.value) == expected
