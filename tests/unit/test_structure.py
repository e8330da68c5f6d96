"""The package's structure rules, checked on its source: no import cycles between modules or
between packages (imports inside functions count), no experiment imported by the browser or
the converter, no private name used outside its module, one module importing
HookedTransformer, an explicit ``__all__`` everywhere, and no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "codebook_lens"
MAX_LINES = 80


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        name = ".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = (f, ast.parse(f.read_text()))
    return out


MODULES = _modules()


def _imported(name: str, f: Path, tree: ast.Module) -> set[str]:
    """Modules of the package (``__init__`` included) that ``name`` imports anywhere in its
    source: at the top, inside functions, under ``if``."""
    base = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                mod = ".".join(parts + ([mod] if mod else []))
            for a in node.names:
                sub = f"{mod}.{a.name}"
                deps.add(sub if sub in MODULES else mod)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in MODULES and d != name}


def _imports(name: str, f: Path, tree: ast.Module) -> set[str]:
    """:func:`_imported` without packages' ``__init__`` re-exports (not where the code lives)."""
    return {d for d in _imported(name, f, tree) if MODULES[d][0].name != "__init__.py"}


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage (``codebook_lens.fsm.demo`` -> ``fsm``), or
    the module itself for a top-level one (``codebook_lens.io`` -> ``io``)."""
    return module.split(".")[1] if "." in module else ""


def _package_graph() -> dict[str, dict[str, set[str]]]:
    """Unit -> unit it imports -> the modules that import it (an import of a package's
    ``__init__`` counts for that package)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for m, (f, tree) in MODULES.items():
        if not _unit(m):  # the package's own __init__: the top-level API, above every unit
            continue
        graph.setdefault(_unit(m), {})
        for d in _imported(m, f, tree):
            if _unit(d) and _unit(d) != _unit(m):
                graph[_unit(m)].setdefault(_unit(d), set()).add(m)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycles():
    graph = {m: _imports(m, f, t) for m, (f, t) in MODULES.items() if f.name != "__init__.py"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_package_import_cycles():
    """Subpackages and top-level modules import each other one way only (``browse`` -> ``fsm``
    -> ``browse`` through a function-level import is a cycle, though no module cycle is)."""
    graph = _package_graph()
    cycle = _cycle({u: set(deps) for u, deps in graph.items()})
    where = [sorted(graph[a][b]) for a, b in zip(cycle or [], (cycle or [])[1:])]
    assert cycle is None, f"{' -> '.join(cycle or [])} (imported by {where})"


EXPERIMENTS = {"fsm", "lm", "compare"}
"""The experiment packages: they describe themselves to the browser through the run
directory, and the converter knows nothing of them."""


@pytest.mark.parametrize("unit", ["browse", "convert"])
def test_tools_import_no_experiment(unit):
    used = {e: sorted(by) for e, by in _package_graph()[unit].items() if e in EXPERIMENTS}
    assert not used, used


def _private_uses(tree: ast.Module) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("codebook_lens"):
            out += [f"import {a.name}" for a in node.names if _private(a.name)]
            if any(_private(p) for p in (node.module or "").split(".")):
                out.append(f"from {node.module}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                out.append(f"{ast.unparse(owner)}.{node.attr}")
    return out


DOCUMENTED = {"os._exit"}  # public despite the underscore (the standard library's own docs)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_used_outside_its_module():
    # a private module (analysis/_common.py) may be used inside its own package only
    found = {}
    for m, (_f, tree) in MODULES.items():
        uses = [
            u
            for u in _private_uses(tree)
            if not (u.startswith("from ") and u[5:].rsplit(".", 1)[0] == m.rsplit(".", 1)[0])
            and u not in DOCUMENTED
        ]
        if uses:
            found[m] = uses
    assert not found, found


def test_only_backends_imports_hooked_transformer():
    importers = {
        m
        for m, (_, tree) in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith("transformer_lens")
        and any(a.name == "HookedTransformer" for a in node.names)
    }
    assert importers == {"codebook_lens.backends"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_declares_all(name):
    f, tree = MODULES[name]
    declared = [
        n
        for n in tree.body
        if isinstance(n, ast.Assign | ast.AnnAssign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in _targets(n))
    ]
    assert declared or f.name == "__main__.py", f"{f} has no __all__"


def _targets(node: ast.Assign | ast.AnnAssign) -> list[ast.expr]:
    return node.targets if isinstance(node, ast.Assign) else [node.target]


def test_no_function_over_80_lines():
    long = sorted(
        (n.end_lineno - n.lineno + 1, f"{f.relative_to(ROOT.parent)}:{n.lineno} {n.name}")
        for f, tree in MODULES.values()
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        and n.end_lineno - n.lineno + 1 > MAX_LINES
    )
    assert not long, long
