"""Safe reading of strategy files: YAML or TOML text to plain data plus a line map.

``read_data(text, filename, fmt)`` returns ``(data, source)`` where ``data`` holds only dicts
(string keys), lists, str, int, float, bool and None, and ``source.line_of(path)`` gives the
1-based line of a field path such as ``("steps", 1, "iterate")`` (the closest enclosing known
field); ``source.error(path, msg)`` builds a ``FILE:LINE: PATH: msg`` error.

Guarantees: raises only ``StrategyFileError`` (``FILE:LINE: message``) and never runs code from
the file. YAML is *composed* to nodes by a SafeLoader subclass and read by hand: any tag beyond
plain strings, numbers, booleans, null, lists and mappings is refused (naming the tag and line),
as are more than ``MAX_NODES`` nodes (counted during composition and again after alias
expansion, which stops anchor bombs), nesting deeper than ``MAX_DEPTH``, merge keys and
duplicate keys. Assumption: TOML has no node positions, so ``line_of`` for TOML is best-effort
(each key is searched for in the text after the previous one); TOML syntax errors carry
tomllib's exact line. Size limits are the caller's job (see ``strategy_file.MAX_BYTES``).
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable, Union

import yaml

from decograph.errors import StrategyFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["read_data", "Source", "dotted", "short_repr", "FieldPath", "MAX_NODES", "MAX_DEPTH"]

MAX_NODES = 10_000
MAX_DEPTH = 64
FieldPath = tuple[Union[str, int], ...]
_STD = "tag:yaml.org,2002:"
_SCALAR_TAGS = ("str", "int", "float", "bool", "null", "timestamp")


def dotted(path: FieldPath) -> str:
    """``("steps", 1, "iterate")`` -> ``steps[1].iterate``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Source:
    """A file's display name and a map from field paths to 1-based lines."""

    def __init__(self, filename: str, line_of: Callable[[FieldPath], int]) -> None:
        self.filename, self.line_of = filename, line_of

    def error(self, path: FieldPath, msg: str) -> StrategyFileError:
        where = f"{self.filename}:{self.line_of(path)}"
        return StrategyFileError(f"{where}: {dotted(path)}: {msg}" if path else f"{where}: {msg}")


