"""Run-folder writes are atomic: a crash inside a write leaves the previous content intact."""
from __future__ import annotations

import pytest

from lampo.io import atomic_write_json
from pipeline.state import RunDir, StageState, atomic_dir


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "w").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "w").write_text("half")
        raise RuntimeError("killed")
    assert (target / "w").read_text() == "v1"
    RunDir(tmp_path).clean_partial()
    assert not (tmp_path / "ckpt.tmp").exists()
    with atomic_dir(target) as d:
        (d / "w").write_text("v2")
    assert (target / "w").read_text() == "v2"


def test_stage_state_round_trip_and_corruption(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.state("sft").status == "pending"
    rd.save_state(StageState("sft", "running", 200, "sft/checkpoints/step_000200"))
    assert rd.state("sft").step == 200
    (tmp_path / "state" / "sft.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="corrupt"):
        rd.state("sft")
    atomic_write_json(tmp_path / "state" / "sft.json", {"name": "sft", "status": "done"})
    assert rd.state("sft").status == "done"


def test_prune_keeps_newest_and_protected(tmp_path):
    rd = RunDir(tmp_path)
    for s in (1, 2, 3, 4):
        (tmp_path / "c" / f"step_{s:06d}").mkdir(parents=True)
    rd.prune_checkpoints(tmp_path / "c", keep=2, protect="c/step_000001")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["step_000001", "step_000003", "step_000004"]


def test_reset_stage_forgets_state_and_outputs(tmp_path):
    rd = RunDir(tmp_path)
    rd.save_state(StageState("evaluate", "done"))
    (tmp_path / "eval" / "sft").mkdir(parents=True)
    (tmp_path / "sft").mkdir()
    rd.reset_stage("evaluate")
    assert rd.state("evaluate").status == "pending"
    assert not (tmp_path / "eval").exists() and (tmp_path / "sft").exists()
