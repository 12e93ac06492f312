"""Run-folder writes are atomic: a crash inside a write leaves the previous content intact."""
from __future__ import annotations

import pytest

from lampo.files import atomic_write_json
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


def test_the_stage_table_describes_every_stage():
    from pipeline.stages import STAGES, TRAINING_STAGES

    assert list(STAGES) == ["sft", "rl", "rollout", "evaluate"] and TRAINING_STAGES == ("sft", "rl")
    assert {n: (s.folder, s.unit) for n, s in STAGES.items()} == {
        "sft": ("sft", "step"), "rl": ("rl", "iteration"), "rollout": ("rollout", "step"), "evaluate": ("eval", "step")}
    for name, stage in STAGES.items():
        assert stage.module == f"pipeline.stages.{name}" and callable(stage.run())


def test_finish_stage_marks_the_stage_done_with_its_output_relative_to_the_run(tmp_path):
    from pipeline.config import load_config
    from pipeline.context import Context

    ctx = Context(load_config(None), RunDir(tmp_path), log=None)
    st = ctx.rd.state("sft")
    st.status, st.step, st.checkpoint = "running", 4, "sft/checkpoints/step_000004"
    ctx.finish_stage(st, tmp_path / "sft" / "final", step=7)
    assert ctx.rd.state("sft") == StageState("sft", "done", 7, "sft/checkpoints/step_000004", "sft/final")
    ctx.finish_stage(ctx.rd.state("evaluate"), tmp_path / "eval" / "summary.md")  # no step: left as it was
    assert ctx.rd.state("evaluate") == StageState("evaluate", "done", 0, None, "eval/summary.md")
    assert ctx.stage_input("rl") == tmp_path / "sft" / "final"  # what the next training stage starts from


def test_temporary_files_of_a_write_cut_before_its_rename_are_removed_by_the_next_run(tmp_path, monkeypatch):
    """Each atomic writer of the run folder, killed between writing its temporary file and renaming it, leaves that
    file behind; clean_partial (the start of every run) removes them all, and nothing else."""
    from pathlib import Path

    import lampo.files
    from evaluation import report
    from lampo.files import atomic_write_text
    from lampo.record import RolloutBatch

    kept = [tmp_path / "eval" / "notes.tmpl", tmp_path / "eval" / "a.tmp.json", tmp_path / "rl" / "x.jsonl",
            tmp_path / "rl" / "checkpoints" / "step_000001" / "model.safetensors"]
    for p in kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("keep")

    class Killed(Exception):
        pass

    def killed(src, dst):
        raise Killed

    def no_cleanup(self, missing_ok=False):  # a kill runs no clean-up: the temporary file stays
        pass

    for d in ("eval/tiny", "rl/rollouts"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(lampo.files.os, "replace", killed)
    monkeypatch.setattr(Path, "unlink", no_cleanup)
    monkeypatch.setattr(report, "render_report", lambda results: "report\n")
    writers = [lambda: atomic_write_json(tmp_path / "state" / "sft.json", {"status": "running"}),
               lambda: atomic_write_text(tmp_path / "eval" / "tiny" / "responses.jsonl", "{}\n"),
               lambda: report.write_report(tmp_path / "eval" / "report.md", {}),
               lambda: RolloutBatch([]).save(tmp_path / "rl" / "rollouts" / "iter_00001.jsonl")]
    for write in writers:
        with pytest.raises(Killed):
            write()
    monkeypatch.undo()
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and p not in kept)
    assert len(left) == len(writers), left
    RunDir(tmp_path).clean_partial()
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
