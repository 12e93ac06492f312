"""A training backend sees its own options, never the whole Config: ``TrainingBackend.from_config`` is the one place
that reads a Config for a backend (``validate_config`` may read it too, at config load)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from pipeline.backends.base import Objective, TrainingBackend
from pipeline.backends.common import OptimizerSpec
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ROOT / "pipeline" / "backends"
SECTIONS = {"rl", "sft", "rollout", "run", "eval", "data"}  # other stages' sections of a Config
ALLOWED = {"from_config", "validate_config"}  # functions that take a whole Config on purpose


def config_reads(path: Path, root: Path = ROOT) -> list[str]:
    """``self.cfg`` anywhere, and ``cfg.<section>`` outside :data:`ALLOWED`, in the module at ``path``."""
    found: list[str] = []

    def visit(node: ast.AST, allowed: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            allowed = allowed or node.name in ALLOWED
        if isinstance(node, ast.Attribute):
            base = node.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            if node.attr == "cfg" and isinstance(base, ast.Name) and base.id == "self":
                found.append(f"{path.relative_to(root)}:{node.lineno}: self.cfg")
            elif node.attr in SECTIONS and name == "cfg" and not allowed:
                found.append(f"{path.relative_to(root)}:{node.lineno}: cfg.{node.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child, allowed)

    visit(ast.parse(path.read_text()), False)
    return found


def test_no_backend_module_reads_the_whole_config():
    modules = sorted(BACKENDS.rglob("*.py"))
    assert len(modules) > 5  # the scan found the package
    assert [hit for p in modules for hit in config_reads(p)] == []


def test_the_scan_catches_a_whole_config_read(tmp_path):
    (tmp_path / "m.py").write_text("def f(self, cfg):\n    return self.cfg.backend, cfg.rl.algorithm\n"
                                   "def from_config(cfg):\n    return cfg.rl\n")
    assert [h.split(": ")[1] for h in config_reads(tmp_path / "m.py", tmp_path)] == ["self.cfg", "cfg.rl"]


class Recorded(TrainingBackend):
    """Records what ``from_config`` builds it with; loads nothing."""

    def __init__(self, model_path: Any, **kw: Any) -> None:
        self.model_path, self.kw = model_path, kw

    token_logprobs = _forward_backward = _optimizer_step = save = load = export_hf = named_full_tensors = None


Recorded.__abstractmethods__ = frozenset()


def test_from_config_hands_each_option_to_the_backend():
    cfg = load_config(None, ["run.seed=7", "rollout.colocate=true", "run.max_nonfinite_in_a_row=5",
                             "rollout.max_new_tokens=33", "sft.batch_size=12", "rl.mini_batch_size=20",
                             "backend.adam_beta2=0.95"])
    b = Recorded.from_config(cfg, "the-model", lr=1e-3, total_steps=9, warmup_steps=2, min_lr_ratio=0.5,
                             weight_decay=0.01, reference=True)
    assert b.model_path == "the-model"
    assert b.kw == {
        "backend": cfg.backend, "model": cfg.model, "seed": 7, "colocate": True, "max_nonfinite": 5, "max_batch": 20,
        "reference": True, "objective": Objective(cfg.rl.algorithm, max_len=33),
        "optimizer": OptimizerSpec(lr=1e-3, total_steps=9, warmup_steps=2, min_lr_ratio=0.5, weight_decay=0.01,
                                   betas=(cfg.backend.adam_beta1, 0.95), eps=cfg.backend.adam_eps)}
