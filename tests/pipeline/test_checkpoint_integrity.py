"""Checkpoint integrity: every checkpoint folder carries a MANIFEST.json (paths, sizes, sha256) written last; a resume
skips a damaged latest checkpoint (truncated or altered file, missing file or manifest) for the previous good one and
ends exactly where an uninterrupted run ends; ``run.keep_last_checkpoints`` prunes, never the newest good checkpoint;
a checkpoint is not started without the free disk space it needs; and a checkpoint file that would run code when
unpickled is refused (``torch.load(weights_only=True)``) without running it.

The runs are the tiny pipeline of ``test_runner`` (one subprocess per command, SIGKILL by ``pipeline.faults``), SFT
only unless RL is the point: SFT checkpoints at steps 4 and 8 of 12, so a kill at step 10 leaves both.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.state import MANIFEST, RunDir, StageState, verify_manifest, write_manifest
from tests.pipeline.test_runner import run_cli

SFT_ONLY = "run.stages=[sft]"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert torch.equal(got[k], w), f"{k} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted SFT + RL run."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli(run_dir, "run.stages=[sft,rl]")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def killed_sft(run_dir: Path) -> Path:
    """An SFT run killed at step 10: checkpoints step_000004 and step_000008, the state pointing at the latter."""
    res = run_cli(run_dir, SFT_ONLY, fault="sft_step:10")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ckpts = run_dir / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004", "step_000008"]
    assert json.loads((run_dir / "state" / "sft.json").read_text())["checkpoint"] == "sft/checkpoints/step_000008"
    return ckpts


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-100])


def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-64] ^= 0x10  # inside the last tensor's data: the file still loads, with one weight changed
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda c: truncate(c / "model.safetensors"),
                  "model.safetensors has {size} bytes, the manifest says {full} (truncated?)"),
    "flipped byte": (lambda c: flip_byte(c / "model.safetensors"), "model.safetensors has sha256"),
    "missing file": (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt is missing"),
    "missing manifest": (lambda c: (c / MANIFEST).unlink(), f"{MANIFEST} is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(reference, tmp_path, damage):
    ckpts = killed_sft(tmp_path / "run")
    latest = ckpts / "step_000008"
    full = (latest / "model.safetensors").stat().st_size
    damage_fn, fragment = DAMAGE[damage]
    damage_fn(latest)
    resumed = run_cli(tmp_path / "run", SFT_ONLY)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    expected = fragment.format(size=full - 100, full=full)
    assert f"checkpoint sft/checkpoints/step_000008 is damaged, skipping it: {expected}" in out, out
    assert "[sft] resumed from sft/checkpoints/step_000004 (step 4)" in out, out
    assert_same_weights(weights(tmp_path / "run" / "sft" / "final"), weights(reference / "sft" / "final"))


def test_rl_stage_skips_a_damaged_checkpoint_too(reference, tmp_path):
    run_dir = tmp_path / "run"
    # 2 updates per iteration: the 6th is in iteration 3, after the checkpoints of iterations 1 and 2
    killed = run_cli(run_dir, "run.stages=[sft,rl]", fault="rl_update:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    flip_byte(run_dir / "rl" / "checkpoints" / "step_000002" / "model.safetensors")
    resumed = run_cli(run_dir, "run.stages=[sft,rl]")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint rl/checkpoints/step_000002 is damaged, skipping it: model.safetensors has sha256" in \
        resumed.stdout, resumed.stdout
    assert "[rl] resumed from rl/checkpoints/step_000001 (iteration 1)" in resumed.stdout, resumed.stdout
    assert_same_weights(weights(run_dir / "rl" / "final"), weights(reference / "rl" / "final"))


def test_no_good_checkpoint_starts_the_stage_over_from_its_input(reference, tmp_path):
    ckpts = killed_sft(tmp_path / "run")
    (ckpts / "step_000008" / MANIFEST).unlink()
    truncate(ckpts / "step_000004" / "trainer_state.pt")
    resumed = run_cli(tmp_path / "run", SFT_ONLY)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert "step_000008 is damaged" in out and "step_000004 is damaged" in out, out
    assert "[sft] no usable checkpoint left (see above): the stage starts over from its input" in out, out
    assert "resumed from" not in out, out
    assert_same_weights(weights(tmp_path / "run" / "sft" / "final"), weights(reference / "sft" / "final"))


def test_every_checkpoint_has_a_manifest_of_all_its_files_and_keep_last_is_respected(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(run_dir, SFT_ONLY, "sft.checkpoint_every=2", "run.keep_last_checkpoints=3")
    assert res.returncode == 0, res.stderr[-3000:]
    ckpts = run_dir / "sft" / "checkpoints"  # written at steps 2, 4, 6, 8, 10
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000006", "step_000008", "step_000010"]
    assert json.loads((run_dir / "state" / "sft.json").read_text())["checkpoint"] == "sft/checkpoints/step_000010"
    for c in ckpts.iterdir():
        assert verify_manifest(c) is None
        listed = json.loads((c / MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(c).as_posix() for p in c.rglob("*") if p.is_file()} - {MANIFEST}
        assert set(listed) == on_disk and {"model.safetensors", "trainer_state.pt"} <= on_disk


# --- Context.save_checkpoint with a stand-in backend -----------------------------------------------------------------
class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, msg: str) -> None:
        self.lines.append(msg)


class FileBackend:
    """Writes one file per checkpoint: what a backend's ``save`` does, without a model."""

    nonfinite_in_a_row = skipped_updates = 0  # the counters a checkpoint carries (TrainingBackend's)

    def save(self, path: Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "state.bin").write_bytes(random.randbytes(4096))


