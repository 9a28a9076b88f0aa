#!/usr/bin/env python
"""The import map of ``core/``: modules, their sizes, who imports whom, floors and circles.

    python bench/import_map.py            # summary table and the largest modules
    python bench/import_map.py --edges    # also every import edge, one per line

A module's *floor* is the length of the longest chain of ``core`` imports below it (a module
that imports nothing from ``core`` is on floor 0). Imports inside functions count too (they
are marked lazy in ``--edges``): a circle through a lazy import is still a circle in the
design. Importing a name from a package (``from core.render import X``) is an edge to the
package's ``__init__``; a package's ``__init__`` is an edge to what it imports.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Module:
    name: str               # dotted, e.g. "core.fit.fitter"
    path: str
    lines: int
    is_package: bool
    imports: Dict[str, bool] = field(default_factory=dict)   # target -> lazy (all lazy)


def _module_name(root: str, path: str) -> Tuple[str, bool]:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
    if rel[-1] == "__init__":
        return ".".join(rel[:-1]), True
    return ".".join(rel), False


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (before looking at the imported names)."""
    if node.level == 0:
        return node.module or ""
    parts = module.name.split(".")
    base = parts if module.is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: str) -> Dict[str, Module]:
    """Every ``.py`` file under ``root`` (the ``core`` folder) with its ``core`` imports."""
    modules: Dict[str, Module] = {}
    trees: Dict[str, ast.Module] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            name, is_pkg = _module_name(root, path)
            modules[name] = Module(name, path, text.count("\n"), is_pkg)
            trees[name] = ast.parse(text)
    top = os.path.basename(root)
    for m in modules.values():
        lazy_nodes: Set[int] = set()
        for node in ast.walk(trees[m.name]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        lazy_nodes.add(id(sub))
        for node in ast.walk(trees[m.name]):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(m, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                if not (t == top or t.startswith(top + ".")):
                    continue
                while t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != m.name:
                    lazy = id(node) in lazy_nodes
                    m.imports[t] = m.imports.get(t, True) and lazy
    return modules


def circles(modules: Dict[str, Module]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(1000, 10 * len(modules)))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in modules[v].imports:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return out


def floors(modules: Dict[str, Module]) -> Dict[str, int]:
    """Longest import chain below each module (modules in a circle share one floor)."""
    memo: Dict[str, int] = {}
    busy: Set[str] = set()

    def floor(v: str) -> int:
        if v in memo:
            return memo[v]
        if v in busy:          # a circle: do not loop
            return 0
        busy.add(v)
        f = 1 + max((floor(w) for w in modules[v].imports), default=-1)
        busy.discard(v)
        memo[v] = f
        return f

    return {v: floor(v) for v in sorted(modules)}


def wing_of(name: str, modules: Dict[str, "Module"]) -> str:
    """The wing (sub-package of the top package) a module belongs to; "ground" for the
    top package's own modules."""
    parts = name.split(".")
    if len(parts) >= 2 and modules.get(".".join(parts[:2])) is not None and modules[".".join(parts[:2])].is_package:
        return parts[1]
    return "ground"


def wing_graph(modules: Dict[str, "Module"]) -> Dict[str, Set[str]]:
    """wing -> the other wings its modules import."""
    out: Dict[str, Set[str]] = {}
    for n, m in modules.items():
        a = wing_of(n, modules)
        out.setdefault(a, set())
        for t in m.imports:
            b = wing_of(t, modules)
            if b != a:
                out[a].add(b)
    return out


def summary(root: str) -> Dict[str, object]:
    """The figures the architecture note quotes (also used by tests/test_architecture.py)."""
    modules = scan(root)
    fl = floors(modules)
    wg = wing_graph(modules)
    wing_modules = {w: Module(w, "", 0, True, {t: False for t in ts}) for w, ts in wg.items()}
    return {
        "wing_edges": {w: sorted(ts) for w, ts in sorted(wg.items())},
        "wing_circles": circles(wing_modules),
        "wing_floors": floors(wing_modules),
        "modules": len(modules),
        "edges": sum(len(m.imports) for m in modules.values()),
        "floors": 1 + max(fl.values(), default=-1),
        "circles": circles(modules),
        "wings": sorted(set(wg) - {"ground"}),
        "top_level": sorted(n for n, m in modules.items() if n.count(".") == 1 and not m.is_package),
        "largest": sorted(((m.lines, n) for n, m in modules.items()), reverse=True),
        "floor_of": fl,
        "modules_by_name": modules,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.join(REPO, "core"))
    ap.add_argument("--edges", action="store_true", help="print every import edge")
    ap.add_argument("--top", type=int, default=8, help="how many of the largest modules to list")
    args = ap.parse_args(argv)
    s = summary(args.root)
    print("| figure | value |\n|---|---:|")
    print(f"| files (modules and package __init__) | {s['modules']} |")
    print(f"| import edges inside core | {s['edges']} |")
    print(f"| floors (longest import chain + 1) | {s['floors']} |")
    print(f"| import circles | {len(s['circles'])} |")
    print(f"| wings (sub-packages) | {len(s['wings'])}: {', '.join(s['wings']) or '-'} |")
    print(f"| modules flat in core/ (the ground floor) | {len(s['top_level'])} |")
    print(f"| import circles between wings | {len(s['wing_circles'])} |")
    print(f"| wing floors (ground = 0) | {1 + max(s['wing_floors'].values(), default=-1)} |")
    over = [(n, l) for l, n in s["largest"] if l > 500]
    print(f"| modules over 500 lines | {len(over)} |")
    print()
    print("largest: " + ", ".join(f"{n} {l}" for l, n in s["largest"][:args.top]))
    for w, ts in sorted(s["wing_edges"].items(), key=lambda kv: (s["wing_floors"][kv[0]], kv[0])):
        print(f"wing {w} (floor {s['wing_floors'][w]}) imports: {', '.join(ts) or '-'}")
    for c in s["circles"]:
        print("circle: " + " -> ".join(c))
    if args.edges:
        for n, m in sorted(s["modules_by_name"].items()):
            for t, lazy in sorted(m.imports.items()):
                print(f"{n} (floor {s['floor_of'][n]}) -> {t}{' (lazy)' if lazy else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
