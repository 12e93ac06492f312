"""The GPU smoke check's figures script, run as its CPU dry run: the same path the GPU run takes, small shapes."""
from __future__ import annotations

import json

import pytest

from benchmarks import gpu_rl_iteration


@pytest.mark.parametrize("backend", ["torch", "megatron"])
def test_gpu_rl_iteration_dry_run_writes_its_figures(tmp_path, backend):
    assert gpu_rl_iteration.main(["--dry-run", "--backend", backend, "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "rl_iteration.json").read_text())
    assert got["backend"] == backend and got["sequences"] == 2 * 4
    assert got["generated_tokens"] == 2 * 4 * 8  # EOS ignored: every response is exactly --new-tokens long
    assert set(got["seconds"]) == {"sync_weights", "rollout", "old_logprobs", "train_step"}
    assert all(v > 0 for v in got["seconds"].values())
    assert got["rollout_tokens_per_s"] > 0 and got["train_tokens_per_s"] > 0
    assert got["mfu"] is None  # no peak FLOP/s is known for a CPU


def test_mfu_uses_the_device_peak(monkeypatch):
    monkeypatch.setenv("LAMPO_PEAK_TFLOPS", "100")
    assert gpu_rl_iteration.peak_flops() == 100e12
