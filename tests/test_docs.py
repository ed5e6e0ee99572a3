"""The user documentation (docs/*.md) is executed here, so its commands and examples cannot rot.

How a page's fenced blocks are read (the info string after the opening fence; fences start at
column 0):

- ```sh            commands a reader types. Each block runs as one script under
                   ``bash -e -o pipefail -x`` (every command must exit 0; the trace names the one
                   that failed) in the page's own temp dir, with this venv's ``bin`` first on PATH.
- ```sh install    setup a reader runs once on a fresh machine. Not run; every line must be a
                   ``pip install``, ``git clone``, ``cd``, ``python3 -m venv``, venv ``source``
                   or ``bash scripts/NAME.sh`` line (or a comment), so the marker cannot hide
                   any other command.
- ```python        runs in a subprocess (this interpreter) in the page's temp dir.
- ```yaml file=NAME / ```toml file=NAME
                   a file the page's later commands use ("save this as NAME"): written to the
                   page's temp dir before each later block of the page runs.
- ```text output   the exact stdout of the ``sh`` block just before it (line by line, trailing
                   spaces ignored), e.g. the IR that ``decograph compile`` prints.
- ```text, ```json illustrative output (timings vary); not run, and must hold no command line.

Blocks of one page run in document order (one test each, so a failure names its block) and
share the page's temp dir: a later block may use what an earlier one wrote, so run a page's
blocks together. Every page gets a fresh dir, removed at the end. Pages whose blocks run the
real default model are marked ``real_model``. Any other fence info string is an error, so a
typo (```bash) cannot silently skip a block.

Commands stay cheap (16 new tokens, one prompt per benchmark task, one repetition). The whole
file took 6 to 7 minutes on the project's 2-core machine while other benchmark jobs shared it,
``decograph bench`` alone 2 to 3.5 of them; ``-m "not real_model"`` runs the rest in seconds.

In ``docs/strategy-files.md`` every yaml/toml block is a strategy example and is loaded with
``decograph.frontends.strategies.load_strategy`` from a file in a temp dir; it must verify:

- ```yaml / ```toml          a whole strategy file;
- ```yaml body               a fragment: the steps of one ``iterate`` body, wrapped as
                             ``steps: [prefill, {iterate: {body: FRAGMENT}}, emit]``;
- ```yaml steps              a fragment: top-level steps, wrapped as ``[prefill, *FRAGMENT, emit]``;
- ```yaml file=NAME invalid  must fail to load (the error example; its message is checked by
                             the ``text output`` of the command that compiles it).

The completeness test introspects ``decograph.ir.ops`` and the strategy-file reader: every op
has a section in strategy-files.md (a heading naming it in backticks) with a field table whose
rows give each attribute's type and default exactly as the dataclass does, every choice
(mask, layout, kv, rollback, join rule, until condition, jacobi init) is named in its op's
section, and at least one example in the section, loaded, contains that op.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from decograph.frontends import strategy_file as SF
from decograph.frontends.strategies import load_strategy
from decograph.errors import StrategyFileError
from decograph.ir import ops as O
from decograph.ir import parse_program, print_program

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
TEXT = {page: (DOCS / page).read_text(encoding="utf-8") for page in PAGES}   # read once: edits mid-run do not skew it
BLOCK_TIMEOUT_S = 420
REAL_MODEL = re.compile(r"decograph (run|bench|viz|export|ner)\b|load_default_model")
INSTALL_LINE = re.compile(r"(#.*|pip install .+|python3? -m pip install .+|git clone .+|cd \S+|python3? -m venv \S+"
                          r"|(source|\.) \S*bin/activate|bash scripts/[\w-]+\.sh)")
KNOWN_INFO = re.compile(r"(sh|sh install|python|text|text output|json|yaml|yaml body|yaml steps|toml"
                        r"|(yaml|toml) file=[\w.-]+( invalid)?)")


@dataclass(frozen=True)
class Block:
    page: str
    line: int            # 1-based line of the opening fence
    info: str
    text: str

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def file(self) -> str | None:
        m = re.search(r"\bfile=([\w.-]+)", self.info)
        return m.group(1) if m else None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.info.replace(' ', '_')}"


def blocks(page: str) -> list[Block]:
    """Every fenced block of ``docs/page`` in order; fences must start at column 0."""
    lines = TEXT[page].splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```") and not line.startswith("```"):
            raise AssertionError(f"{page}:{i + 1}: an indented fence; start fences at column 0 so the doc test sees them")
        if line.startswith("```"):
            info, start, i = line[3:].strip(), i, i + 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            if i == len(lines):
                raise AssertionError(f"{page}:{start + 1}: the fence is never closed")
            out.append(Block(page, start + 1, info, "\n".join(lines[start + 1:i]) + "\n"))
        i += 1
    return out


_PARSED = {page: blocks(page) for page in PAGES}
ALL = [b for page in PAGES for b in _PARSED[page]]
RUN = [b for b in ALL if b.info in ("sh", "python")]


def page_uses_model(page: str) -> bool:
    return any(REAL_MODEL.search(b.text) for b in _PARSED[page] if b.info in ("sh", "python"))


def _param(b: Block) -> Any:
    marks = [pytest.mark.real_model] if page_uses_model(b.page) else []
    return pytest.param(b, id=b.id, marks=marks)


@pytest.fixture(scope="session")
def page_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    dirs = {page: tmp_path_factory.mktemp(page.removesuffix(".md")) for page in PAGES}
    yield dirs
    for d in dirs.values():                 # an exported decoder is ~200 MB: do not keep it around
        shutil.rmtree(d, ignore_errors=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["HF_HUB_OFFLINE"] = "1"             # the docs promise an offline default model
    env.pop("PYTHONPATH", None)             # the package is installed (editable); the docs rely on that
    return env


def _write_files_before(b: Block, where: Path) -> None:
    for other in _PARSED[b.page]:
        if other.line >= b.line:
            break
        if other.file:
            (where / other.file).write_text(other.text, encoding="utf-8")


def _expected_output(b: Block) -> str | None:
    page = _PARSED[b.page]
    i = page.index(b)
    if i + 1 < len(page) and page[i + 1].info == "text output":
        return page[i + 1].text
    return None


def _norm(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip("\n").splitlines()]


# ------------------------------------------------------------------ conventions


def test_every_page_is_indexed_and_every_fence_is_known() -> None:
    assert PAGES, "no docs/*.md"
    index = TEXT.get("README.md", "")
    missing = [p for p in PAGES if p != "README.md" and f"({p})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"
    bad = [f"{b.page}:{b.line}: ```{b.info}" for b in ALL if not KNOWN_INFO.fullmatch(b.info)]
    assert not bad, ("fences with an info string the doc test does not know (see the module docstring): "
                     + "; ".join(bad))


def test_install_blocks_hold_only_install_lines() -> None:
    seen = 0
    for b in ALL:
        if b.info != "sh install":
            continue
        seen += 1
        for n, line in enumerate(b.text.splitlines(), b.line + 1):
            if line.strip() and not INSTALL_LINE.fullmatch(line.strip()):
                raise AssertionError(f"{b.page}:{n}: {line!r} in a not-run `sh install` block; only pip install, "
                                     "git clone, cd, venv lines may go there: put other commands in a ```sh block")
    assert seen, "the quickstart's install block is missing"


def test_output_blocks_hold_no_commands() -> None:
    for b in ALL:
        if b.lang not in ("text", "json"):
            continue
        for n, line in enumerate(b.text.splitlines(), b.line + 1):
            if re.match(r"\s*(\$ |decograph [a-z]|python3? )", line):
                raise AssertionError(f"{b.page}:{n}: {line!r}: a command in a `{b.info}` block is never run; "
                                     "put it in a ```sh block")
        if b.info == "text output":
            prev = _PARSED[b.page][_PARSED[b.page].index(b) - 1]
            assert prev.info == "sh", f"{b.page}:{b.line}: a `text output` block must follow a ```sh block"


# ------------------------------------------------------------------ the README's two commands

SETUP_SCRIPT = "bash scripts/setup.sh"


def _readme_setup() -> tuple[str, list[str]]:
    """The README's "Set up" section and its ```sh commands (one line each): set-up, tests."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Set up\n"):]
    section = section[:section.index("\n## ", 1)]
    commands = re.findall(r"^```sh\n(.*?)\n```$", section, re.M | re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), (
        f"README.md's Set up section must hold two one-line ```sh blocks (set-up, tests); found {commands}")
    return section, commands