def make_context(tmp_path: Path, keep: int = 2):
    from pipeline.config import Config
    from pipeline.context import Context

    cfg = Config()
    cfg.run.keep_last_checkpoints = keep
    cfg.model.tiny.hidden_size, cfg.model.tiny.num_layers, cfg.model.tiny.intermediate_size = 32, 1, 64
    return Context(cfg, RunDir(tmp_path), Messages())


def test_pruning_never_removes_the_newest_good_checkpoint(tmp_path, monkeypatch):
    from pipeline import context

    ctx, st = make_context(tmp_path, keep=1), StageState("sft")
    for step in (1, 2):
        ctx.save_checkpoint(FileBackend(), st, step)
    ckpts = tmp_path / "sft" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_000002"]  # keep_last_checkpoints=1

    def write_then_damage(folder: Path) -> None:  # the storage corrupts the new checkpoint after its manifest
        write_manifest(folder)
        truncate(Path(folder) / "state.bin")

    monkeypatch.setattr(context, "write_manifest", write_then_damage)
    ctx.save_checkpoint(FileBackend(), st, 3)
    assert st.checkpoint == "sft/checkpoints/step_000002" and st.step == 2
    assert ctx.rd.state("sft").checkpoint == "sft/checkpoints/step_000002"
    assert verify_manifest(ckpts / "step_000002") is None  # the newest good one is still there
    assert "checkpoint sft/checkpoints/step_000003 does not match its manifest right after it was written" \
           in ctx.log.lines[-1] and "state.bin has" in ctx.log.lines[-1]
    monkeypatch.undo()
    ctx.save_checkpoint(FileBackend(), st, 4)
    assert [p.name for p in ckpts.iterdir()] == ["step_000004"] and st.checkpoint == "sft/checkpoints/step_000004"


# --- free disk space --------------------------------------------------------------------------------------------------
def run_in_process(run_dir: Path, *extra: str) -> int:
    from pipeline.runner import main
    from tests.pipeline.test_runner import SMALL

    return main(["run", "configs/tiny.yaml", f"run.dir={run_dir}", *SMALL, SFT_ONLY, *extra])


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.delenv("LAMPO_FAULT", raising=False)


