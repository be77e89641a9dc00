"""The package's import graph has no cycle (docs/ARCHITECTURE.md, "Module graph").

The graph is read from the source (``ast``), function-level imports included: a cycle hidden in a
function is still a cycle in the design.  Units are the subpackages (``format/``, ``measure/``, ...)
and the top-level modules.  ``python tests/test_layering.py`` prints the graph the document shows.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "igvm_builder"


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "igvm_builder"
    return parts[0] + "/" if (PACKAGE / parts[0]).is_dir() else parts[0]


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def import_graph() -> dict[str, dict[str, str]]:
    """unit -> {unit it imports: "top" (at import time), "lazy" (in functions only) or "types"}."""
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    rank = {"types": 0, "lazy": 1, "top": 2}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("igvm_builder", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        typing_only = {id(m) for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for m in ast.walk(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "igvm_builder":
                targets = ([f"igvm_builder.{a.name}" if _is_module(a.name) else "igvm_builder" for a in node.names]
                           if node.module == "igvm_builder" else [node.module])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "igvm_builder"]
            else:
                continue
            kind = "types" if id(node) in typing_only else "top" if id(node) in top else "lazy"
            for target in targets:
                a, b = _unit(module), _unit(target)
                if a != b and rank[kind] > rank.get(edges[a].get(b, ""), -1):
                    edges[a][b] = kind
    return edges


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every strongly connected group of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def render(edges: dict[str, dict[str, str]]) -> str:
    width = max(len(a) for a in edges)
    lines = []
    for a in sorted(edges):
        outs = [b + ("" if kind == "top" else f" ({kind})") for b, kind in sorted(edges[a].items())]
        lines.append(f"{a:<{width}} -> {', '.join(outs)}")
    return "\n".join(lines)


def test_no_package_cycle() -> None:
    edges = import_graph()
    assert "format/" in edges and "measure/" in edges  # the graph was read
    assert cycles(edges) == []


def test_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b": "top"}, "b": {"c": "lazy"}, "c": {"a": "top"}, "d": {"a": "top"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": "top"}, "b": {}}) == []


def test_the_core_imports_no_front_end() -> None:
    """format/ and measure/ are used by everything: they import nothing above them."""
    edges = import_graph()
    for low in ("format/", "measure/", "errors", "sev_vmsa"):
        above = set(edges.get(low, {})) & {"assemble/", "build", "sign/", "commands/", "cli", "scons/", "repro", "diff", "lint"}
        assert not above, (low, above)


if __name__ == "__main__":
    print(render(import_graph()))
