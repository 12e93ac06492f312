"""OptimizerSpec: the one AdamW and LR-schedule factory of every backend."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.backends.common import OptimizerSpec, warmup_cosine
from pipeline.config import BackendConfig


def test_from_config_takes_the_adam_options_of_the_backend_section():
    spec = OptimizerSpec.from_config(BackendConfig(adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6), lr=3e-4,
                                     total_steps=50, warmup_steps=5, min_lr_ratio=0.2, weight_decay=0.01)
    assert spec == OptimizerSpec(lr=3e-4, total_steps=50, warmup_steps=5, min_lr_ratio=0.2, weight_decay=0.01,
                                 betas=(0.8, 0.95), eps=1e-6)
    opt = spec.adamw([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.01)


@pytest.mark.parametrize("warmup, floor", [(0, 1.0), (3, 0.1), (4, 0.0)])
def test_the_schedule_is_warmup_cosine_stepped_once_per_optimizer_step(warmup, floor):
    spec = OptimizerSpec(lr=0.5, total_steps=12, warmup_steps=warmup, min_lr_ratio=floor)
    opt = spec.adamw([torch.nn.Parameter(torch.zeros(1))])
    sched = spec.schedule(opt)
    seen = []
    for _ in range(15):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    want = [0.5 * warmup_cosine(s, warmup_steps=warmup, total_steps=12, min_lr_ratio=floor) for s in range(15)]
    assert seen == pytest.approx(want)
    assert seen[-1] == pytest.approx(0.5 * floor)  # past total_steps it stays at the floor
    if floor == 1.0:
        assert all(math.isclose(v, 0.5) for v in seen)  # a floor of 1: constant (RL's default)
