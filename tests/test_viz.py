"""``decograph viz``: the runtime trace against ``Stats``, the report's DOM (parsed statically and
as Chromium renders it), escaping, diffusion reports, the CLI and its errors.

Chromium (Debian's ``chromium`` package) is required, not optional: CI installs it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

import decograph
from decograph.api import optimize, resolve_model
from decograph.errors import DecographError, InputError, StrategyFileError
from decograph.models.mdm import tiny_mdm
from decograph.models.tiny import tiny_llama, tiny_model_dir, word_tokenizer
from decograph.viz import _visualize, add_parser, render_report, visualize, write_atomic

PROMPT = "t1 t2 t3 t1 t2 t3 t1 t2"     # the tiny model repeats itself: drafts get accepted
CAUSAL = ["greedy", "anpd", "ngram", "jacobi", "lookahead"]


# -- a small DOM for html.parser -------------------------------------------------------------

class El:
    def __init__(self, tag: str, attrs: dict[str, str], parent: El | None) -> None:
        self.tag, self.attrs, self.parent, self.children, self.parts = tag, attrs, parent, [], []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text() for p in self.parts)

    def iter(self):
        for c in self.children:
            yield c
            yield from c.iter()

    def find(self, cls: str | None = None, **attrs: str) -> list[El]:
        """Descendants with class ``cls`` and the given attribute values ("*": present)."""
        return [e for e in self.iter() if (cls is None or cls in e.classes)
                and all(e.attrs.get(k.replace("_", "-")) == v or (v == "*" and k.replace("_", "-") in e.attrs)
                        for k, v in attrs.items())]

    def by_id(self, id_: str) -> El:
        [el] = [e for e in self.iter() if e.attrs.get("id") == id_]
        return el


class DomBuilder(HTMLParser):
    VOID = {"meta", "link", "br", "hr", "img", "input", "source", "wbr", "col", "area", "base"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = El("#root", {}, None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = El(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(el)
        self.cur.parts.append(el)
        if tag not in self.VOID:
            self.cur = el

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = El(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(el)
        self.cur.parts.append(el)

    def handle_endtag(self, tag: str) -> None:
        at = self.cur
        while at is not None and at.tag != tag:
            at = at.parent
        if at is not None and at.parent is not None:
            self.cur = at.parent

    def handle_data(self, data: str) -> None:
        self.cur.parts.append(data)


def dom(html: str) -> El:
    b = DomBuilder()
    b.feed(html)
    b.close()
    return b.root


def ids_of(tokens: list[El]) -> list[int]:
    return [int(t.attrs["data-id"]) for t in tokens]


def check_report(page: El, result: Any) -> None:
    """What any report must show of ``result``: its iterations, tokens, stats and trace."""
    s = result.stats
    iterations = page.by_id("iterations").find("iteration")
    assert len(iterations) == s.decode_steps == int(page.by_id("iterations").attrs["data-count"])
    assert [int(it.attrs["data-accepted"]) for it in iterations] == list(s.accepted_per_step)
    assert [int(it.attrs["data-drafted"]) for it in iterations] == list(s.drafted_per_step)
    shown = [t for it in iterations for t in it.find("token", data_pos="*")]
    by_pos = sorted(shown, key=lambda t: int(t.attrs["data-pos"]))
    [body] = [e for e in page.iter() if e.tag == "body"]
    if body.attrs["data-kind"] == "causal":           # committed left to right
        assert by_pos == shown
    assert [int(t.attrs["data-pos"]) for t in by_pos] == list(range(s.new_tokens))
    assert ids_of(by_pos) == result.new_token_ids
    assert ids_of(page.by_id("output-tokens").find("token")) == result.new_token_ids
    nodes = page.by_id("ddg-svg").find("node", data_pos="*")
    assert sorted(int(n.attrs["data-pos"]) for n in nodes) == list(range(s.new_tokens))
    bars = page.by_id("acceptance-svg").find("bar")
    assert [int(b.attrs["data-accepted"]) for b in bars] == list(s.accepted_per_step)
    stats = s.as_dict()
    fields = {e.attrs["data-field"]: e.attrs["data-value"] for e in page.by_id("summary").find("stat")}
    assert set(fields) == {"new_tokens", "forward_passes", "decode_steps", "tokens_per_forward", "mean_accepted",
                           "tokens_per_s", "wall_time_s", "finish_reason"}
    for key, value in fields.items():
        assert value == str(stats[key]), key
    data = json.loads(page.by_id("trace-data").text())
    assert data["records"] == result.trace and data["new_token_ids"] == result.new_token_ids
    assert page.by_id("ir-before").text().strip() and page.by_id("ir-after").text().strip()
    assert page.by_id("console-errors").text() == ""


# -- the trace -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)        # millisecond forwards: threads only contend
    return tiny_llama(), word_tokenizer()


def gen(tiny, strategy: str, n: int = 24, prompt: str = PROMPT, **kw: Any):
    model, tok = tiny
    [r] = decograph.generate(model, tok, [prompt], strategy=strategy, max_new_tokens=n, passes="none",
                             trace=True, **kw)
    return r


def steps_of(r) -> list[dict[str, Any]]:
    return [x for x in r.trace if x["kind"] in ("step", "unmask")]


@pytest.mark.parametrize("strategy", CAUSAL)
def test_trace_agrees_with_stats(tiny, strategy) -> None:
    r = gen(tiny, strategy)
    steps = steps_of(r)
    assert r.trace[0] == {"kind": "prefill", "row": 0, "prompt_len": len(r.prompt_ids)}
    assert len(steps) == r.stats.decode_steps and [x["step"] for x in steps] == list(range(len(steps)))
    assert sum(len(x["committed"]) for x in steps) == r.stats.new_tokens
    assert [t for x in steps for t in x["committed"]] == r.new_token_ids
    assert [len(x["accepted"]["nodes"]) for x in steps] == list(r.stats.accepted_per_step)
    assert [len(x["draft"]["tokens"]) for x in steps] == list(r.stats.drafted_per_step)
    at = 0
    for x in steps:
        d = x["draft"]
        assert x["start"] == at and len(d["parent"]) == len(d["tokens"]) == len(d["source"]) == len(d["chain"])
        assert x["accepted"]["tokens"] == [d["tokens"][i] for i in x["accepted"]["nodes"]]
        assert all(d["parent"][b] == a for a, b in zip([-1] + x["accepted"]["nodes"], x["accepted"]["nodes"]))
        assert x["committed"] == (x["accepted"]["tokens"] + [x["bonus"]])[:len(x["committed"])]
        at += len(x["committed"])
    assert json.loads(json.dumps(r.trace)) == r.trace
    if strategy != "greedy":
        assert sum(r.stats.drafted_per_step) > 0 and all(x["sources"] for x in steps)


def test_trace_is_off_by_default(tiny) -> None:
    model, tok = tiny
    plain = decograph.generate(model, tok, [PROMPT, "t5 t6"], strategy="ngram", max_new_tokens=8, passes="none")
    assert [r.trace for r in plain] == [[], []]
    rows = decograph.generate(model, tok, [PROMPT, "t5 t6"], strategy="ngram", max_new_tokens=8, passes="none",
                              trace=True)
    for i, row in enumerate(rows):
        assert row.trace and {x["row"] for x in row.trace} == {i}
        assert len(steps_of(row)) == row.stats.decode_steps


def _fresh_token_inside_a_block(tiny) -> tuple[str, str, int]:
    """A (strategy, prompt, token) where greedy output first produces ``token`` inside an
    accepted block, not as the block's last token."""
    for prompt in ("t5 t6", PROMPT):
        for strategy in ("jacobi", "lookahead", "ngram"):
            r = gen(tiny, strategy, prompt=prompt)
            for x in steps_of(r):
                for j, t in enumerate(x["committed"][:-1]):
                    if t not in r.new_token_ids[:x["start"] + j]:
                        return strategy, prompt, t
    pytest.fail("the tiny model accepted no block with a fresh token: pick other prompts")