def test_ci_runs_the_readme_commands_verbatim() -> None:
    _, (setup, tests) = _readme_setup()
    assert setup.startswith(SETUP_SCRIPT + " && "), f"the README's set-up command must run {SETUP_SCRIPT} first"
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    where = {}
    for name, cmd in (("set-up", setup), ("test", tests)):
        found = [i for i, line in enumerate(lines) if line in (cmd, cmd + " || exit")]
        assert found, f".ci/run does not run the README's {name} command verbatim on a line of its own: {cmd!r}"
        where[name] = found[0]
    venv = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv"))
    assert venv < where["set-up"] < where["test"], ".ci/run: a fresh venv, then the set-up command, then the tests"


def test_the_docs_name_every_install_the_setup_script_runs() -> None:
    script = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    pips = [line.strip() for line in script.splitlines() if line.strip().startswith("pip install")]
    assert len(pips) >= 4, pips
    readme, (setup, _) = _readme_setup()
    quickstart = TEXT["quickstart.md"]
    install = quickstart[quickstart.index("## Install\n"):quickstart.index("\n## ", quickstart.index("## Install\n"))]
    for where, text in (("README.md's Set up section", readme), ("docs/quickstart.md's Install section", install)):
        missing = [cmd for cmd in pips if f"`{cmd}`" not in " ".join(text.split())]
        assert not missing, f"{where} does not name what scripts/setup.sh runs: {missing}"
        assert "chromium" in text, f"{where} does not say that scripts/setup.sh installs Chromium"
    [block] = [b for b in _PARSED["quickstart.md"] if b.info == "sh install"]
    assert setup.split(" && ")[0] in block.text.splitlines(), "the quickstart must install with the README's set-up script"


