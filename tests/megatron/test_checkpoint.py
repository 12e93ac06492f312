"""Save/resume, HF export and a refused layout change (2 gloo processes).

Resume runs with DP=2 and the ZeRO-1 optimizer (its partitioned state is consolidated on save); the refusal is
checked by loading that DP=2 checkpoint into a PP=2 run."""
from __future__ import annotations

import pytest
import torch

from tests.megatron.harness import make_checkpoint, run_distributed
from tests.megatron.test_parallel import make_batch, make_cfg


def _worker(ckpt: str, root: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pipeline.backends.megatron.backend import MegatronBackend

    batch = make_batch()
    kw = dict(lr=1e-3, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    a = MegatronBackend(make_cfg(1, 1, distributed_optimizer=True), ckpt, **kw)
    a.sft_step(batch)
    a.save(f"{root}/step1")
    after_two = a.sft_step(batch)
    w_a = {k: v.clone() for k, v in a.named_full_tensors()}
    a.export_hf(f"{root}/hf")
    del a
    b = MegatronBackend(make_cfg(1, 1, distributed_optimizer=True), ckpt, **kw)  # fresh weights
    b.load(f"{root}/step1")
    resumed = b.sft_step(batch)
    w_b = {k: v.clone() for k, v in b.named_full_tensors()}
    del b
    ps.destroy_model_parallel()
    refused = ""
    c = MegatronBackend(make_cfg(1, 2), ckpt, **kw)
    try:
        c.load(f"{root}/step1")
    except ValueError as e:
        refused = str(e)
    return {"after_two": after_two, "resumed": resumed, "w_a": w_a, "w_b": w_b, "refused": refused,
            "rank": dist.get_rank()}


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


def test_changed_layout_is_refused_with_both_layouts(out):
    msg = out[0][0]["refused"]
    assert "tensor_parallel=1, pipeline_parallel=1" in msg and "tensor_parallel=1, pipeline_parallel=2" in msg


def test_export_loads_in_transformers_with_the_trained_weights(out):
    from transformers import AutoModelForCausalLM

    res, root = out[0][0], out[1]
    model = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    state = model.state_dict()
    for k, v in res["w_a"].items():
        assert torch.equal(state[k], v), k
