"""Non-finite optimizer steps: a step whose loss or gradient is NaN or infinite is skipped (no optimizer or LR step, no
weight change, no gradient left behind), counted (``skipped_updates`` in the step's metrics and in TensorBoard, a log
line naming the step), and ``run.max_nonfinite_in_a_row`` of them in a row stop the run with a message naming the step
and the checkpoint to resume from. The logic lives in :class:`pipeline.backends.base.TrainingBackend`, so the torch,
DeepSpeed and Megatron backends behave alike (the DeepSpeed check is in test_deepspeed_backend.py)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.backends.base import NonFiniteSteps
from pipeline.backends.torch_backend import TorchBackend
from pipeline.config import TinyModelConfig, load_config
from pipeline.tiny.model import create_tiny_checkpoint
from tests.pipeline.test_runner import ROOT, SMALL
from tests.pipeline.test_torch_backend import random_batch, weights

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", TINY, seed=0)


def make_backend(ckpt, **over) -> TorchBackend:
    cfg = load_config(None, ["backend.micro_batch_size=2", *[f"{k}={v}" for k, v in over.items()]])
    return TorchBackend.from_config(cfg, ckpt, lr=1e-2, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)


def nothing_changed(b: TorchBackend, before: dict[str, torch.Tensor], step: int) -> bool:
    return (b.step == step and all(torch.equal(v, before[k]) for k, v in weights(b).items())
            and all(p.grad is None for p in b.model.parameters()))


def test_nan_gradients_skip_the_update_the_count_resets_and_the_third_in_a_row_stops(ckpt):
    b = make_backend(ckpt)
    poison = {"on": True}
    b.model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)
    before = weights(b)
    for n in (1, 2):
        m = b.sft_step(random_batch(n))
        assert m["skipped_updates"] == 1 and math.isnan(m["grad_norm"]) and math.isfinite(m["loss"])
        assert b.nonfinite_in_a_row == n and b.skipped_updates == n
        assert nothing_changed(b, before, 0) and not b.optimizer.state  # no Adam moment was touched
        assert b.scheduler.last_epoch == 0  # nor the LR schedule
    poison["on"] = False
    m = b.sft_step(random_batch(3))
    assert m["skipped_updates"] == 0 and b.nonfinite_in_a_row == 0 and b.skipped_updates == 2 and b.step == 1
    # the good step is exactly a fresh backend's first step: the skipped ones left nothing behind
    fresh = make_backend(ckpt)
    assert fresh.sft_step(random_batch(3)) == m
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in weights(b).items())
    after_good = weights(b)
    poison["on"] = True
    b.sft_step(random_batch(4))
    b.sft_step(random_batch(5))
    with pytest.raises(NonFiniteSteps, match=r"3 optimizer steps in a row had a non-finite loss or gradient") as e:
        b.sft_step(random_batch(6))
    assert isinstance(e.value, FloatingPointError) and "no update was applied" in str(e.value)
    assert nothing_changed(b, after_good, 1)


def test_the_limit_comes_from_the_config(ckpt):
    b = make_backend(ckpt, **{"run.max_nonfinite_in_a_row": 1})
    b.model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteSteps, match="1 optimizer step in a row"):
        b.sft_step(random_batch(1))


@pytest.mark.parametrize("field", ["advantages", "old_logprobs"])
def test_a_nan_in_the_rl_inputs_skips_the_step(ckpt, field):
    b = make_backend(ckpt)
    batch = random_batch(4)
    batch.old_logprobs = b.token_logprobs(batch)
    t = getattr(batch, field).clone()
    row, col = batch.response_mask.nonzero()[-1].tolist()  # a response token
    t[(row, col) if t.dim() == 2 else row] = float("nan")
    setattr(batch, field, t)
    before = weights(b)
    m = b.rl_step(batch)
    assert m["skipped_updates"] == 1 and math.isnan(m["loss"]) and nothing_changed(b, before, 0)
    batch.old_logprobs, batch.advantages = b.token_logprobs(batch), torch.ones(len(batch))
    assert b.rl_step(batch)["skipped_updates"] == 0 and b.step == 1 and b.nonfinite_in_a_row == 0


def test_an_infinite_loss_is_skipped_even_when_its_gradient_is_finite(ckpt, monkeypatch):
    from pipeline.backends import base

    real = base.sft_loss
    monkeypatch.setattr(base, "sft_loss", lambda *a, **k: real(*a, **k) + float("inf"))  # d(loss + inf) = d(loss)
    b = make_backend(ckpt)
    before = weights(b)
    m = b.sft_step(random_batch(1))
    assert m["skipped_updates"] == 1 and not math.isfinite(m["loss"]) and nothing_changed(b, before, 0)


def test_the_sft_stage_logs_skips_and_stops_naming_the_step_and_the_checkpoint(tmp_path, monkeypatch, capsys):
    """In process: SFT steps 6 and 7 get a NaN loss (skipped, logged), step 8 is good and checkpointed, steps 10-12 get
    NaN losses: the third in a row stops the run, naming step 12 and checkpoint step 8."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline import runner
    from pipeline.backends import base

    real, calls = base.sft_loss, {"n": 0}

    def sft_loss(*a, **k):  # one micro-batch per step: call n is step n
        calls["n"] += 1
        return real(*a, **k) * (float("nan") if calls["n"] in (6, 7, 10, 11, 12) else 1.0)

    monkeypatch.setattr(base, "sft_loss", sft_loss)
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteSteps) as e:
        runner.run("configs/tiny.yaml", [f"run.dir={run_dir}", *SMALL, "run.stages=[sft]", "sft.log_every=1"])
    msg = str(e.value)
    assert "[sft] stopped at step 12" in msg and "3 optimizer steps in a row" in msg, msg
    assert "sft/checkpoints/step_000008" in msg, msg
    out = capsys.readouterr().out
    for step, n in ((6, 1), (7, 2), (10, 1), (11, 2)):
        assert f"[sft] step {step}: non-finite loss or gradient" in out and f"({n} in a row" in out, out
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    skipped = {ev.step: ev.value for ev in acc.Scalars("sft/skipped_updates")}
    assert skipped == {**{s: 0.0 for s in range(1, 12)}, 6: 1.0, 7: 1.0, 10: 1.0, 11: 1.0}, skipped