def test_eos_inside_an_accepted_block_is_clipped_in_trace_and_report(tiny) -> None:
    strategy, prompt, eos = _fresh_token_inside_a_block(tiny)
    r = gen(tiny, strategy, prompt=prompt, eos_token_id=eos)
    last = steps_of(r)[-1]
    assert r.new_token_ids[-1] == eos and r.stats.finish_reason == "eos" and last["finish_reason"] == "eos"
    assert len(last["committed"]) < len(last["accepted"]["tokens"]) + 1
    page = dom(render_report(r, "ir", "ir", tiny[1], model_name="tiny", prompt=prompt))
    check_report(page, r)
    clipped = page.by_id("iterations").find("iteration")[-1].find("token", data_state="clipped")
    assert clipped
    assert ids_of(clipped) == (last["accepted"]["tokens"] + [last["bonus"]])[len(last["committed"]):]


# -- the report, parsed statically -----------------------------------------------------------

@pytest.mark.parametrize("strategy", CAUSAL)
def test_report_shows_the_generation(tiny, strategy) -> None:
    model, tok = tiny
    program = decograph.load_strategy(strategy).program
    optimized = optimize(program, resolve_model(model, tok)[0], "default")
    [r] = decograph.generate(model, tok, [PROMPT], strategy=optimized, max_new_tokens=24, passes="none", trace=True)
    html = render_report(r, program, optimized, tok, model_name="tiny-llama", prompt=PROMPT)
    page = dom(html)
    check_report(page, r)
    from decograph.ir import print_program

    assert page.by_id("ir-before").text() == print_program(program).rstrip("\n")
    assert page.by_id("ir-after").text() == print_program(optimized).rstrip("\n")
    its = page.by_id("iterations").find("iteration")
    for it, x in zip(its, steps_of(r)):
        drafted = {int(t.attrs["data-node"]): t.attrs["data-state"] for t in it.find("token", data_node="*")}
        assert sorted(drafted) == list(range(len(x["draft"]["tokens"])))
        assert {i for i, s in drafted.items() if s == "accepted"} == set(x["accepted"]["nodes"])
        states = [t.attrs["data-state"] for t in it.find("token", data_pos="*")]
        if not x["finish_reason"]:
            assert states == ["committed"] * len(x["accepted"]["nodes"]) + ["bonus"]
    for forbidden in ("http://", "https://", "<link", "src=", "@import"):
        assert forbidden not in html.replace('xmlns="http://www.w3.org/2000/svg"', ""), forbidden


