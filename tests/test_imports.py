"""Which way imports run (../ARCHITECTURE map): `encoders` <- `vlm` <- `train`, `eval` needs `vlm` only, no cycles.

Read from the source with `ast`, so imports inside functions count too. `python tests/test_imports.py` prints the
graph: one line per folder-level direction with how many module imports take it, then every module's imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed name -> folder: encoders/, train/ and eval/ install inside the vlm package (pyproject.toml).
FOLDERS = {"vlm.encoders": "encoders", "vlm.train": "train", "vlm.eval": "eval", "vlm": "vlm"}
# Folder -> the folders its modules may import.
ALLOWED = {"encoders": set(), "vlm": {"encoders"}, "train": {"vlm", "encoders"}, "eval": {"vlm", "encoders"}}
CLI_MODULES = {"vlm.cli", "vlm.commands"}  # the console script: reached by name from vlm.cli, imported by no one


def modules() -> dict[str, Path]:
    found = {}
    for name, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def folder_of(module: str) -> str:
    for name, folder in FOLDERS.items():  # vlm.encoders before vlm
        if module == name or module.startswith(name + "."):
            return folder
    raise KeyError(module)


def imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name the module imports (`from a.b import c` gives a.b and a.b.c), anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
    return names


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name is resolved to the longest module it starts with)."""
    mods = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in mods.items():
        for name in imported_names(module, path):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges[module].add(name)
    return edges


def bare_imports() -> list[str]:
    """Imports of `train`, `eval` or `encoders` as top-level packages: they exist only in a source checkout."""
    bad = []
    for module, path in modules().items():
        for name in imported_names(module, path):
            if name.split(".")[0] in ("train", "eval", "encoders"):
                bad.append(f"{module} imports {name}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            src, dst = folder_of(module), folder_of(target)
            if src != dst and dst not in ALLOWED[src]:
                bad.append(f"{module} -> {target} ({src}/ may not import {dst}/)")
            if target in CLI_MODULES and module not in CLI_MODULES:
                bad.append(f"{module} -> {target} (the CLI module is imported by no one)")
            if module == "vlm.eval.metrics" and target != "vlm.answers":
                bad.append(f"{module} -> {target} (metrics need only vlm.answers)")
    return bad


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_imports_run_one_way():
    assert wrong_way(graph()) == []


def test_no_bare_top_level_imports():
    assert bare_imports() == []


def test_the_checks_catch_what_they_guard_against():
    """A cycle, a wrong-way import and a CLI import planted in a copy of the graph are all reported."""
    edges = {k: set(v) for k, v in graph().items()}
    edges.setdefault("vlm.config", set()).add("vlm.model")  # vlm.model imports vlm.config: a cycle
    edges["vlm.model"].add("vlm.train.module")
    edges.setdefault("vlm.eval.metrics", set()).add("vlm.inference")
    edges["vlm.eval.bench"].add("vlm.commands")
    assert any({"vlm.config", "vlm.model"} <= set(c) for c in cycles(edges))
    problems = "\n".join(wrong_way(edges))
    assert "vlm.model -> vlm.train.module (vlm/ may not import train/)" in problems
    assert "vlm.eval.metrics -> vlm.inference" in problems
    assert "vlm.eval.bench -> vlm.commands (the CLI module is imported by no one)" in problems


def test_captioning_imports_no_training_or_metrics_stack():
    """What `vlm caption` imports (commands, checkpoint loading, generation) and `vlm import-ckpt` (a file
    conversion) pull in no Lightning, datasets or caption-metric code, measured in a fresh interpreter."""
    code = (
        "import sys, vlm.commands, vlm.checkpoint, vlm.generation, vlm.inference, vlm.training_ckpt\n"
        "print(' '.join(m for m in ('lightning', 'datasets', 'pycocoevalcap', 'vlm.train', 'vlm.eval') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def main() -> None:
    edges = graph()
    between: dict[tuple[str, str], int] = defaultdict(int)
    for module, targets in edges.items():
        for target in targets:
            if folder_of(module) != folder_of(target):
                between[folder_of(module), folder_of(target)] += 1
    print("folder -> folder: module imports")
    for (src, dst), n in sorted(between.items()):
        print(f"  {src}/ -> {dst}/: {n}")
    print("cycles:", cycles(edges) or "none")
    print("wrong-way imports:", *(wrong_way(edges) or ["none"]), sep="\n  ")
    print("modules:")
    for module in sorted(edges):
        print(f"  {module} -> {', '.join(sorted(edges[module]))}")


if __name__ == "__main__":
    main()
