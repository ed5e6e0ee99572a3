"""The package's layering (DESIGN.md, "Layout"): the import contracts in ``.importlinter``
hold, no module takes another module's private names, and no modules import each other in a
cycle. ``PENDING_*`` list what is known today and being removed; anything new fails."""
from __future__ import annotations

import ast
import io
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "decograph"

# Being removed in issue 18's runtime change; empty these as they go (nothing may be added).
# A cycle found must lie inside one of these module sets; a private import found must be
# listed here.
PENDING_CYCLES: list[frozenset[str]] = []
PENDING_PRIVATE: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the decograph modules it imports (anywhere in the file, lazy imports included),
    and every ``"<module> takes <module>.<_name>"``: a private (``_x``, not dunder) name imported
    from another module."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if not base.startswith("decograph"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in mods else base
                    if target in mods and target != m:
                        edges[m].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and full not in mods:
                        private.append(f"{m} takes {full}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods and alias.name != m:
                        edges[m].add(alias.name)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, rest = work[-1]
            w = next(rest, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_cycle_finder_finds_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}, "f": {"g"}, "g": {"f"}}
    assert sorted(map(sorted, _cycles(edges))) == [["a", "b", "c"], ["f", "g"]]


def test_no_module_takes_another_modules_private_names() -> None:
    _, private = _imports()
    new = sorted(set(private) - PENDING_PRIVATE)
    assert not new, ("private names imported from another module; make them public (no leading "
                     "underscore) or move the shared piece:\n  " + "\n  ".join(new))


def test_no_import_cycles() -> None:
    edges, _ = _imports()
    new = [c for c in _cycles(edges) if not any(c <= known for known in PENDING_CYCLES)]
    assert not new, ("modules that import each other (lazy imports count): "
                     + "; ".join(" <-> ".join(sorted(c)) for c in new))


def test_import_contracts_hold() -> None:
    """``.importlinter``'s contracts: the layers, the library below the apps and tools, the IR
    on nothing but ``decograph.errors``, the IR and the passes free of torch and numpy, the runtime
    free of torch and transformers."""
    from importlinter.cli import lint_imports

    out = io.StringIO()
    with redirect_stdout(out):
        code = lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True, no_logo=True)
    assert code == 0, out.getvalue()
    assert "5 kept, 0 broken" in out.getvalue(), out.getvalue()