class HostileTokenizer:
    """Token texts full of markup, quotes and script enders."""

    TEXTS = ['<b>', '&amp;', '"q"', "'s", "</script>", "<!--", "a\nb", " ", "\u2028"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.TEXTS[i % len(self.TEXTS)] for i in ids)


def test_every_text_is_escaped(tiny) -> None:
    r = gen(tiny, "ngram", n=16)
    r = type(r)(r.prompt_ids, r.new_token_ids, "</pre><script>alert(1)</script>&", r.stats, [], r.trace)
    prompt = 'say "<img src=x onerror=alert(1)>" & </script>'
    html = render_report(r, "%0 = prefill(%prompt) <x>", "a & b", HostileTokenizer(), model_name="<m&'\">",
                         prompt=prompt, strategy_name="<s>")
    assert "<b>" not in html and "<img" not in html and "alert(1)</script>" not in html and "<!--" not in html
    assert html.count("</script>") == html.count("<script")
    page = dom(html)
    check_report(page, r)
    assert page.by_id("prompt").text() == prompt
    assert page.by_id("output-text").text() == r.text
    assert page.by_id("meta").find(data_field="model")[0].text() == "<m&'\">"
    assert page.by_id("ir-before").text() == "%0 = prefill(%prompt) <x>"
    texts = {t.text() for t in page.by_id("output-tokens").find("token")}
    assert texts <= {HostileTokenizer.TEXTS[i % 9].replace(" ", "\u00b7").replace("\n", "\u21b5") or "\u2205"
                     for i in r.new_token_ids}
    assert json.loads(page.by_id("trace-data").text())["records"] == r.trace


