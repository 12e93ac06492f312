"""Project-wide checks of what a user gets from a fresh clone: no module of ours can replace a standard-library or
dependency module, and the math-verify worker starts whatever interpreter flags and working directory the caller has.

Both guard a real failure: ``lampo/rewards/math.py`` replaced the standard ``math`` for the worker (started as a
script, so its folder came first on ``sys.path``), and every fresh virtual environment failed at the first reward.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("lampo", "pipeline", "evaluation", "benchmarks", "training_scripts", "tests")
OWN_TOP_LEVEL = {"lampo", "pipeline", "evaluation", "benchmarks", "tests"}


def project_module_names() -> dict[str, list[Path]]:
    """Every module (``x.py``) and package (folder with ``__init__.py``) name in the project -> where it is."""
    names: dict[str, list[Path]] = {}
    for top in PROJECT_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" and path.name != "__init__.py":
                names.setdefault(path.stem, []).append(path.relative_to(ROOT))
            elif path.is_dir() and (path / "__init__.py").exists():
                names.setdefault(path.name, []).append(path.relative_to(ROOT))
    return names


def dependency_top_level_names() -> dict[str, str]:
    """Importable top-level names of every installed distribution that requirements*.txt pull in (transitively),
    -> the distribution that provides it."""
    providers = md.packages_distributions()  # top-level name -> [distribution, ...]
    by_dist: dict[str, set[str]] = {}
    for name, dists in providers.items():
        for d in dists:
            by_dist.setdefault(canonical(d), set()).add(name)
    todo = [Requirement(line.split("#")[0].strip()).name
            for f in ROOT.glob("requirements*.txt") for line in f.read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")]
    seen: set[str] = set()
    while todo:
        dist = canonical(todo.pop())
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue  # an optional (GPU, benchmark) requirement that is not installed here
        for r in map(Requirement, requires):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return {name: dist for dist in seen for name in by_dist.get(dist, ())}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_no_module_is_named_like_a_standard_library_module():
    clashes = {n: p for n, p in project_module_names().items() if n in sys.stdlib_module_names}
    assert not clashes, f"rename these; they replace the standard library's module when their folder is on sys.path: " \
                        f"{clashes}"


def test_no_module_is_named_like_a_dependency():
    deps = dependency_top_level_names()
    assert "torch" in deps and "megatron" in deps, "the dependency walk found too little to be trusted"
    clashes = {n: (deps[n], p) for n, p in project_module_names().items()
               if n in deps and n not in OWN_TOP_LEVEL}
    assert not clashes, f"rename these; they are named like a dependency's top-level module: {clashes}"


def test_math_worker_starts_from_an_isolated_interpreter_outside_the_repository(tmp_path):
    """``-I`` drops the working directory and PYTHON* variables from the caller; the worker must not depend on them,
    nor on whatever the interpreter happens to import at start-up."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from lampo.rewards.verify_worker import VerifyWorker
        w = VerifyWorker()
        try:
            print(w.verify("\\\\frac{{1}}{{2}}", "0.5", 10.0)[0], w.verify("3", "4", 10.0)[0])
        finally:
            w.close()
    """)
    res = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["True", "False"], res.stdout + res.stderr[-3000:]
