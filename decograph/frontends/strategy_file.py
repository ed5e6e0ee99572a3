"""Strategy files: a decoding strategy written in YAML or TOML, compiled to verified IR.

    strategy: ngram
    description: "Prompt lookup decoding (Saxena 2023): ..."
    params: {k: 8}                    # optional defaults, referenced as "${k}"
    steps:
      - prefill
      - iterate:
          until: [eos, max_new_tokens]   # optional (this default); max_steps: 0 too
          body:
            - draft: {source: ngram, k: "${k}", as: look}
            - forward: {drafts: [look], mask: causal}
            - verify: {rule: greedy}
            - commit: {kv: keep_accepted}
      - emit                          # added when missing

The state is threaded implicitly: the current state is the last prefill/commit/fork/join
result (the loop state inside a body, which ends with an implicit yield of the current state).
A draft is named by ``as:`` (default: its source); ``forward.drafts`` defaults to every draft
since the last forward in this body; verify/unmask use the last forward's logits and exactly
its drafts; commit takes the last verify/unmask result; fork the last ``draft.branches``.
Step options are the IR op's attribute fields. A value that is exactly ``"${name}"`` is replaced
by that parameter (``overrides`` replace parameter defaults); other ``${`` text is an error.

Guarantees: every failure is a ``StrategyFileError`` starting ``FILE:LINE: FIELD.PATH:``
(file-level problems name only the file); no code in the file runs (``strategy_reader``
composes YAML safely); files over 256 KiB are refused; IR verifier errors are mapped back to the
step (and option) that made the op, keeping the verifier's text. TOML lines are best-effort.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from decograph.errors import StrategyFileError, VerifyError
from decograph.frontends.strategy_reader import FieldPath, Source, read_data, short_repr
from decograph.ir import ops as O
from decograph.ir.builder import Builder
from decograph.ir.printer import print_program
from decograph.ir.verify import verify

__all__ = ["Strategy", "load_strategy_file", "load_strategy_text", "MAX_BYTES", "FORMATS"]

MAX_BYTES = 256 * 1024
MAX_LOOP_DEPTH = 8
FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # used with fullmatch: `$` would allow "\n"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = ("strategy", "description", "params", "steps")
_STEPS = ("prefill", "draft", "forward", "verify", "unmask", "commit", "iterate", "fork", "join", "emit")
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "tuple[str, ...]": "a list of strings"}


@dataclass(frozen=True)
class Strategy:
    """A loaded strategy: its verified IR ``program`` and where it came from (``source`` is a
    file path or ``builtin:NAME``). ``lossless`` holds when every verify is greedy or sampling
    and nothing is unmasked or forked, so the output is distributed exactly as the model's own decoding."""

    name: str
    description: str
    program: O.Program
    lossless: bool
    source: str

    @property
    def heads(self) -> tuple[str, ...]:
        """The draft heads its ``draft.head`` ops name: a run needs one for its model."""
        return tuple(sorted({op.head for op in self.program.walk() if isinstance(op, O.DraftHead)}))


class _Recorder(Builder):
    """The IR builder, plus the unverified program so verifier errors can be mapped to steps."""

    def unverified(self) -> O.Program:
        return O.Program(self.name, O.Block((self.prompt,), tuple(self._blocks[0])), self.params, self.description)


@dataclass
class _Scope:
    """What the implicit threading sees inside one block (the top level or an iterate body)."""

    state: O.Value | None
    top: bool
    depth: int = 0
    drafts: dict[str, O.Value] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    forward: tuple[O.Value, tuple[O.Value, ...]] | None = None
    accepted: O.Value | None = None
    branches: O.Value | None = None