def test_a_result_without_its_trace_is_refused(tiny) -> None:
    model, tok = tiny
    [r] = decograph.generate(model, tok, [PROMPT], strategy="ngram", max_new_tokens=8, passes="none")
    with pytest.raises(InputError, match="trace=True"):
        render_report(r, "", "", tok, model_name="m", prompt=PROMPT)
    other = gen(tiny, "greedy", n=4)
    r2 = type(r)(r.prompt_ids, r.new_token_ids, r.text, r.stats, [], other.trace)
    with pytest.raises(InputError, match="does not match"):
        render_report(r2, "", "", tok, model_name="m", prompt=PROMPT)


# -- masked diffusion ------------------------------------------------------------------------

def _eos_unmasked_with_later_positions(r) -> int:
    """A token first generated at position p by a step that also unmasked a position after p."""
    for x in steps_of(r):
        for p, t in zip(x["positions"], x["tokens"]):
            if t not in r.new_token_ids[:p] and max(x["positions"]) > p:
                return t
    pytest.fail("no step unmasked a fresh token before another position: pick another prompt or seed")


@pytest.mark.parametrize("strategy,over,eos", [("fast_dllm", {"block": 4, "threshold": 0.3}, False),
                                               ("llada_semi_ar", {"block": 8, "k": 3}, True)])
def test_diffusion_report(strategy, over, eos) -> None:
    model = tiny_mdm(n_layers=2, seed=3)
    prompt, n = [11, 12], 20
    program = decograph.load_strategy(strategy, overrides=over).program
    eos_id: Any = []
    if eos:
        [plain] = decograph.generate(model, None, [prompt], strategy=program, max_new_tokens=n, passes="none",
                                     eos_token_id=[], trace=True)
        eos_id = _eos_unmasked_with_later_positions(plain)
    [r] = decograph.generate(model, None, [prompt], strategy=program, max_new_tokens=n, passes="none", trace=True,
                             eos_token_id=eos_id)
    steps = steps_of(r)
    assert len(steps) == r.stats.decode_steps
    assert [len(x["positions"]) for x in steps] == list(r.stats.accepted_per_step)
    assert [x["masked"] for x in steps] == list(r.stats.drafted_per_step)
    assert [t for x in steps for t in x["committed"]] == r.new_token_ids
    kept = sorted(p for x in steps for p in x["positions"] if p < len(r.new_token_ids))
    assert kept == list(range(len(r.new_token_ids)))
    assert all(0 < c <= 1 for x in steps for c in x["confidence"]) and steps[-1]["masked_left"] == 0
    page = dom(render_report(r, program, program, None, model_name="tiny-mdm", prompt=prompt))
    its = page.by_id("iterations").find("iteration")
    discarded = [t for it in its for t in it.find("token", data_state="discarded")]
    if eos:      # positions unmasked past EOS are shown as dropped, with no position in the output
        assert r.stats.finish_reason == "eos" and r.new_token_ids[-1] == eos_id and len(r.new_token_ids) < n
        assert discarded and all("data-pos" not in t.attrs for t in discarded)
    else:
        assert not discarded
    assert page.find(data_kind="diffusion")
    check_report(page, r)
    for it, x in zip(page.by_id("iterations").find("iteration"), steps):
        cells = [c.attrs["data-s"] for c in it.find("cell")]
        assert {i for i, s in enumerate(cells) if s == "now"} == set(x["positions"])
        assert ids_of(it.find("token")) == x["tokens"]


