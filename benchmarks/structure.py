"""What a change touches, measured on the code: the issue-33 table, before and after.

    python benchmarks/structure.py                       # this tree
    python benchmarks/structure.py --ref 5135339         # and a commit, side by side (git worktree in /tmp)

Each row counts modules of ``src/swinssl`` that a kind of change has to touch, from the code alone
(string constants and import statements, parsed with ``ast``; docstrings are not code):

- checkpoint envelope: modules that call ``torch.save``/``torch.load`` or index a checkpoint's
  envelope keys (``["plan"]``, ``.get("step")`` ...: plan, step, kind, format, model, wall_s,
  world_size, best_dice) -- what a new envelope key or layout has to change;
- result folder: modules that name a result file in code (``metrics.csv``, ``summary.json``,
  ``predictions.json``, ``results.json``, ``folds.json``);
- new stage: modules outside the CLI and workflows that import a stage module (``engine.pretrain``,
  ``engine.finetune``, ``engine.probe``) or a whole workflow (demo, study, verdict, estimate);
- new command: the lines of the CLI file a command is added to (the largest CLI module);
- network variant: modules that tell networks apart by sniffing their fields or constructor dict
  (``.owns(``, ``network.get("multiview")``, ``["domain_invariance"]``, ``model.config``,
  ``getattr(model, "config"``);
- sizes: modules, the largest module's lines, modules over 400 lines, the longest function.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVELOPE_KEYS = {"plan", "step", "kind", "format", "model", "wall_s", "world_size", "best_dice"}
RESULT_FILES = ("metrics.csv", "summary.json", "predictions.json", "results.json", "folds.json")
STAGES = ("swinssl.engine.pretrain", "swinssl.engine.finetune", "swinssl.engine.probe", "swinssl.demo",
          "swinssl.study", "swinssl.verdict", "swinssl.engine.estimate", "swinssl.workflows.demo",
          "swinssl.workflows.study", "swinssl.workflows.verdict", "swinssl.workflows.estimate")
SNIFFS = (re.compile(r"\.owns\("), re.compile(r"""\.get\(["'](multiview|domain_invariance)["']\)"""),
          re.compile(r"""\[["'](multiview|domain_invariance)["']\]"""), re.compile(r"model\.config\b"),
          re.compile(r"""getattr\(model, ["']config["']"""), re.compile(r"""hasattr\([^)]*["']invariance["']\)"""))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def measure(package: Path) -> dict[str, object]:
    envelope, results, stages, sniffing, sizes, functions, cli_lines = set(), set(), set(), set(), {}, [], 0
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        text = path.read_text()
        tree = ast.parse(text)
        sizes[module] = len(text.splitlines())
        if _layer(module) == "cli":
            cli_lines = max(cli_lines, sizes[module])
        docs = _docstrings(tree)
        code_without_docs = text
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("save", "load") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                envelope.add(module)
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in ENVELOPE_KEYS \
                    and isinstance(node.value, ast.Name) and node.value.id in ("ckpt", "state", "checkpoint", "payload"):
                envelope.add(module)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("ckpt", "state", "checkpoint") \
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in ENVELOPE_KEYS:
                envelope.add(module)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and any(name in node.value for name in RESULT_FILES):
                results.add(module)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _layer(module) not in ("cli", "workflows"):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n in STAGES and n != module for n in names):
                    stages.add(module)
            if isinstance(node, ast.Constant) and id(node) in docs:
                code_without_docs = code_without_docs.replace(str(node.value), "")
        if any(p.search(code_without_docs) for p in SNIFFS):
            sniffing.add(module)
    longest = max(functions)
    return {
        "checkpoint envelope: modules reading or writing it": len(envelope),
        "result folder: modules naming its files": len(results),
        "new stage: modules below the CLI/workflows importing a stage or workflow (stages included)": len(stages),
        "new command: lines of the CLI file it goes into": cli_lines,
        "network variant: modules sniffing network fields": len(sniffing),
        "modules": len(sizes),
        "largest module (lines)": f"{max(sizes.values())} ({max(sizes, key=sizes.get)})",
        "modules over 400 lines": sum(v > 400 for v in sizes.values()),
        "longest function (lines)": f"{longest[0]} ({longest[1]})",
        "_detail": {"envelope": sorted(envelope), "results": sorted(results), "stages": sorted(stages),
                    "sniffing": sorted(sniffing)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="a commit to measure beside this tree")
    parser.add_argument("--detail", action="store_true", help="list the modules counted in each row")
    args = parser.parse_args()
    columns = {"this tree": measure(ROOT / "src" / "swinssl")}
    if args.ref:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", tmp, args.ref], check=True,
                           capture_output=True)
            try:
                columns = {args.ref: measure(Path(tmp) / "src" / "swinssl"), **columns}
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tmp], check=True)
    names = list(columns)
    print("| change | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in next(iter(columns.values())):
        if not row.startswith("_"):
            print(f"| {row} | " + " | ".join(str(columns[n][row]) for n in names) + " |")
    if args.detail:
        for name in names:
            print(f"\n{name}:")
            for key, modules in columns[name]["_detail"].items():
                print(f"  {key}: {', '.join(modules) or '-'}")


if __name__ == "__main__":
    main()