def fake_free_space(monkeypatch, free: int, only_under: str = "") -> None:
    """``shutil.disk_usage`` reports ``free`` bytes free for paths ending in ``only_under`` (all paths when empty)."""
    real = shutil.disk_usage

    def disk_usage(path):
        u = real(path)
        return u._replace(free=free) if str(path).endswith(only_under) else u

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_first_checkpoint_refused_without_the_space_for_the_model_and_optimizer(tmp_path, monkeypatch, capsys,
                                                                                 in_repo):
    fake_free_space(monkeypatch, free=1000)
    assert run_in_process(tmp_path / "run") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err and "not enough free disk space to write checkpoint sft/checkpoints/step_000004" in err[0], err
    assert " parameters x 16 bytes, and only 1,000 bytes are free on the file system of" in err[0], err[0]
    ckpts = tmp_path / "run" / "sft" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # no half-written folder


def test_later_checkpoint_refused_by_the_size_of_the_previous_one_then_resumes(reference, tmp_path, monkeypatch,
                                                                                capsys, in_repo):
    # sft/checkpoints exists from the first checkpoint on: room for step 4, not for step 8
    fake_free_space(monkeypatch, free=50_000, only_under="sft/checkpoints")
    assert run_in_process(tmp_path / "run") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    ckpts = tmp_path / "run" / "sft" / "checkpoints"
    previous = sum(p.stat().st_size for p in (ckpts / "step_000004").rglob("*") if p.is_file())
    assert err and "not enough free disk space to write checkpoint sft/checkpoints/step_000008" in err[0], err
    assert f"it needs about {previous:,} bytes (" in err[0], err[0]
    assert ", the size of the previous checkpoint step_000004, and only 50,000 bytes (48.8 KiB) are free" in err[0]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004"]  # no step_000008 nor step_000008.tmp
    assert verify_manifest(ckpts / "step_000004") is None
    monkeypatch.undo()
    resumed = run_cli(tmp_path / "run", SFT_ONLY)  # with the space back, the same command resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[sft] resumed from sft/checkpoints/step_000004 (step 4)" in resumed.stdout
    assert_same_weights(weights(tmp_path / "run" / "sft" / "final"), weights(reference / "sft" / "final"))


# --- safe loading -----------------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this runs code (here: writes a marker file), as a malicious checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_a_checkpoint_file_that_would_run_code_is_refused_on_resume(tmp_path):
    ckpts = killed_sft(tmp_path / "run")
    latest, marker = ckpts / "step_000008", tmp_path / "MARKER"
    state = torch.load(latest / "trainer_state.pt", weights_only=True)
    torch.save({**state, "payload": RunsCode(marker)}, latest / "trainer_state.pt")
    write_manifest(latest)  # whoever swapped the file can rewrite the manifest too: only weights_only stops it
    resumed = run_cli(tmp_path / "run", SFT_ONLY)
    assert not marker.exists(), "the pickled payload ran"
    assert resumed.returncode == 2, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    err = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert err and f"refusing to load checkpoint file {latest / 'trainer_state.pt'}" in err[0], resumed.stderr[-3000:]
    assert "(Unsupported global: GLOBAL exec was not an allowed global by default)" in err[0], err[0]
    assert "unpickling it could run arbitrary code" in err[0], err[0]


def test_rng_state_is_plain_data_and_old_tuples_still_load(tmp_path):
    from pipeline.backends.common import load_checkpoint_file, rng_state, set_rng_state

    random.seed(7)
    random.gauss(0, 1)  # leaves a cached Gaussian in the state
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), random.gauss(0, 1), torch.rand(3))
    random.seed(8)
    torch.manual_seed(8)
    set_rng_state(load_checkpoint_file(tmp_path / "rng.pt"))
    got = (random.random(), random.gauss(0, 1), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])
    random.seed(9)  # what checkpoints written before hold: random.getstate()'s tuple
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, tmp_path / "old.pt")
    want = random.random()
    set_rng_state(load_checkpoint_file(tmp_path / "old.pt"))
    assert random.random() == want


def test_keep_last_checkpoints_must_be_at_least_one():
    from pipeline.config import ConfigError, load_config

    assert load_config(None).run.keep_last_checkpoints == 2
    with pytest.raises(ConfigError, match="run.keep_last_checkpoints=0 must be at least 1"):
        load_config(None, ["run.keep_last_checkpoints=0"])