class _Loader(yaml.SafeLoader):
    """Composes YAML to nodes only (nothing is constructed from tags) and caps the node count."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.node_count = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.node_count += 1
        if self.node_count > MAX_NODES:
            line = self.peek_event().start_mark.line + 1
            raise _Refused(line, f"more than {MAX_NODES} YAML nodes; refused")
        return super().compose_node(parent, index)


class _Refused(Exception):
    def __init__(self, line: int, msg: str) -> None:
        super().__init__(msg)
        self.line, self.msg = line, msg


class _YamlReader:
    """Turns composed nodes into plain data, recording the line of every field path. Aliases
    are expanded here, so the expanded node count is what the cap bounds."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[FieldPath, int] = {}
        self.count = 0
        self.ctor = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node, path: FieldPath, msg: str) -> StrategyFileError:
        line = node.start_mark.line + 1
        return StrategyFileError(f"{self.filename}:{line}: {dotted(path)}: {msg}" if path else f"{self.filename}:{line}: {msg}")

    def read(self, node: yaml.Node, path: FieldPath, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(node, (), f"more than {MAX_NODES} values once aliases are expanded (an anchor bomb?); refused")
        if depth > MAX_DEPTH:
            raise self.fail(node, (), f"nested deeper than {MAX_DEPTH} levels; refused")
        self.lines.setdefault(path, node.start_mark.line + 1)
        tag = node.tag[len(_STD):] if node.tag.startswith(_STD) else node.tag
        if isinstance(node, yaml.ScalarNode) and tag in _SCALAR_TAGS:
            return self.scalar(node, path, tag)
        if isinstance(node, yaml.SequenceNode) and tag == "seq":
            return [self.read(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode) and tag == "map":
            return self.mapping(node, path, depth)
        short = "!!" + tag if node.tag.startswith(_STD) else node.tag
        raise self.fail(node, path, f"tag {short} is not allowed: strategy files hold only strings, numbers, "
                        "booleans, null, lists and mappings")

    def scalar(self, node: yaml.ScalarNode, path: FieldPath, tag: str) -> Any:
        if tag in ("str", "timestamp"):
            return node.value
        readers = {"int": self.ctor.construct_yaml_int, "float": self.ctor.construct_yaml_float,
                   "bool": self.ctor.construct_yaml_bool, "null": self.ctor.construct_yaml_null}
        try:
            return readers[tag](node)
        except Exception:  # the safe constructor raises ValueError/KeyError on odd literals
            raise self.fail(node, path, f"cannot read {short_repr(node.value)} as {tag}") from None

    def mapping(self, node: yaml.MappingNode, path: FieldPath, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _STD + "merge":
                raise self.fail(key_node, path, "merge keys (<<) are not supported")
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag[len(_STD):] not in _SCALAR_TAGS:
                self.read(key_node, path, depth + 1)  # refuses a disallowed tag by name
                raise self.fail(key_node, path, "mapping keys must be plain strings")
            key = key_node.value
            if key in out:
                raise self.fail(key_node, path + (key,), f"duplicate key {key!r} (first given at line {self.lines[path + (key,)]})")
            self.lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = self.read(value_node, path + (key,), depth + 1)
        return out


def _load_yaml(text: str, filename: str) -> tuple[Any, Callable[[FieldPath], int]]:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except _Refused as exc:
        raise StrategyFileError(f"{filename}:{exc.line}: {exc.msg}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise StrategyFileError(f"{filename}:{mark.line + 1 if mark else 1}: YAML syntax error: "
                                f"{exc.problem or exc.context or exc}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        raise StrategyFileError(f"{filename}:{line}: YAML error: {exc.reason} (character {exc.character!r})") from None
    except yaml.YAMLError as exc:
        raise StrategyFileError(f"{filename}:1: YAML error: {exc}") from None
    if node is None:
        return None, lambda path: 1
    reader = _YamlReader(filename)
    data = reader.read(node, (), 0)

    def line_of(path: FieldPath) -> int:
        while path not in reader.lines and path:
            path = path[:-1]
        return reader.lines.get(path, 1)
    return data, line_of


def _load_toml(text: str, filename: str) -> tuple[Any, Callable[[FieldPath], int]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else text.count("\n") + 1
        raise StrategyFileError(f"{filename}:{line}: TOML syntax error: {msg}") from None
    except ValueError as exc:  # tomllib lets int('9' * 5000) through
        raise StrategyFileError(f"{filename}:1: TOML error: {exc}") from None
    return data, lambda path: _toml_line(text, data, path)


def _mentions(obj: Any, word: str) -> int:
    if isinstance(obj, dict):
        return sum((k == word) + _mentions(v, word) for k, v in obj.items())
    if isinstance(obj, list):
        return sum(_mentions(v, word) for v in obj)
    return int(obj == word)


def _find(text: str, word: str, start: int, skip: int) -> int:
    w = re.escape(word)
    pattern = re.compile(rf"""(?<![\w-])(?:["']{w}["']|{w}(?=\s*(?:=|\]|\.\w)))""")
    for i, m in enumerate(pattern.finditer(text, start)):
        if i == skip:
            return m.start()
    return start


def _first_word(item: Any) -> str | None:
    """What a list item is found by: a string step's text or a mapping's first key."""
    if isinstance(item, str):
        return item
    return next(iter(item), None) if isinstance(item, dict) else None


def _toml_line(text: str, data: Any, path: FieldPath) -> int:
    """Best-effort line of ``path``: search for each key in turn after the previous one; for a
    list index, skip the occurrences of the next key inside the earlier items."""
    pos, node = 0, data
    for i, part in enumerate(path):
        try:
            child = node[part]
        except (KeyError, IndexError, TypeError):
            break
        nxt = path[i + 1] if i + 1 < len(path) else None
        if isinstance(part, str):
            pos = _find(text, part, pos, 0)
        else:
            word = nxt if isinstance(nxt, str) else _first_word(child)
            if isinstance(word, str):
                pos = _find(text, word, pos, sum(_mentions(node[j], word) for j in range(part)))
        node = child
    return text.count("\n", 0, pos) + 1


def read_data(text: str, filename: str, fmt: str) -> tuple[Any, Source]:
    """Parse ``text`` as ``fmt`` ("yaml" or "toml"); see the module docstring."""
    try:
        data, line_of = (_load_yaml if fmt == "yaml" else _load_toml)(text, filename)
        return data, Source(filename, line_of)
    except RecursionError:
        raise StrategyFileError(f"{filename}:1: nested too deeply; refused") from None
