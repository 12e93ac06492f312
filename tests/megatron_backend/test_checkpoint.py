"""Save/resume, HF export and resuming with another parallel layout (2 gloo processes).

The checkpoint is written by a DP=2 run with the ZeRO-1 optimizer (its partitioned state is consolidated on save),
resumed bit-exactly with the same layout, and resumed with PP=2 and with TP=2 (weights and AdamW moments resharded):
the next step then matches the uninterrupted run within fp32 tolerance."""
from __future__ import annotations

import pytest
import torch

from tests.megatron_backend.harness import make_checkpoint, run_distributed
from tests.megatron_backend.test_parallel import assert_weights_close, make_batch, make_cfg


def _worker(ckpt: str, root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pipeline.backends.megatron_backend.backend import MegatronBackend

    batch = make_batch()
    kw = dict(lr=1e-3, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    a = MegatronBackend.from_config(make_cfg(1, 1, distributed_optimizer=True), ckpt, **kw)
    a.sft_step(batch)
    a.save(f"{root}/step1")
    after_two = a.sft_step(batch)
    w_a = {k: v.clone() for k, v in a.named_full_tensors()}
    a.export_hf(f"{root}/hf")
    del a
    b = MegatronBackend.from_config(make_cfg(1, 1, distributed_optimizer=True), ckpt, **kw)  # fresh weights
    b.load(f"{root}/step1")
    resumed = b.sft_step(batch)
    w_b = {k: v.clone() for k, v in b.named_full_tensors()}
    del b
    ps.destroy_model_parallel()
    out = {"after_two": after_two, "resumed": resumed, "w_a": w_a, "w_b": w_b, "rank": dist.get_rank()}
    for tp, pp in ((1, 2), (2, 1)):
        c = MegatronBackend.from_config(make_cfg(tp, pp), ckpt, **kw)
        c.load(f"{root}/step1")
        out["resharded", tp, pp] = c.sft_step(batch)
        out["w_resharded", tp, pp] = {k: v.clone() for k, v in c.named_full_tensors()}
        del c
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_ckpt_test")
    ckpt = make_checkpoint(root / "init", "qwen2", tied=False)
    return run_distributed(_worker, 2, str(ckpt), str(root)), root


def test_resume_continues_bit_exactly(out):
    res = out[0][0]
    assert res["resumed"] == res["after_two"]  # loss, grad norm and lr of the step after the checkpoint
    assert res["w_a"].keys() == res["w_b"].keys() and res["w_a"]
    for k in res["w_a"]:
        assert torch.equal(res["w_a"][k], res["w_b"][k]), k


def test_other_ranks_stream_nothing(out):
    assert out[0][1]["w_a"] == {}


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1)])
def test_resume_with_another_layout_continues(out, tp, pp):
    res = out[0][0]
    got, want = res["resharded", tp, pp], res["after_two"]
    for key in ("loss", "grad_norm", "lr"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert_weights_close(res["w_resharded", tp, pp], res["w_a"])  # AdamW moments carried over


def test_export_loads_in_transformers_with_the_trained_weights(out):
    from transformers import AutoModelForCausalLM

    res, root = out[0][0], out[1]
    model = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    state = model.state_dict()
    for k, v in res["w_a"].items():
        assert torch.equal(state[k], v), k
