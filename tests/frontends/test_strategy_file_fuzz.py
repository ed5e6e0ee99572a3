"""Fuzzing: random text and random mutations of the built-in files only ever give a Strategy
or a StrategyFileError (never a yaml/KeyError/TypeError/VerifyError, never an internal error)."""
from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decograph.errors import StrategyFileError
from decograph.frontends.strategies import builtin_names, builtin_path
from decograph.frontends.strategy_file import Strategy, load_strategy_text

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILES = {name: (builtin_path(name).name, builtin_path(name).read_text()) for name in builtin_names()}
SYNTAX = st.sampled_from(list(":-[]{},&*!#|>'\"${}=.\n\t ") + ["!!python/object/apply:os.system", "${window}", "- ",
                                                               "\n  ", "<<: ", "&a ", "*a", "[[steps]]", "= {", "0", "-1",
                                                               "1e999", "nan", "true", "null", "~", "9" * 30])
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                   st.text(max_size=12), st.sampled_from(["${window}", "${nope}", "greedy", "tree", "jacobi", "eos"]),
                   st.lists(st.sampled_from(["guess", "pool", "jacobi", "eos", "x"]), max_size=3), st.just({}))


def check(text: str, filename: str, fmt: str) -> None:
    try:
        result = load_strategy_text(text, filename, fmt=fmt)
    except StrategyFileError as exc:
        assert "internal error" not in str(exc), str(exc)
        assert str(exc).startswith(filename), str(exc)
    else:
        assert isinstance(result, Strategy)


@FUZZ
@given(st.text(max_size=400), st.sampled_from(["yaml", "toml"]))
def test_random_text(text: str, fmt: str) -> None:
    check(text, f"fuzz.{fmt}", fmt)


@FUZZ
@given(st.sampled_from(sorted(FILES)), st.data())
def test_text_mutations_of_builtins(name: str, data: st.DataObject) -> None:
    filename, text = FILES[name]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 12)))
        text = text[:i] + data.draw(st.one_of(st.just(""), SYNTAX, st.text(max_size=6))) + text[j:]
    check(text, filename, "toml" if filename.endswith(".toml") else "yaml")


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        out += _paths(value, path + (key,))
    return out


@FUZZ
@given(st.sampled_from([n for n in sorted(FILES) if not FILES[n][0].endswith(".toml")]), st.data())
def test_structural_mutations_of_builtins(name: str, data: st.DataObject) -> None:
    filename, text = FILES[name]
    tree = yaml.safe_load(text)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(tree)[1:]))
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = data.draw(LEAVES)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["as", "mask", "window", "rule", "body", "k", "x"]))] = data.draw(LEAVES)
        elif action == "duplicate" and isinstance(parent, list):
            parent.insert(path[-1], parent[path[-1]])
    check(yaml.safe_dump(tree, sort_keys=False), filename, "yaml")