# ------------------------------------------------------------------ running the pages


@pytest.mark.parametrize("block", [_param(b) for b in RUN])
def test_doc_block(block: Block, page_dirs: dict[str, Path], tmp_path: Path) -> None:
    where = page_dirs[block.page]
    _write_files_before(block, where)
    if block.info == "sh":
        cmd = ["bash", "-e", "-o", "pipefail", "-x", "-c", block.text]
    else:
        script = tmp_path / f"{block.page}-{block.line}.py"      # outside the page's dir, which the block sees
        script.write_text(block.text, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=where, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (f"{block.page}:{block.line}: the ```{block.info} block failed "
                                  f"(exit {proc.returncode}) in {where}\n--- stdout\n{proc.stdout[-4000:]}"
                                  f"\n--- stderr\n{proc.stderr[-6000:]}")
    expected = _expected_output(block)
    if expected is not None:
        assert _norm(proc.stdout) == _norm(expected), (
            f"{block.page}:{block.line}: the command's output differs from the `text output` block after it; "
            f"paste the new output if the change is intended\n--- got\n{proc.stdout}\n--- documented\n{expected}")


# ------------------------------------------------------------------ strategy-file examples

STRATEGY_PAGE = "strategy-files.md"
WRAP_DESCRIPTION = "A documentation example."


def _strategy_text(b: Block) -> tuple[str, str]:
    """(file text, suffix) of a strategy-files.md yaml/toml block, fragments wrapped."""
    kind = b.info.split()[1] if len(b.info.split()) > 1 else ""
    if b.lang == "toml":
        return b.text, ".toml"
    if kind in ("body", "steps"):
        fragment = yaml.safe_load(b.text)
        assert isinstance(fragment, list), f"{b.id}: a `{kind}` fragment must be a YAML list of steps"
        steps = ["prefill", {"iterate": {"body": fragment}}] if kind == "body" else ["prefill", *fragment]
        doc = {"strategy": "doc_example", "description": WRAP_DESCRIPTION, "steps": steps + ["emit"]}
        return yaml.safe_dump(doc, sort_keys=False), ".yaml"
    return b.text, ".yaml"


STRATEGY_BLOCKS = [b for b in _PARSED[STRATEGY_PAGE] if b.lang in ("yaml", "toml")]


def _load(b: Block, tmp: Path) -> Any:
    text, suffix = _strategy_text(b)
    path = tmp / f"example_{b.line}{suffix}"
    path.write_text(text, encoding="utf-8")
    return load_strategy(str(path))


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in STRATEGY_BLOCKS])
def test_strategy_example_loads_and_verifies(block: Block, tmp_path: Path) -> None:
    if block.info.endswith(" invalid"):
        with pytest.raises(StrategyFileError):
            _load(block, tmp_path)
        return
    try:
        strategy = _load(block, tmp_path)
    except StrategyFileError as exc:
        raise AssertionError(f"{block.page}:{block.line}: the example does not load:\n{exc}") from None
    text = print_program(strategy.program)
    assert print_program(parse_program(text)) == text, f"{block.id}: the example's IR does not round-trip"


