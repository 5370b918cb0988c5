"""The package's declared layering, checked statically (../shared/DESIGN.md, Layering).

Every ``.py`` file under ``src/swinssl`` is parsed with :mod:`ast` (nothing is imported) and each import
of a ``swinssl`` module becomes an edge ``importer -> imported``. Two checks run on that graph and fail
separately, each listing the offending edges with file and line:

- ``test_no_import_cycles``: no strongly connected component of more than one module;
- ``test_no_forbidden_arrows``: no edge whose layers appear in ``FORBIDDEN`` below.

``test_checker_on_synthetic_package`` runs the same checker on a small package built in ``tmp_path``
with known violations, so that the checker itself cannot silently pass.

What counts as an import (the choices this file makes):

- ``import`` / ``from ... import`` statements anywhere in a module: top level, inside functions,
  classes, ``try`` blocks, and so on. Relative imports are resolved against the importing module.
- Only targets inside the package count: ``__future__``, the standard library and third-party modules
  are ignored.
- Imports under ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:`` do NOT count (they never run); their
  ``else`` branch does.
- Dynamic imports (``importlib.import_module``, ``__import__``) are not seen.
- ``swinssl.pkg`` (its ``__init__``) is a module of its own. ``import swinssl.a.b`` and
  ``from swinssl.a.b import name`` give one edge, to ``swinssl.a.b``.
- ``from swinssl.a import b`` where ``b`` is a submodule gives an edge to ``swinssl.a.b`` AND one to
  ``swinssl.a``: the statement names ``swinssl.a`` and reads ``b`` from its namespace, so it depends on
  ``swinssl/a/__init__.py``. That is the edge behind ``methods/__init__ <-> methods/swinfuse``.
- The implicit edge to the parent package that Python executes first (``swinssl.a`` for
  ``import swinssl.a.b``) is NOT counted: every submodule of a re-exporting ``__init__`` (``nn``, ``ssl``,
  ``methods``) would then form a cycle with it, burying real cycles in noise, and it catches none of
  the cycles the design cares about (those between sibling modules and across layers).
- A module importing itself (``methods/__init__`` doing ``from swinssl.methods import ...``) is no cycle.

Layer of a module: the first component after ``swinssl.`` (``swinssl.nn.load`` is in ``nn``); top-level
modules (``swinssl.infer``, ``swinssl.cli``, ``swinssl.config``, ...) are each their own layer, and
``swinssl`` itself (``swinssl/__init__.py``) is layer ``swinssl``. Imports within a layer are always allowed.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

# The declared layering: layer -> layers it must never import (see ../shared/DESIGN.md, Layering).
# Workflows (demo, studies, verdict, estimate) sit above the engine, inference, metrics and report, below the CLI.
ABOVE_THE_ENGINE = frozenset({"workflows", "cli"})
EVERY_LAYER = frozenset({"engine", "data", "nn", "ssl", "methods", "infer", "metrics", "cli", "workflows", "report",
                         "nnunet", "config", "plan", "runs", "plots", "utils", "runtime", "checkpoint", "results",
                         "bundle"})


def _leaf(*may_use: str) -> frozenset[str]:
    """A layer that may import only ``may_use`` (and ``errors``, which imports nothing of the package)."""
    return EVERY_LAYER - frozenset(may_use)


FORBIDDEN: dict[str, frozenset[str]] = {
    "nn": frozenset({"engine", "data", "ssl", "methods", "infer", "metrics", "report", "runs", "plots"}) | ABOVE_THE_ENGINE,
    "data": frozenset({"nn", "engine", "ssl", "methods", "infer", "metrics", "report", "plan", "checkpoint", "results"})
    | ABOVE_THE_ENGINE,
    "ssl": frozenset({"engine", "methods", "infer", "data", "report", "checkpoint"}) | ABOVE_THE_ENGINE,
    "methods": frozenset({"engine", "infer", "report", "data", "checkpoint"}) | ABOVE_THE_ENGINE,
    "engine": frozenset({"infer", "report", "nnunet"}) | ABOVE_THE_ENGINE,
    "metrics": frozenset({"engine", "nn", "ssl", "methods", "infer", "report"}) | ABOVE_THE_ENGINE,
    "infer": frozenset({"engine", "report"}) | ABOVE_THE_ENGINE,
    # The nnU-Net bridge uses the network, the loader, plans and transforms; nnU-Net runs the training.
    "nnunet": frozenset({"engine", "methods", "ssl", "infer", "report"}) | ABOVE_THE_ENGINE,
    # The HTML report reads what the other stages wrote through the formats' owners (volumes, run folders,
    # checkpoints, prediction and evaluation folders); it runs no network, loss, training or prediction.
    "report": frozenset({"engine", "nn", "ssl", "methods", "infer", "nnunet"}) | ABOVE_THE_ENGINE,
    "workflows": frozenset({"cli"}),
    "cli": frozenset(),
    # Leaves that every layer may use: each imports only what is named.
    "config": _leaf("utils"),
    "utils": _leaf(),
    "runtime": _leaf(),
    "errors": _leaf(),
    "plan": _leaf("config", "utils"),
    "runs": _leaf("utils"),
    "checkpoint": _leaf("plan", "runs", "utils", "config"),
    "results": _leaf("utils"),
    "plots": _leaf("utils"),
    # A deployment bundle's runtime is copied into the bundle: it imports nothing of swinssl (nor torch or
    # MONAI: tests/test_bundle.py).
    "bundle": _leaf("bundle"),
}

# Stage modules: the stages that the runner runs, and the probe beside them. Siblings: none imports
# another, and only the CLI and workflows import them.
STAGE_MODULES = frozenset({"swinssl.engine.pretrain", "swinssl.engine.finetune", "swinssl.engine.probe"})
STAGE_USERS = frozenset({"cli", "workflows"})


PACKAGE = "swinssl"
REPO_ROOT = Path(__file__).resolve().parents[1]
SRC_ROOT = REPO_ROOT / "src"


# --------------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Edge:
    importer: str
    imported: str
    file: str  # path relative to the scanned root's parent, for messages
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported}  ({self.file}:{self.line})"


def layer_of(module: str) -> str:
    """``swinssl.nn.load`` -> ``nn``; ``swinssl.infer`` -> ``infer``; ``swinssl`` -> ``swinssl``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def discover_modules(src_root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``src_root/package``."""
    modules = {}
    for path in sorted((src_root / package).rglob("*.py")):
        parts = list(path.relative_to(src_root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree: ast.AST):
    """Every Import / ImportFrom node in the tree, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def collect_edges(src_root: Path, package: str) -> tuple[dict[str, Path], list[Edge]]:
    """Parse every module of ``package`` under ``src_root``; return its modules and import edges."""
    modules = discover_modules(src_root, package)
    edges: set[Edge] = set()
    for module, path in modules.items():
        is_pkg = path.name == "__init__.py"
        rel = path.relative_to(src_root.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_statements(tree):
            targets: set[str] = set()
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            else:
                if node.level:  # relative: resolve against this module's package
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.add(source)
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:  # `from pkg import submodule`
                        targets.add(f"{source}.{alias.name}")
            for target in targets:
                if _in_package(target, package) and target != module:
                    edges.add(Edge(module, target, rel, node.lineno))
    return modules, sorted(edges)


def _strongly_connected(nodes: set[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside the component (BFS)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ()) & members):
            if w == start:
                path = [v]  # walk back v -> ... -> start, then reverse
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if w not in seen:
                seen.add(w)
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in a component but on no cycle")


@dataclass(frozen=True)
class Cycle:
    members: tuple[str, ...]
    path: tuple[str, ...]  # one shortest cycle through the first member, e.g. (a, b, a)
    edges: tuple[Edge, ...]  # every import statement between two members

    def __str__(self) -> str:
        lines = [
            f"Import cycle among {len(self.members)} modules: {', '.join(self.members)}",
            f"  cycle: {' -> '.join(self.path)}",
            "  edges inside the cycle:",
        ]
        return "\n".join(lines + [f"    {edge}" for edge in self.edges])


def find_cycles(modules: dict[str, Path], edges: list[Edge]) -> list[Cycle]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    nodes = set(modules) | {e.imported for e in edges}
    cycles = []
    for component in _strongly_connected(nodes, graph):
        if len(component) < 2:
            continue
        members = set(component)
        inside = tuple(e for e in edges if e.importer in members and e.imported in members)
        path = _shortest_cycle(component[0], members, graph)
        cycles.append(Cycle(tuple(component), tuple(path), inside))
    return sorted(cycles, key=lambda c: c.members)


def find_forbidden(edges: list[Edge], forbidden: dict[str, frozenset[str]]) -> list[Edge]:
    return [e for e in edges if layer_of(e.imported) in forbidden.get(layer_of(e.importer), ())]


def format_forbidden(bad: list[Edge]) -> str:
    lines = [f"{len(bad)} forbidden import(s) (layer -> layer: importer -> imported  (file:line)):"]
    lines += [f"  {layer_of(e.importer)} -> {layer_of(e.imported)}: {e}" for e in bad]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The checks on swinssl
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swinssl_graph():
    assert (SRC_ROOT / PACKAGE / "__init__.py").is_file(), f"package not found under {SRC_ROOT}"
    modules, edges = collect_edges(SRC_ROOT, PACKAGE)
    return modules, edges


def test_scan_sees_the_package(swinssl_graph):
    """Guard against a vacuous pass: every file is a module and the graph has real edges."""
    modules, edges = swinssl_graph
    n_files = len(list((SRC_ROOT / PACKAGE).rglob("*.py")))
    assert len(modules) == n_files
    assert {"swinssl", "swinssl.nn.load", "swinssl.engine.pretrain", "swinssl.cli"} <= set(modules)
    importers = {e.importer for e in edges}
    assert {"swinssl.cli", "swinssl.engine.pretrain", "swinssl.infer"} <= importers
    # an import inside a function body is seen (the CLI imports what its commands call lazily)
    assert any(e.importer == "swinssl.cli.train" and layer_of(e.imported) == "engine" for e in edges)


def test_no_import_cycles(swinssl_graph):
    modules, edges = swinssl_graph
    cycles = find_cycles(modules, edges)
    if cycles:
        pytest.fail(
            f"{len(cycles)} import cycle(s) in {PACKAGE} (../shared/DESIGN.md, Layering):\n\n"
            + "\n\n".join(str(c) for c in cycles),
            pytrace=False,
        )


def test_no_forbidden_arrows(swinssl_graph):
    _, edges = swinssl_graph
    bad = find_forbidden(edges, FORBIDDEN)
    if bad:
        pytest.fail(
            f"{PACKAGE} breaks the declared layering (FORBIDDEN in {Path(__file__).name}, "
            f"../shared/DESIGN.md, Layering):\n" + format_forbidden(bad),
            pytrace=False,
        )


def test_only_the_cli_and_workflows_import_a_stage(swinssl_graph):
    _, edges = swinssl_graph
    bad = [str(e) for e in edges if e.imported in STAGE_MODULES and layer_of(e.importer) not in STAGE_USERS]
    assert not bad, f"a stage module imported below the CLI and workflows (STAGE_MODULES): {bad}"


def test_every_layer_has_rules(swinssl_graph):
    """A new top-level module or package gets its rules here when it lands, not by default none."""
    modules, _ = swinssl_graph
    layers = {layer_of(m) for m in modules} - {"swinssl"}
    assert layers <= set(FORBIDDEN), f"layers without rules in FORBIDDEN: {sorted(layers - set(FORBIDDEN))}"


def third_party_importers(src_root: Path, package: str, name: str) -> list[str]:
    """``file:line`` of every import of the third-party package ``name`` (or its submodules) in ``package``."""
    found = []
    for module, path in discover_modules(src_root, package).items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_statements(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if not getattr(node, "level", 0) and any(n == name or n.startswith(name + ".") for n in names):
                found.append(f"{path.relative_to(src_root.parent).as_posix()}:{node.lineno}")
    return found


def test_only_the_nnunet_bridge_imports_nnunet():
    """nnU-Net is an optional extra (swinssl[nnunet]): only ``swinssl.nnunet`` may import it, and only the
    bridge's trainer, normalisation and export modules, which nnU-Net or ``swinssl nnunet export`` load."""
    importers = third_party_importers(SRC_ROOT, PACKAGE, "nnunetv2")
    assert importers, "the bridge imports nnunetv2 somewhere; the scan saw none"
    allowed = {f"src/{PACKAGE}/nnunet/{name}.py" for name in ("trainer", "normalization", "export")}
    outside = [where for where in importers if where.rsplit(":", 1)[0] not in allowed]
    assert not outside, f"nnunetv2 imported outside the bridge's nnU-Net-side modules: {outside}"


def test_nothing_but_the_cli_and_the_benchmark_import_the_nnunet_bridge(swinssl_graph):
    """The CLI's ``swinssl nnunet`` commands, and the benchmark study's nnU-Net arm (only its ``arm``)."""
    _, edges = swinssl_graph
    users = [str(e) for e in edges if layer_of(e.imported) == "nnunet" and layer_of(e.importer) not in ("nnunet", "cli")
             and (e.importer, e.imported) != ("swinssl.workflows.benchmark", "swinssl.nnunet.arm")]
    assert not users, f"the nnU-Net bridge is imported outside the CLI and the benchmark's nnU-Net arm: {users}"


# --------------------------------------------------------------------------------------------------
# The checker, on a package with known violations
# --------------------------------------------------------------------------------------------------

TOY_FILES = {
    "__init__.py": '"""toy root"""\n__version__ = "0"\n',
    "config.py": "import json\n",
    # re-exporting __init__: no cycle with its submodules (implicit parent edges are not counted)
    "nn/__init__.py": "from toypkg.nn.a import A\n",
    "nn/a.py": """\
        from __future__ import annotations

        import os
        import typing
        from typing import TYPE_CHECKING

        import numpy
        import toypkgextra
        from toypkg.nn.b import make

        if TYPE_CHECKING:
            from toypkg.engine import loop
        if typing.TYPE_CHECKING:
            import toypkg.infer
        else:
            import toypkg.config


        class A:
            pass
        """,
    # cycle nn.a <-> nn.b through a relative import inside a function
    "nn/b.py": """\
        def make():
            from .a import A

            return A
        """,
    # forbidden nn -> ssl through `from pkg import submodule` (two edges: ssl and ssl.losses)
    "nn/c.py": "from ..ssl import losses\n",
    "ssl/__init__.py": "",
    "ssl/losses.py": "import toypkg.config\nimport torch\n",
    # cycle methods <-> methods.m1 through `from toypkg.methods import m2` in m1; self-import ignored
    "methods/__init__.py": "from toypkg.methods import m1, m2\n",
    "methods/m1.py": "from toypkg.methods import m2\nfrom toypkg.nn import A\n",
    "methods/m2.py": "from toypkg.ssl.losses import *\n",
    # engine is a namespace package (no __init__); forbidden engine -> infer inside a method
    "engine/loop.py": """\
        from toypkg.methods.m1 import m2


        class Loop:
            def run(self):
                import toypkg.infer as inf

                return inf
        """,
    "infer.py": "from toypkg import nn\nfrom toypkg.nn.a import A\n",
}


def _write_toy(root: Path, files: dict[str, str]) -> Path:
    src = root / "src"
    for rel, text in files.items():
        path = src / "toypkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return src


def test_checker_on_synthetic_package(tmp_path):
    src = _write_toy(tmp_path, TOY_FILES)
    modules, edges = collect_edges(src, "toypkg")

    assert set(modules) == {
        "toypkg", "toypkg.config", "toypkg.nn", "toypkg.nn.a", "toypkg.nn.b", "toypkg.nn.c",
        "toypkg.ssl", "toypkg.ssl.losses", "toypkg.methods", "toypkg.methods.m1", "toypkg.methods.m2",
        "toypkg.engine.loop", "toypkg.infer",
    }  # fmt: skip
    # every edge, exactly: no __future__/stdlib/third-party/`toypkgextra`, no TYPE_CHECKING body,
    # the `else:` branch counted, relative and in-function imports resolved, no self-edge
    got = {(e.importer, e.imported, e.line) for e in edges}
    assert got == {
        ("toypkg.nn", "toypkg.nn.a", 1),
        ("toypkg.nn.a", "toypkg.nn.b", 9),
        ("toypkg.nn.a", "toypkg.config", 16),
        ("toypkg.nn.b", "toypkg.nn.a", 2),
        ("toypkg.nn.c", "toypkg.ssl", 1),
        ("toypkg.nn.c", "toypkg.ssl.losses", 1),
        ("toypkg.ssl.losses", "toypkg.config", 1),
        ("toypkg.methods", "toypkg.methods.m1", 1),
        ("toypkg.methods", "toypkg.methods.m2", 1),
        ("toypkg.methods.m1", "toypkg.methods", 1),
        ("toypkg.methods.m1", "toypkg.methods.m2", 1),
        ("toypkg.methods.m1", "toypkg.nn", 2),
        ("toypkg.methods.m2", "toypkg.ssl.losses", 1),
        ("toypkg.engine.loop", "toypkg.methods.m1", 1),
        ("toypkg.engine.loop", "toypkg.infer", 6),
        ("toypkg.infer", "toypkg", 1),
        ("toypkg.infer", "toypkg.nn", 1),
        ("toypkg.infer", "toypkg.nn.a", 2),
    }

    cycles = find_cycles(modules, edges)
    assert [(c.members, c.path) for c in cycles] == [
        (("toypkg.methods", "toypkg.methods.m1"), ("toypkg.methods", "toypkg.methods.m1", "toypkg.methods")),
        (("toypkg.nn.a", "toypkg.nn.b"), ("toypkg.nn.a", "toypkg.nn.b", "toypkg.nn.a")),
    ]
    assert [str(e) for e in cycles[1].edges] == [
        "toypkg.nn.a -> toypkg.nn.b  (src/toypkg/nn/a.py:9)",
        "toypkg.nn.b -> toypkg.nn.a  (src/toypkg/nn/b.py:2)",
    ]
    assert "cycle: toypkg.nn.a -> toypkg.nn.b -> toypkg.nn.a" in str(cycles[1])

    bad = find_forbidden(edges, FORBIDDEN)
    assert [str(e) for e in bad] == [
        "toypkg.engine.loop -> toypkg.infer  (src/toypkg/engine/loop.py:6)",
        "toypkg.nn.c -> toypkg.ssl  (src/toypkg/nn/c.py:1)",
        "toypkg.nn.c -> toypkg.ssl.losses  (src/toypkg/nn/c.py:1)",
    ]
    assert "  engine -> infer: toypkg.engine.loop -> toypkg.infer" in format_forbidden(bad)


def test_checker_passes_a_clean_package(tmp_path):
    """Remove the known violations from the toy package: the checker then reports nothing."""
    files = dict(TOY_FILES)
    files["nn/b.py"] = "def make():\n    return None\n"  # breaks nn.a <-> nn.b
    files["nn/c.py"] = "from . import b\n"  # no more nn -> ssl
    files["methods/m1.py"] = "from toypkg.methods.m2 import *\nfrom toypkg.nn import A\n"  # no m1 -> methods
    files["engine/loop.py"] = "from toypkg.methods.m1 import m2\n"  # no engine -> infer
    modules, edges = collect_edges(_write_toy(tmp_path, files), "toypkg")
    assert edges
    assert find_cycles(modules, edges) == []
    assert find_forbidden(edges, FORBIDDEN) == []