# -- the Python API and the CLI --------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("viz-tiny"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decograph")
    add_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_writes_the_report(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "r.html"
    args = parser().parse_args(["viz", "--strategy", "ngram", "--prompt", PROMPT, "--model", str(model_dir),
                                "--max-new-tokens", "12", "--set", "k=4", "--passes", "none", "-o", str(out)])
    assert args.chat is None
    assert args.func(args) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout == f"{out}\n" and stderr.startswith("[ngram] 12 tokens in ") and "report:" in stderr
    page = dom(out.read_text(encoding="utf-8"))
    data = json.loads(page.by_id("trace-data").text())
    assert data["stats"]["new_tokens"] == 12 and 'k=4' in page.by_id("ir-before").text()
    assert len(page.by_id("iterations").find("iteration")) == data["stats"]["decode_steps"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]          # no temporary file left
    defaults = parser().parse_args(["viz", "--strategy", "anpd", "--prompt", "x"])
    assert (defaults.max_new_tokens, defaults.out, defaults.passes, defaults.model) == (64, "decograph-viz.html",
                                                                                       "default", None)


def test_visualize_api(tiny, tmp_path) -> None:
    model, tok = tiny
    path, r = _visualize(PROMPT, "jacobi", model, 10, None, {"window": 3}, "none", tmp_path / "j.html", tok)
    check_report(dom(path.read_text(encoding="utf-8")), r)
    again = visualize([3, 4, 5], "greedy", model, 5, out=tmp_path / "g.html", tokenizer=tok)
    assert again == tmp_path / "g.html" and "greedy" in again.read_text(encoding="utf-8")


def test_bad_input_names_the_field_and_writes_nothing(model_dir, tmp_path) -> None:
    p = parser()

    def run(*argv: str) -> None:
        args = p.parse_args(["viz", "--model", str(model_dir), *argv])
        args.func(args)

    with pytest.raises(StrategyFileError, match="unknown strategy 'nope'"):
        run("--strategy", "nope", "--prompt", "t1", "-o", str(tmp_path / "a.html"))
    with pytest.raises(InputError, match="--prompt is empty"):
        run("--strategy", "greedy", "--prompt", " ", "-o", str(tmp_path / "a.html"))
    with pytest.raises(InputError, match="--max-new-tokens must be >= 0"):
        run("--strategy", "greedy", "--prompt", "t1", "--max-new-tokens", "-1")
    with pytest.raises(InputError, match="out: cannot write .*does not exist"):
        run("--strategy", "greedy", "--prompt", "t1", "-o", str(tmp_path / "missing" / "a.html"))
    with pytest.raises(InputError, match="is a directory"):
        run("--strategy", "greedy", "--prompt", "t1", "-o", str(tmp_path))
    with pytest.raises(InputError, match="prompt: empty"):
        visualize("", "greedy", out=tmp_path / "b.html")
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path, monkeypatch) -> None:
    target = tmp_path / "r.html"
    write_atomic(target, "old")

    def broken(src: str, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(DecographError, match="out: cannot write .*No space left"):
        write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_the_viz_module_imports_no_torch() -> None:
    code = ("import sys, argparse, decograph.viz as v; p = argparse.ArgumentParser(); "
            "v.add_parser(p.add_subparsers()); p.parse_args(['viz', '--strategy', 'x', '--prompt', 'y']); "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- headless Chromium -----------------------------------------------------------------------

def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is required for the viz tests and was not found on PATH: install it with "
                    "`sudo apt-get install -y chromium` (Debian/Ubuntu; the README's set-up command, scripts/setup.sh, installs it)")
    return exe


def browse(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--no-default-browser-check", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           *flags, page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.real_model
def test_chromium_renders_a_real_generation(default_model, tmp_path) -> None:
    model, tok = default_model
    prompt = "Write a Python function that adds two numbers, with a docstring and type hints."
    path, r = _visualize(prompt, "anpd", model, 32, True, None, "default", tmp_path / "viz.html", tok)
    assert r.stats.new_tokens == 32
    assert sum(r.stats.accepted_per_step) > 0, "ANPD accepted no draft: the graph shows no parallel acceptance"
    proc = browse(path, tmp_path / "profile-dom", "--dump-dom")
    assert console_lines(proc.stderr) == []
    page = dom(proc.stdout)
    check_report(page, r)
    [body] = [e for e in page.iter() if e.tag == "body"]
    assert body.attrs.get("data-js") == "ready", "the page's script did not run to its end"
    assert page.by_id("output-text").text() == r.text
    shot = tmp_path / "viz.png"
    proc = browse(path, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000",
                  "--hide-scrollbars")
    assert console_lines(proc.stderr) == []
    assert png_size(shot) == (1280, 2000) and shot.stat().st_size > 30_000


def test_chromium_check_catches_a_script_error(tiny, tmp_path) -> None:
    """The error trap and the stderr check see a broken script (so their silence above means something)."""
    r = gen(tiny, "ngram", n=8)
    html = render_report(r, "a", "b", tiny[1], model_name="tiny", prompt=PROMPT)
    path = tmp_path / "broken.html"
    path.write_text(html.replace("</body>", "<script>undefinedFunction();</script></body>"), encoding="utf-8")
    proc = browse(path, tmp_path / "profile", "--dump-dom")
    page = dom(proc.stdout)
    assert "undefinedFunction is not defined" in page.by_id("console-errors").text()
    assert any("undefinedFunction" in line for line in console_lines(proc.stderr))


def test_tokens_a_join_appends_are_shown_after_their_steps() -> None:
    from decograph.viz.view import build_view

    trace = [{"kind": "prefill", "row": 0, "prompt_len": 2},
             {"kind": "step", "row": 0, "step": 0, "start": 0, "bonus": 7, "committed": [7], "finish_reason": None,
              "draft": {"tokens": [], "parent": [], "source": [], "chain": []}, "sources": [],
              "accepted": {"nodes": [], "tokens": []}},
             {"kind": "join", "row": 0, "step": 1, "start": 1, "committed": [8, 9]}]
    view = build_view(trace, [7, 8, 9], None)
    assert [it.kind for it in view.iterations] == ["step", "join"]
    assert [(n.pos, n.col, n.dep) for n in view.nodes] == [(0, 0, -1), (1, 1, 0), (2, 1, 1)]
    with pytest.raises(InputError, match="does not match"):
        build_view(trace, [7, 8], None)


PROBE = """<script>
(function () {
  var out = [];
  var node = document.querySelector('#ddg-svg .node[data-pos="3"]');
  node.dispatchEvent(new Event("mouseenter"));
  out.push("hl-tokens=" + document.querySelectorAll('.token.hl[data-pos="3"]').length);
  out.push("hl-iteration=" + document.querySelectorAll(".iteration.hl").length);
  node.dispatchEvent(new Event("mouseleave"));
  out.push("hl-after=" + document.querySelectorAll(".hl").length);
  document.getElementById("toggle-iterations").click();
  out.push("collapsed=" + document.querySelectorAll(".iteration.collapsed").length);
  var box = document.getElementById("toggle-rejected");
  box.checked = false;
  box.dispatchEvent(new Event("change"));
  out.push("hide-rejected=" + document.body.classList.contains("hide-rejected"));
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = out.join(" ");
  document.body.appendChild(pre);
})();
</script></body>"""


def test_chromium_runs_the_page_interactions(tiny, tmp_path) -> None:
    """Hovering a graph node highlights its token everywhere and its iteration; the buttons toggle."""
    r = gen(tiny, "ngram", n=8)
    html = render_report(r, "a", "b", tiny[1], model_name="tiny", prompt=PROMPT)
    path = tmp_path / "probe.html"
    path.write_text(html.replace("</body>", PROBE), encoding="utf-8")
    proc = browse(path, tmp_path / "profile", "--dump-dom")
    assert console_lines(proc.stderr) == []
    page = dom(proc.stdout)
    assert page.by_id("console-errors").text() == ""
    n_its = len(page.by_id("iterations").find("iteration"))
    # position 3: its token in the output list and in its iteration (plus the graph node, not a .token)
    assert page.by_id("probe").text() == f"hl-tokens=2 hl-iteration=1 hl-after=0 collapsed={n_its} hide-rejected=true"
