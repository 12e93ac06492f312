"""The package layering is one-way: ``lampo`` <- ``evaluation`` <- ``pipeline`` (<- ``benchmarks``,
``training_scripts``).

* ``lampo`` (the algorithm library) imports no other package of the project;
* ``evaluation`` imports ``lampo`` only: it owns what it needs to drive a model (the rollout-engine interface,
  ``evaluation/engine.py``; the tiny task its ``tiny`` benchmarks hold out, ``evaluation/tiny_task.py``), and the
  pipeline re-exports those (``pipeline.rollout``, ``pipeline.tiny.task``);
* ``pipeline`` may import both;
* ``pipeline/config.py``, the config schema, is a leaf: it imports no module of the project, so any package may read the
  schema and no registry or backend is needed to load a config (the names are checked by
  ``pipeline.validate.validate_names``);
* no package imports ``benchmarks`` or ``training_scripts``, which sit on top.

Entry points: a ``__main__.py`` module (``python -m evaluation``, ``python -m pipeline``) is a command, not a library
module; it sits on top of every package and may import any of ``lampo``, ``evaluation`` and ``pipeline`` (so
``evaluation/__main__.py`` builds the pipeline's engines and reads its config), though not ``benchmarks`` or
``training_scripts``.

Every import counts: at module level, inside functions, under ``if TYPE_CHECKING:`` (a type-only import still couples
the layers), and ``importlib.import_module`` with a literal name. An import inside a function cannot hide a cycle
either: :func:`test_no_import_cycle_even_through_imports_inside_functions` builds the module graph with the imports
inside functions included (those under ``TYPE_CHECKING`` never run, so they are left out there) and requires it to
have no cycle, so an import placed inside a function may defer a heavy or optional dependency but never dodges a cycle.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lampo", "evaluation", "pipeline")  # in layer order: each may import those before it
TOP = ("benchmarks", "training_scripts")  # on top of every package; imported by none
PROJECT = PACKAGES + TOP
LEAVES = ("pipeline/config.py",)  # import no module of the project at all


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root, e.g. "pipeline/config.py"
    line: int
    module: str  # the module imported, dotted and absolute, e.g. "pipeline.rollout.base"
    names: tuple[str, ...]  # for ``from M import a, b``: ("a", "b"); else ()
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in ``path``, wherever it is placed, with relative imports made absolute."""
    rel = path.relative_to(root).as_posix()
    package = module_of(path, root) if path.name == "__init__.py" else module_of(path, root).rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=rel)
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out: list[Import] = []
    for node in ast.walk(tree):
        tc = id(node) in type_only
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, a.name, (), tc) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append(Import(rel, node.lineno, module, tuple(a.name for a in node.names), tc))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                    or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))):
            out.append(Import(rel, node.lineno, node.args[0].value, (), tc))
    return out


def project_files(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def layering_violations(root: Path = ROOT) -> list[str]:
    """``file:line imports X`` for every import that breaks the layering (module docstring)."""
    out = []
    for path in project_files(root):
        rel = path.relative_to(root).as_posix()
        own = rel.split("/")[0]
        entry_point = path.name == "__main__.py"
        for imp in imports_of(path, root):
            target = imp.module.split(".")[0]
            if target not in PROJECT:
                continue
            if rel in LEAVES or target in TOP:
                bad = True
            elif entry_point:
                bad = False
            else:
                bad = PACKAGES.index(target) > PACKAGES.index(own)
            if bad:
                out.append(f"{rel}:{imp.line} imports {imp.module}")
    return out


def import_graph(root: Path = ROOT) -> dict[str, dict[str, tuple[str, int]]]:
    """Module -> {imported project module: (file, line)}, counting imports inside functions but not those under
    ``TYPE_CHECKING``. ``from pkg import name`` points at the submodule ``pkg.name`` when there is one."""
    files = {module_of(p, root): p for p in project_files(root)}
    graph: dict[str, dict[str, tuple[str, int]]] = {m: {} for m in files}
    for mod, path in files.items():
        for imp in imports_of(path, root):
            if imp.type_only:
                continue
            targets = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in files]
            if len(targets) < len(imp.names) or not imp.names:
                targets.append(imp.module)
            for t in targets:
                if t in files and t != mod:
                    graph[mod].setdefault(t, (imp.file, imp.line))
    return graph


