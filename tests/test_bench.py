"""``decograph bench``: prompt files, the interleaved loop, the tables and the command end to end.

The command runs on a tiny random Llama saved to a directory (``--model DIR``), so every system,
Hugging Face's ``generate`` included, takes milliseconds; the real default model runs it in the
docs' test (docs/quickstart.md) and in the README's measured table.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from decograph.bench.prompts import SPEC_BENCH_TASKS, load_prompts
from decograph.bench.report import markdown, summarize
from decograph.bench.runner import DecographSystem, Outcome, run_interleaved, split_spec
from decograph.cli import main
from decograph.errors import InputError
from decograph.models.tiny import tiny_model_dir


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_prompts_cover_every_spec_bench_task() -> None:
    prompts = load_prompts(None, 0)
    assert [t for t in SPEC_BENCH_TASKS] == list(dict.fromkeys(p.task for p in prompts))
    assert all(sum(p.task == t for p in prompts) == 10 for t in SPEC_BENCH_TASKS)
    two = load_prompts(None, 2)
    assert len(two) == 12 and [p.task for p in two[:2]] == ["mt_bench", "mt_bench"]


def test_prompt_file_tasks_keep_order_and_mt_bench_merges(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.jsonl", [
        json.dumps({"question_id": 1, "category": "mine", "turns": ["a"]}),
        json.dumps({"question_id": 2, "category": "writing", "turns": ["b", "c"]}),
        "",
        json.dumps({"question_id": 3, "category": "coding", "turns": ["d"]}),
        json.dumps({"question_id": 4, "category": "mine", "turns": ["e"]}),
    ])
    got = load_prompts(f, 0)
    assert [(p.task, p.text) for p in got] == [("mt_bench", "b"), ("mt_bench", "d"), ("mine", "a"), ("mine", "e")]
    assert [p.question_id for p in load_prompts(f, 1)] == ["2", "1"]


@pytest.mark.parametrize("line, message", [
    ("not json", "p.jsonl:2: not a JSON object"),
    ("[1, 2]", "p.jsonl:2: expected a JSON object"),
    ('{"category": "qa"}', 'p.jsonl:2: "turns" must be a non-empty list'),
    ('{"category": "qa", "turns": [""]}', "p.jsonl:2: the first turn is empty"),
    ('{"category": 3, "turns": ["x"]}', 'p.jsonl:2: "category" must be a non-empty string'),
])
def test_bad_prompt_file_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = _write(tmp_path / "p.jsonl", [json.dumps({"category": "qa", "turns": ["ok"]}), line])
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        load_prompts(f)


def test_missing_or_empty_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="no prompts"):
        load_prompts(_write(tmp_path / "e.jsonl", [""]))


def test_split_spec() -> None:
    assert split_spec("anpd") == ("anpd", "default")
    assert split_spec("anpd@none") == ("anpd", "none")
    assert split_spec("anpd@mask-fusion+cache-reuse") == ("anpd", "mask-fusion,cache-reuse")
    assert split_spec("dir@x/s.yaml") == ("dir@x/s.yaml", "default")


class _Fake:
    """A system that records the order it ran in and returns fixed tokens."""

    kind, lossless = "decograph", True

    def __init__(self, name: str, log: list[str], tokens: list[int], seconds: float = 1.0) -> None:
        self.name, self.log, self.tok, self.sec = name, log, tokens, seconds

    def run(self, ids: list[int], n: int) -> Outcome:
        self.log.append(f"{self.name}:{len(ids)}:{n}")
        return Outcome(self.tok[:n], self.sec, len(self.tok[:n]) + 1, len(self.tok[:n]), 0.002 * len(self.tok[:n]))


def test_interleaved_order_rotates_after_one_warmup_each() -> None:
    log: list[str] = []
    systems = [_Fake("a", log, [1, 2, 3]), _Fake("b", log, [1, 2, 3]), _Fake("c", log, [1, 2, 3])]
    ticks: list[str] = []
    res = run_interleaved(systems, [[0], [0, 0]], 3, reps=2, warmup=True, tick=ticks.append)
    assert log[:3] == ["a:1:3", "b:1:3", "c:1:3"]            # warm-up on the first prompt
    order = [e.split(":")[0] for e in log[3:]]
    assert order == ["a", "b", "c", "b", "c", "a", "b", "c", "a", "c", "a", "b"]
    assert len(ticks) == 3 + 12
    assert [len(r["a"].outcomes) for r in res] == [2, 2]
    with pytest.raises(InputError, match="--reps"):
        run_interleaved(systems, [[0]], 3, reps=0)


def test_summary_numbers() -> None:
    log: list[str] = []
    fast = _Fake("ours", log, list(range(10)), seconds=1.0)
    slow = _Fake("hf_greedy", log, list(range(10)), seconds=2.0)
    res = run_interleaved([slow, fast], [[0], [0], [0]], 10, reps=1, warmup=False)
    same = [{"hf_greedy": None, "ours": True}, {"hf_greedy": None, "ours": True}, {"hf_greedy": None, "ours": False}]
    table = summarize(res, ["x", "x", "y"], ["hf_greedy", "ours"], same)
    assert list(table) == ["x", "y", "overall"]
    c = table["overall"]["ours"]
    assert c["tokens_per_s"] == pytest.approx(10.0) and c["speedup"] == pytest.approx(2.0)
    assert c["tokens_per_forward"] == pytest.approx(1.0) and c["forwards_per_token"] == pytest.approx(1.1)
    assert (c["identical"], c["checked"]) == (2, 3) and table["y"]["ours"]["identical"] == 0
    assert table["overall"]["hf_greedy"]["identical"] is None
    meta = {"model": "m", "prompt_set": "s", "prompts": 3, "max_new_tokens": 10, "threads": 1, "backend": "torch",
            "reps": 1, "reference": "hf_greedy", "unavailable": {"llamacpp_greedy": "not installed"}}
    md = markdown(table, meta)
    assert c["draft_ms_per_step"] == pytest.approx(2.0)
    assert "| ours | 10.0 | 2.00x (task mean 2.00x) | 1.00 | 1.100 | 2.00 | 2/3 |" in md
    assert "### y (1 prompt)" in md and "llamacpp_greedy (not installed)" in md


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("bench"), vocab_size=64, eos_token_id=5)


def _prompt_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "p.jsonl", [json.dumps({"question_id": i, "category": c, "turns": [t]}) for i, (c, t) in
                                          enumerate([("qa", "t1 t2 t3 t1 t2"), ("qa", "t7 t8"), ("rag", "t3 t3 t3 t3")])])


def test_bench_command_end_to_end(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(model_dir), "--prompts", str(_prompt_file(tmp_path)), "--strategies",
               "greedy,anpd@none,ngram", "--max-new-tokens", "6", "--reps", "2", "--out", str(out), "--quiet",
               "--threads", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["systems"] == ["hf_greedy", "hf_prompt_lookup", "greedy", "anpd@none", "ngram"]
    assert data["meta"]["lossless_failures"] == [] and data["meta"]["reference"] == "hf_greedy"
    rows = data["rows"]
    assert len(rows) == 3 * 5 and all(len(r["times_s"]) == 2 for r in rows)
    hf = {r["prompt"]: r["tokens"] for r in rows if r["system"] == "hf_greedy"}
    for r in rows:
        assert r["tokens"] == hf[r["prompt"]] and len(r["tokens"]) <= 6      # every one lossless here
    assert set(data["table"]) == {"qa", "rag", "overall"}
    assert data["table"]["qa"]["greedy"]["checked"] == 2
    qa = data["table"]["qa"]          # the cost of a draft step: none for greedy, timed for n-gram drafts
    assert qa["greedy"]["draft_ms_per_step"] == 0 < qa["ngram"]["draft_ms_per_step"]
    assert qa["hf_greedy"]["draft_ms_per_step"] is None
    md = (out / "bench.md").read_text()
    assert md in cap.out and "### qa (2 prompts)" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".bench*"))                       # no temporary file left
    assert all((out / f).stat().st_mode & 0o044 == 0o044 for f in ("bench.json", "bench.md", "bench.png"))


def test_bench_reports_a_lossless_mismatch(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = DecographSystem.run

    def broken(self: DecographSystem, ids: list[int], n: int) -> Outcome:
        o = real(self, ids, n)
        return Outcome([(t + 1) % 64 for t in o.tokens], o.seconds, o.forwards, o.decode_forwards)

    monkeypatch.setattr(DecographSystem, "run", broken)
    rc = main(["bench", "--model", str(model_dir), "--prompts", str(_prompt_file(tmp_path)), "--strategies", "anpd",
               "--max-new-tokens", "4", "--out", str(tmp_path / "o"), "--quiet", "--baselines", "none"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "lossless check failed" in err and "anpd on prompt 1 (qa" in err and "step 0: reference=" in err
    assert "logit margin" in err
    assert json.loads((tmp_path / "o" / "bench.json").read_text())["table"]["overall"]["anpd"]["identical"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--reps", "0"], "--reps must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--strategies", ","], "at least one strategy"),
    (["--strategies", "nope"], "nope"),
    (["--strategies", "anpd,anpd"], "anpd given twice"),
    (["--baselines", "vllm"], "unknown baseline 'vllm'"),
    (["--baselines", "llamacpp_greedy"], "embedded default model only"),
    (["--backend", "nope"], "nope"),
    (["--per-category", "-1"], "--per-category must be >= 0"),
])
def test_bench_bad_input_is_a_clear_error(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], message: str) -> None:
    rc = main(["bench", "--model", str(model_dir), "--prompts", str(_prompt_file(tmp_path)), "--quiet",
               "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("decograph: error:") and message in err
    assert not (tmp_path / "o").exists()


def test_bench_refuses_a_diffusion_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from decograph.models.mdm import save_mdm, tiny_mdm

    save_mdm(tiny_mdm(), tmp_path / "mdm")
    rc = main(["bench", "--model", str(tmp_path / "mdm"), "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 2 and "masked-diffusion" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py")))
def test_benchmark_scripts_parse_their_options(script) -> None:
    """Every benchmark script builds its command line (``--help`` exits 0): a script whose
    options name something gone fails here, not at the start of a long run."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--help"], capture_output=True, text=True,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