class _Elaborator:
    """Walks the steps of a checked top level and records IR with the builder; remembers which
    step made each value so verifier errors can name the step's line and field path."""

    def __init__(self, src: Source, name: str, description: str, params: dict[str, Any]) -> None:
        self.src, self.params = src, params
        self.b = _Recorder(name, description)
        self.b.params = tuple(sorted(params.items()))  # set directly: a param may be called `name`
        self.paths: dict[int, FieldPath] = {}

    def err(self, path: FieldPath, msg: str) -> StrategyFileError:
        return self.src.error(path, msg)

    def record(self, value: O.Value, path: FieldPath) -> O.Value:
        self.paths[id(value)] = path
        return value

    def subst(self, value: Any, path: FieldPath) -> Any:
        """Replace a whole-value ``"${name}"`` (also inside lists) by the parameter's value."""
        if isinstance(value, list):
            return [self.subst(v, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        m = _REF.fullmatch(value)
        if m is None:
            raise self.err(path, f"{short_repr(value)}: a ${{name}} reference must be the whole value")
        if m.group(1) not in self.params:
            known = ", ".join(sorted(self.params)) or "none"
            raise self.err(path, f"unknown parameter {m.group(1)!r} in {value!r}; parameters: {known}")
        return self.params[m.group(1)]

    def convert(self, hint: str, value: Any, path: FieldPath) -> Any:
        """Check ``value`` against an op field's type hint; ints become floats for float fields."""
        if hint == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not isinstance(value, float) or math.isfinite(value):
                try:
                    return float(value)
                except OverflowError:
                    pass
            raise self.err(path, f"must be a finite number, got {short_repr(value)}")
        if hint in ("bool", "str") and type(value).__name__ == hint:
            return value
        if hint == "tuple[str, ...]" and isinstance(value, list) and all(isinstance(x, str) for x in value):
            return tuple(value)
        raise self.err(path, f"must be {_KINDS.get(hint, hint)}, got {short_repr(value)}")

    def keys(self, args: Mapping[str, Any], allowed: tuple[str, ...], path: FieldPath) -> None:
        for key in args:
            if key not in allowed:
                raise self.err(path + (key,), f"unknown key {key!r}; valid keys: {', '.join(sorted(allowed)) or 'none'}")

    def attrs(self, cls: type[O.Op], args: Mapping[str, Any], path: FieldPath, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        """The op attributes given in ``args`` (unknown keys refused, values substituted and typed)."""
        hints = {f.name: str(f.type) for f in cls.attr_fields()}
        self.keys(args, extra + tuple(hints), path)
        return {k: self.convert(hints[k], self.subst(v, path + (k,)), path + (k,)) for k, v in args.items() if k in hints}

    def choice(self, args: Mapping[str, Any], key: str, path: FieldPath, prefix: str) -> str:
        """A required variant name such as a draft source or a verify rule."""
        choices = sorted(n[len(prefix):] for n in O.OPS if n.startswith(prefix))
        if key not in args:
            raise self.err(path, f"needs `{key}:`, one of {', '.join(choices)}")
        value = self.subst(args[key], path + (key,))
        if value not in choices:
            raise self.err(path + (key,), f"{short_repr(value)} is not one of {', '.join(choices)}")
        return str(value)

    def state(self, sc: _Scope, path: FieldPath) -> O.Value:
        if sc.state is None:
            raise self.err(path, "needs a state: start the strategy with `prefill`")
        return sc.state

    def block(self, sc: _Scope, steps: Any, path: FieldPath) -> FieldPath | None:
        """Elaborate a list of steps; returns the path of an explicit top-level ``emit``."""
        if not isinstance(steps, list) or not steps:
            raise self.err(path, f"must be a non-empty list of steps, got {short_repr(steps)}")
        for i, item in enumerate(steps):
            name, args, spath = self.split(item, path + (i,))
            if name == "emit":
                self.keys(args, (), spath)
                if not sc.top or i != len(steps) - 1:
                    raise self.err(spath, "emit may only be the last step of the strategy (top level)")
                return spath
            getattr(self, "step_" + name)(sc, args, spath)
        return None

    def split(self, item: Any, path: FieldPath) -> tuple[str, dict[str, Any], FieldPath]:
        """A step is a step name, or a mapping from one step name to its options."""
        if isinstance(item, str):
            name, args = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, args = next(iter(item.items()))
        else:
            raise self.err(path, "a step is a step name or a mapping with one key, the step name; "
                           f"got {short_repr(item)}")
        if name not in _STEPS:
            raise self.err(path, f"unknown step {name!r}; steps are {', '.join(_STEPS)}")
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise self.err(path + (name,), f"options must be a mapping, got {short_repr(args)}")
        return name, args, path + (name,)

    def step_prefill(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        self.keys(args, (), path)
        if not sc.top or sc.state is not None:
            raise self.err(path, "prefill must come once, first, at the top level")
        sc.state = self.record(self.b.prefill(), path)

    def step_draft(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        source = self.choice(args, "source", path, "draft.")
        attrs = self.attrs(O.OPS[f"draft.{source}"].cls, args, path, ("source", "as"))
        name = self.subst(args.get("as", source), path + ("as",))
        if not isinstance(name, str) or not _IDENT.fullmatch(name):
            raise self.err(path + ("as",), f"must be an identifier, got {short_repr(name)}")
        if name in sc.drafts:
            raise self.err(path + ("as",), f"draft name {name!r} is already used in this body; set another `as:`")
        value = self.record(self.b.draft(source, self.state(sc, path), **attrs), path)
        sc.drafts[name] = value
        sc.pending.append(name)
        if source == "branches":
            sc.branches = value

    def step_forward(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        attrs = self.attrs(O.Forward, args, path, ("drafts",))
        names = self.subst(args["drafts"], path + ("drafts",)) if "drafts" in args else list(sc.pending)
        if not isinstance(names, list):
            raise self.err(path + ("drafts",), f"must be a list of draft names, got {short_repr(names)}")
        drafts = []
        for j, name in enumerate(names):
            if not isinstance(name, str) or name not in sc.drafts:
                known = ", ".join(sc.drafts) or "none"
                raise self.err(path + ("drafts", j), f"unknown draft {short_repr(name)}; drafts in this body: {known}")
            drafts.append(sc.drafts[name])
        logits = self.record(self.b.forward(self.state(sc, path), *drafts, **attrs), path)
        sc.forward, sc.pending = (logits, tuple(drafts)), []

    def step_verify(self, sc: _Scope, args: dict[str, Any], path: FieldPath, kind: str = "verify") -> None:
        rule = self.choice(args, "rule", path, f"{kind}.")
        attrs = self.attrs(O.OPS[f"{kind}.{rule}"].cls, args, path, ("rule",))
        state = self.state(sc, path)
        if sc.forward is None:
            raise self.err(path, f"{kind} needs a forward step before it in this body (it reads that forward's logits)")
        logits, drafts = sc.forward
        if kind == "verify":
            value = self.b.verify(rule, state, logits, *drafts, **attrs)
        else:
            value = self.b.unmask(rule, state, logits, **attrs)
        sc.accepted = self.record(value, path)

    def step_unmask(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        self.step_verify(sc, args, path, "unmask")

    def step_commit(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        attrs = self.attrs(O.Commit, args, path)
        state = self.state(sc, path)
        if sc.accepted is None:
            raise self.err(path, "commit needs a verify or unmask step before it (it appends what they accepted)")
        sc.state, sc.accepted = self.record(self.b.commit(state, sc.accepted, **attrs), path), None

    def step_fork(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        self.attrs(O.Fork, args, path)
        state = self.state(sc, path)
        if sc.branches is None:
            raise self.err(path, "fork needs a `draft: {source: branches}` step before it")
        sc.state, sc.branches = self.record(self.b.fork(state, sc.branches), path), None

    def step_join(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        attrs = self.attrs(O.Join, args, path)
        sc.state = self.record(self.b.join(self.state(sc, path), **attrs), path)

    def step_iterate(self, sc: _Scope, args: dict[str, Any], path: FieldPath) -> None:
        attrs = self.attrs(O.Iterate, args, path, ("body",))
        state = self.state(sc, path)
        if "body" not in args:
            raise self.err(path, "needs `body:`, the list of steps of one iteration")
        if sc.depth >= MAX_LOOP_DEPTH:
            raise self.err(path, f"iterate is nested more than {MAX_LOOP_DEPTH} deep")
        with self.b.iterate(state, **attrs) as loop:
            inner = _Scope(loop.state, top=False, depth=sc.depth + 1)
            self.block(inner, args["body"], path + ("body",))
            loop.next(inner.state)  # the implicit yield of the body's current state
        assert loop.result is not None
        sc.state = self.record(loop.result, path)

    def program(self, steps: Any) -> O.Program:
        """Elaborate the top-level steps, add ``emit`` if missing, and verify."""
        sc = _Scope(None, top=True)
        emit_path = self.block(sc, steps, ("steps",)) or ("steps",)
        self.record(self.b.emit(self.state(sc, emit_path)), emit_path)
        program = self.b.unverified()
        try:
            return verify(program)
        except VerifyError as exc:
            raise self.verify_error(program, exc) from None

    def verify_error(self, program: O.Program, exc: VerifyError) -> StrategyFileError:
        """Name the step (and option) behind a verifier error, keeping the verifier's text."""
        text = str(exc)
        where: dict[int, int] = {}
        print_program(program, where)
        owners: dict[int, FieldPath] = {}
        for op in program.walk():
            if op.results and id(op.results[0]) in self.paths:
                owners[id(op)] = self.paths[id(op.results[0])]
            if isinstance(op, O.Iterate) and op.body.ops:
                owners[id(op.body.ops[-1])] = self.paths.get(id(op.result), ("steps",)) + ("body",)
        by_line = {line: owners.get(op_id, ("steps",)) for op_id, line in where.items()}
        m = re.match(r"verify error at line (\d+), op `[^`]*`, ([^:\n]*): ([^\n]*)", text)
        if m is None:
            return self.err(("steps",), text)
        path = by_line.get(int(m.group(1)) - 1, ("steps",))
        f = re.match(r"(field|operand) '(\w+)'", m.group(2))
        if f and (f.group(1) == "field" or f.group(2) == "drafts"):
            return self.err(path + (f.group(2),), f"{m.group(3)}\n{text}")
        return self.err(path, f"{m.group(2)}: {m.group(3)}\n{text}")


def _params(src: Source, raw: Any, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parameter defaults from the file, replaced by ``overrides`` (known names only)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise src.error(("params",), f"must be a mapping of name: value, got {short_repr(raw)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not _IDENT.fullmatch(key):
            raise src.error(("params", key), "parameter names must be identifiers")
        out[key] = _param_value(src, ("params", key), value)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise StrategyFileError(f"{src.filename}: overrides must be a mapping, got {short_repr(overrides)}")
    for key, value in (overrides or {}).items():
        if key not in out:
            known = ", ".join(sorted(out)) or "none"
            raise StrategyFileError(f"{src.filename}: unknown parameter {short_repr(key)} in overrides; parameters: {known}")
        out[key] = _param_value(src, ("overrides", key), value)
    return out


def _param_value(src: Source, path: FieldPath, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise src.error(path, f"must be a finite number, got {value!r}")
    if not isinstance(value, (str, int, float, bool)):
        raise src.error(path, f"must be a string, number or boolean, got {short_repr(value)}")
    return value


def _header(src: Source, data: Any) -> tuple[str, str]:
    """Check the top level's keys; return the strategy's name and one-line description."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise src.error((), f"the top level must be a mapping with keys {', '.join(_TOP_KEYS)}; got {got}")
    for key in data:
        if key not in _TOP_KEYS:
            raise src.error((key,), f"unknown key {key!r}; valid keys: {', '.join(_TOP_KEYS)}")
    for key in ("strategy", "description", "steps"):
        if key not in data:
            raise src.error((key,), "is required")
    name, desc = data["strategy"], data["description"]
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise src.error(("strategy",), f"must be an identifier, got {short_repr(name)}")
    if not isinstance(desc, str) or not desc.strip() or len(desc.strip().splitlines()) != 1:
        raise src.error(("description",), f"must be one non-empty line of text, got {short_repr(desc)}")
    return name, desc.strip()


def _lossless(program: O.Program) -> bool:
    """Whether the program's output is the model's greedy (or sampled) decoding of the prompt:
    no lossy check, and no fork (a fork's branches are each exact, the whole is a new text)."""
    return not any(isinstance(op, (O.VerifyThreshold, O.Fork) + O.UNMASK_OPS) for op in program.walk())


def _load(text: str, filename: str, fmt: str, overrides: Mapping[str, Any] | None, source: str) -> Strategy:
    if fmt not in ("yaml", "toml"):
        raise StrategyFileError(f"{filename}: unknown format {short_repr(fmt)}; use 'yaml' or 'toml'")
    if not isinstance(text, str):
        raise StrategyFileError(f"{filename}: expected text, got {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise StrategyFileError(f"{filename}: {size} bytes is over the {MAX_BYTES // 1024} KiB limit; refused")
    data, src = read_data(text, filename, fmt)
    name, desc = _header(src, data)
    params = _params(src, data.get("params"), overrides)
    program = _Elaborator(src, name, desc, params).program(data["steps"])
    return Strategy(name, desc, program, _lossless(program), source)


def load_strategy_text(text: str, filename: str = "<string>", fmt: str = "yaml",
                       overrides: Mapping[str, Any] | None = None, source: str | None = None) -> Strategy:
    """Load a strategy from ``text`` in ``fmt`` ("yaml" or "toml"); ``filename`` names it in
    errors and ``source`` (default: ``filename``) is recorded on the result.

    Raises only ``StrategyFileError``; an unexpected internal exception is wrapped too, its
    message saying it is a decograph bug."""
    try:
        return _load(text, filename, fmt, overrides, source if source is not None else filename)
    except StrategyFileError:
        raise
    except RecursionError:
        raise StrategyFileError(f"{filename}: nested too deeply; refused") from None
    except Exception as exc:  # the promise to callers: nothing but StrategyFileError escapes
        raise StrategyFileError(f"{filename}: internal error (a decograph bug): {type(exc).__name__}: {exc}") from exc


def load_strategy_file(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Strategy:
    """Load a ``.yaml``/``.yml``/``.toml`` strategy file (UTF-8, at most 256 KiB; larger files
    are refused before they are read whole). Raises only ``StrategyFileError``."""
    try:
        p = Path(path)
    except TypeError:
        raise StrategyFileError(f"expected a file path, got {short_repr(path)}") from None
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise StrategyFileError(f"{p}: unknown strategy file type {p.suffix!r}; use .yaml, .yml or .toml")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise StrategyFileError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise StrategyFileError(f"{p}: over the {MAX_BYTES // 1024} KiB limit; refused")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise StrategyFileError(f"{p}:{line}: not UTF-8 text ({exc.reason})") from None
    return load_strategy_text(text, str(p), fmt, overrides, source=str(p))