def cycles(graph: dict[str, dict[str, tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def write_tree(root: Path, files: dict[str, str]) -> None:
    """A fake project under ``root``: ``{relative path: text}``."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_layering_is_one_way():
    bad = layering_violations()
    assert not bad, "imports against the layering lampo <- evaluation <- pipeline (tests/test_layering.py):\n" + \
        "\n".join(bad)


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = import_graph()
    found = cycles(graph)
    lines = [f"{graph[a][b][0]}:{graph[a][b][1]} imports {b}"
             for comp in found for a in comp for b in graph[a] if b in comp]
    assert not found, f"import cycles among {found}:\n" + "\n".join(lines)


def test_the_checks_see_every_kind_of_import(tmp_path):
    """The walker is not blind: imports inside functions, under TYPE_CHECKING, relative and by import_module."""
    files = {
        "lampo/__init__.py": "",
        "lampo/a.py": "def f():\n    from pipeline.q import g\n",
        "lampo/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import evaluation.c\n",
        "evaluation/__init__.py": "",
        "evaluation/c.py": "import importlib\nimportlib.import_module('pipeline.config')\nfrom lampo import a\n",
        "evaluation/__main__.py": "from pipeline.x import y\n",
        "evaluation/sub/__init__.py": "from .. import c\n",
        "pipeline/__init__.py": "",
        "pipeline/config.py": "import os\n\ndef validate():\n    from lampo import b\n",
        "pipeline/x.py": "from evaluation.c import z\nfrom benchmarks.study import w\ny = 1\n",
        "pipeline/p.py": "from pipeline import q\n",
        "pipeline/q.py": "def g():\n    from pipeline.p import r\n",
    }
    write_tree(tmp_path, files)
    assert layering_violations(tmp_path) == [
        "evaluation/c.py:2 imports pipeline.config",
        "lampo/a.py:2 imports pipeline.q",
        "lampo/b.py:3 imports evaluation.c",
        "pipeline/config.py:4 imports lampo",
        "pipeline/x.py:2 imports benchmarks.study",
    ]
    found = cycles(import_graph(tmp_path))
    assert found == [["pipeline.p", "pipeline.q"]]  # through an import inside a function


def stage_cross_imports(root: Path = ROOT) -> list[str]:
    """``file:line imports X`` for every import of one stage module (``pipeline/stages/<name>.py``) by another: what
    two stages share lives outside ``pipeline/stages`` (the package ``pipeline.stages`` itself, the stage table, may be
    imported)."""
    folder = root / "pipeline" / "stages"
    stage_modules = {module_of(p, root) for p in folder.glob("*.py") if p.name != "__init__.py"}
    out = []
    for path in sorted(folder.glob("*.py")):
        if path.name == "__init__.py":
            continue
        me = module_of(path, root)
        for imp in imports_of(path, root):
            targets = {imp.module} | {f"{imp.module}.{n}" for n in imp.names}
            hit = sorted(t for t in targets & stage_modules if t != me)
            if hit:
                out.append(f"{path.relative_to(root).as_posix()}:{imp.line} imports {', '.join(hit)}")
    return out


def test_stages_do_not_import_each_other():
    bad = stage_cross_imports()
    assert not bad, "a stage module imports another (move what they share out of pipeline/stages):\n" + "\n".join(bad)


def test_the_stage_check_sees_every_kind_of_import(tmp_path):
    files = {
        "pipeline/__init__.py": "",
        "pipeline/data.py": "",
        "pipeline/stages/__init__.py": "STAGES = {}\n",
        "pipeline/stages/sft.py": "from pipeline.data import x\nfrom pipeline.stages import STAGES\n",
        "pipeline/stages/rl.py": "def f():\n    from pipeline.stages.sft import batch_indices\n",
        "pipeline/stages/rollout.py": "from pipeline.stages import rl\n",
        "pipeline/stages/evaluate.py": "from . import sft\nimport pipeline.stages.rollout\n",
    }
    write_tree(tmp_path, files)
    assert stage_cross_imports(tmp_path) == [
        "pipeline/stages/evaluate.py:1 imports pipeline.stages.sft",
        "pipeline/stages/evaluate.py:2 imports pipeline.stages.rollout",
        "pipeline/stages/rl.py:2 imports pipeline.stages.sft",
        "pipeline/stages/rollout.py:1 imports pipeline.stages.rl",
    ]


def test_what_moved_down_is_still_importable_from_the_pipeline():
    """The rollout-engine interface and the tiny task moved into the evaluation package; the pipeline re-exports the
    very same objects, so ``from pipeline.rollout import SamplingParams`` and ``pipeline.tiny.make_split`` still
    work."""
    import evaluation.engine
    import evaluation.tiny_task
    import pipeline.rollout
    import pipeline.rollout.base
    import pipeline.tiny

    for name in ("Generation", "RolloutEngine", "SamplingParams"):
        assert getattr(pipeline.rollout, name) is getattr(pipeline.rollout.base, name) is \
            getattr(evaluation.engine, name)
    assert pipeline.tiny.make_split is evaluation.tiny_task.make_split