@dataclass(frozen=True)
class Section:
    title: str
    level: int
    first: int           # 1-based line numbers of the section's body (after its heading)
    last: int
    body: str


def _sections(page: str) -> list[Section]:
    """Every heading outside fences, with its body up to the next heading of the same or a higher level."""
    lines = TEXT[page].splitlines()
    fenced, heads = False, []
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#{1,6}) (.*)", line)):
            heads.append((i, len(m.group(1)), m.group(2)))
    out = []
    for j, (i, level, title) in enumerate(heads):
        end = next((k for k, lv, _ in heads[j + 1:] if lv <= level), len(lines))
        out.append(Section(title, level, i + 2, end, "\n".join(lines[i + 1:end])))
    return out


def _section_of(name: str) -> Section:
    found = [s for s in _sections(STRATEGY_PAGE) if f"`{name}`" in s.title]
    assert found, f"{STRATEGY_PAGE}: no section for `{name}` (a heading naming it in backticks)"
    return found[0]


TYPE_WORDS = {"int": "int", "float": "float", "bool": "bool", "str": "string", "tuple[str, ...]": "list of strings"}
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("forward", "mask"): O.MASKS, ("forward", "layout"): O.LAYOUTS, ("commit", "kv"): O.KV_POLICIES,
    ("commit", "rollback"): O.ROLLBACKS, ("join", "rule"): O.JOIN_RULES, ("iterate", "until"): O.UNTIL,
    ("draft.jacobi", "init"): ("repeat", "pad"), ("draft.gauss_seidel_jacobi", "init"): ("repeat", "pad"),
}


def _field_rows(body: str) -> dict[str, tuple[str, str]]:
    """`name` -> (type, default) from the section's table rows ``| `name` | type | `default` | ... |``."""
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def _default(f: dataclasses.Field[Any]) -> Any:
    value = f.default
    return list(value) if isinstance(value, tuple) else value


def test_reference_names_every_op_field_and_choice_with_its_type_and_default() -> None:
    problems = []
    for name, opdef in sorted(O.OPS.items()):
        body = _section_of(name).body
        rows = _field_rows(body)
        for f in opdef.cls.attr_fields():
            if f.name not in rows:
                problems.append(f"`{name}`: field `{f.name}` has no row `| \\`{f.name}\\` | type | default | meaning |`")
                continue
            typ, default = rows[f.name]
            if typ != TYPE_WORDS[str(f.type)]:
                problems.append(f"`{name}`.{f.name}: documented type {typ!r}, the op says {TYPE_WORDS[str(f.type)]!r}")
            try:
                documented = yaml.safe_load(default.strip("`"))
            except yaml.YAMLError:
                documented = default
            if not (default.startswith("`") and documented == _default(f)):
                problems.append(f"`{name}`.{f.name}: documented default {default}, the op says {_default(f)!r}")
        for (op, field), values in CHOICES.items():
            if op == name:
                problems += [f"`{name}`.{field}: choice `{v}` is not named" for v in values if f"`{v}`" not in body]
    for step in SF._STEPS:
        if not any(f"`{step}`" in s.title for s in _sections(STRATEGY_PAGE)):
            problems.append(f"step `{step}` has no section")
    text = TEXT[STRATEGY_PAGE]
    for key in (*SF._TOP_KEYS, "source", "as", "drafts", "rule", "body", "${name}", "--set"):
        if f"`{key}" not in text:
            problems.append(f"key `{key}` is not described")
    assert not problems, f"{STRATEGY_PAGE} is missing:\n" + "\n".join(problems)


def test_every_op_has_an_example_that_uses_it(tmp_path: Path) -> None:
    missing = []
    for name, opdef in sorted(O.OPS.items()):
        sec = _section_of(name)
        examples = [b for b in STRATEGY_BLOCKS if sec.first <= b.line <= sec.last and not b.info.endswith("invalid")]
        used = set()
        for b in examples:
            used |= {type(op) for op in _load(b, tmp_path).program.walk()}
        if opdef.cls not in used:
            missing.append(name)
    assert not missing, f"{STRATEGY_PAGE}: these ops have no example in their section that contains them: {missing}"