def _megatron_worker(ckpt: str) -> dict:
    """TP=2: a NaN gradient on rank 1's shard only. The gradient norm is reduced over the TP group, so both ranks skip
    the same steps and stop at the same one."""
    import torch.distributed as dist

    from pipeline.backends.megatron_backend.backend import MegatronBackend
    from tests.megatron_backend.test_parallel import make_batch, make_cfg

    b = MegatronBackend.from_config(make_cfg(2, 1), ckpt, lr=1e-3, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    before = {k: v.clone() for k, v in b.named_full_tensors()}
    poison = {"on": dist.get_rank() == 1}
    next(p for p in b.model.parameters() if p.requires_grad).register_hook(
        lambda g: g * float("nan") if poison["on"] else g)
    out: dict = {"skipped": [b.sft_step(make_batch())["skipped_updates"] for _ in range(2)], "step": b.step}
    after = dict(b.named_full_tensors())  # every rank iterates to the end: the gathers are collective
    out["unchanged"] = all(torch.equal(v, before[k]) for k, v in after.items())
    poison["on"] = False
    out["good"] = b.sft_step(make_batch())["skipped_updates"]
    poison["on"] = dist.get_rank() == 1
    out["raised"] = []
    for _ in range(3):
        try:
            b.sft_step(make_batch())
        except NonFiniteSteps as e:
            out["raised"].append(str(e))
    out["final_step"] = b.step
    return out


def test_megatron_ranks_skip_and_stop_together(tmp_path):
    pytest.importorskip("megatron.core")
    from tests.megatron_backend.harness import make_checkpoint, run_distributed

    ckpt = make_checkpoint(tmp_path / "init", "qwen2", tied=False)
    for r in run_distributed(_megatron_worker, 2, str(ckpt)):
        assert r["skipped"] == [1.0, 1.0] and r["step"] == 0 and r["unchanged"] and r["good"] == 0.0
        assert len(r["raised"]) == 1 and "3 optimizer steps in a row" in r["raised"][0] and r["final_step"] == 1


def test_the_rl_stage_counts_skips_per_iteration_and_stops_naming_the_iteration(tmp_path, monkeypatch, capsys):
    """In process, RL only (2 updates per iteration): every update from the third on gets a NaN loss; iteration 2
    skips both of its updates (rl/skipped_updates = 2) and is checkpointed, the first update of iteration 3 is the
    third in a row and stops the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline import runner
    from pipeline.backends import base

    real, calls = base.rl_loss, {"n": 0}

    def rl_loss(*a, **k):
        calls["n"] += 1
        loss, metrics = real(*a, **k)
        return loss * (float("nan") if calls["n"] >= 3 else 1.0), metrics

    monkeypatch.setattr(base, "rl_loss", rl_loss)
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteSteps) as e:
        runner.run("configs/tiny.yaml", [f"run.dir={run_dir}", *SMALL, "run.stages=[rl]"])
    msg = str(e.value)
    assert msg.startswith("[rl] stopped at iteration 3, update 1 of 2: 3 optimizer steps in a row"), msg
    assert "The last good checkpoint is rl/checkpoints/step_000002 (iteration 2)" in msg, msg
    out = capsys.readouterr().out
    assert "[rl] iteration 2, update 1 of 2: non-finite loss or gradient" in out, out
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {ev.step: ev.value for ev in acc.Scalars("rl/skipped_updates")} == {1: 0.0, 2: 2.0}


def test_a_resumed_run_keeps_counting_skips_in_a_row(tmp_path, monkeypatch, capsys):
    """The skip counters travel with the checkpoint: steps 7 and 8 are skipped and step 8 is checkpointed; the run
    dies at step 9 (here: an exception); the resumed run's first step (9) is the third skip in a row and its second
    (10) the fourth, which stops it at run.max_nonfinite_in_a_row=4. Counting from 0 again after a resume would let
    preemption evade the limit."""
    import json

    from pipeline import runner
    from pipeline.backends import base
    from pipeline.context import SKIP_COUNTERS, Context

    class Died(Exception):
        pass

    real, calls = base.sft_loss, {"n": 0}
    nan_at, die_at = {7, 8}, {9}

    def sft_loss(*a, **k):  # one micro-batch per step: call n is step n
        calls["n"] += 1
        if calls["n"] in die_at:
            raise Died
        return real(*a, **k) * (float("nan") if calls["n"] in nan_at else 1.0)

    seen = []
    note = Context.note_skipped_step

    def spy(self, backend, stage, m, where):
        if m.get("skipped_updates"):
            seen.append((where, backend.nonfinite_in_a_row, backend.skipped_updates))
        return note(self, backend, stage, m, where)

    monkeypatch.setattr(base, "sft_loss", sft_loss)
    monkeypatch.setattr(Context, "note_skipped_step", spy)
    monkeypatch.chdir(ROOT)
    args = [f"run.dir={tmp_path / 'run'}", *SMALL, "run.stages=[sft]", "run.max_nonfinite_in_a_row=4"]
    with pytest.raises(Died):
        runner.run("configs/tiny.yaml", args)
    assert seen == [("step 7", 1, 1), ("step 8", 2, 2)]
    saved = json.loads((tmp_path / "run" / "sft" / "checkpoints" / "step_000008" / SKIP_COUNTERS).read_text())
    assert saved == {"nonfinite_in_a_row": 2, "skipped_updates": 2}

    calls["n"], nan_at, die_at = 8, {9, 10}, set()  # the resumed run starts at step 9
    seen.clear()
    with pytest.raises(NonFiniteSteps) as e:
        runner.run("configs/tiny.yaml", args)
    assert "resumed from sft/checkpoints/step_000008" in capsys.readouterr().out
    assert seen == [("step 9", 3, 3)]
    assert "[sft] stopped at step 10" in str(e.value) and "4 optimizer steps in a row" in str(e.value), str(e.value)
