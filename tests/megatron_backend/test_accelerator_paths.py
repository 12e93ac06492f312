"""The megatron backend's accelerator-only paths, run on CPU over gloo (2 processes, one spawned job).

On a GPU these branches run for real; here the device is faked where the backend decides (``use_cuda`` is forced on
after construction) and spies on ``Tensor.to`` / ``Tensor.cpu`` stand in for "moved to / copied through the host":

* colocated rollouts with the ZeRO-1 optimizer (``distributed_optimizer``, DP=2) and bf16 parameters: release ->
  reacquire hands the moments the optimizer really steps (its local ``optim.state``) and the fp32 masters to the
  host and back, and the next step equals a run without the round trip; after save -> resume, release works (ZeRO's
  loaded ``.state`` holds ``None`` for other ranks' parameters) and resumes exactly;
* bf16 gradients are accumulated over micro-batches and reduced over DP=2 in fp32: a batch whose first micro-batch on
  each rank outweighs each of the 127 others 512:1 (identical sequences, so every small gradient is below half a bf16
  ulp of the running sum) gives the fp32 model's gradient to bf16 forward/backward noise, where a bf16 sum drops every
  later micro-batch;
* the weight sync yields the model's (bf16) tensors on the model's device and copies nothing to the host (PP=2, so
  rank 0 also receives the other stage's shards).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.megatron_backend.harness import make_checkpoint, run_distributed
from tests.megatron_backend.test_parallel import make_batch, make_cfg

BIG, SMALL_PER_RANK = 512.0, 127  # per DP rank: one micro-batch of weight 512, then 127 of weight 1


class Spy:
    """Record ``id`` of every tensor handed to ``Tensor.to`` / ``Tensor.cpu`` (floating tensors only: collectives
    pickle objects through byte tensors) while active."""

    def __init__(self):
        self.to: set[int] = set()
        self.host: list[tuple[tuple[int, ...], torch.dtype]] = []  # floating tensors copied with .cpu()/.to("cpu")

    def __enter__(self):
        spy = self
        self._orig = torch.Tensor.to, torch.Tensor.cpu

        def to(t, *args, **kwargs):
            if t.is_floating_point():
                spy.to.add(id(t))
                target = kwargs.get("device", args[0] if args else None)
                if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu":
                    spy.host.append((tuple(t.shape), t.dtype))
            return spy._orig[0](t, *args, **kwargs)

        def cpu(t, *args, **kwargs):
            if t.is_floating_point():
                spy.host.append((tuple(t.shape), t.dtype))
            return spy._orig[1](t, *args, **kwargs)

        torch.Tensor.to, torch.Tensor.cpu = to, cpu
        return self

    def __exit__(self, *exc):
        del torch.Tensor.to, torch.Tensor.cpu  # back to TensorBase's methods


def _moments(backend) -> list[torch.Tensor]:
    """The AdamW moments the optimizer steps: for ZeroRedundancyOptimizer, its local optimizer's state."""
    opt = getattr(backend.optimizer, "optim", backend.optimizer)
    return [v for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]


def _weights(backend) -> dict:
    return {k: v.detach().clone() for k, v in backend.named_full_tensors()}


def _colocate(ckpt: str, root: str) -> dict:
    from megatron.core import parallel_state as ps

    from pipeline.backends.megatron_backend.backend import MegatronBackend

    batch, kw = make_batch(), dict(lr=1e-3, total_steps=10, warmup_steps=0)

    def make():
        b = MegatronBackend.from_config(make_cfg(1, 1, distributed_optimizer=True, bf16=True), ckpt, **kw)
        b.use_cuda = True  # the accelerator branch of release_memory / reacquire_memory
        return b

    out: dict = {}
    ref = make()
    ref.sft_step(batch)
    out["ref"] = ref.sft_step(batch)
    out["w_ref"] = _weights(ref)
    del ref

    a = make()
    a.sft_step(batch)
    a.save(f"{root}/step1")
    masters = [m for _, p, m in a.master.pairs if m is not p]  # separate fp32 copies of the bf16 parameters
    wanted = {id(t) for t in _moments(a)} | {id(m) for m in masters}
    out["n_moments"], out["n_masters"] = len(_moments(a)), len(masters)
    with Spy() as spy:
        a.release_memory()
    out["released"] = wanted <= spy.to
    with Spy() as spy:
        a.reacquire_memory()
    out["reacquired"] = wanted <= spy.to
    out["after_round_trip"] = a.sft_step(batch)
    out["w_round_trip"] = _weights(a)
    del a

    b = make()
    b.load(f"{root}/step1")
    try:
        with Spy() as spy:
            b.release_memory()
        out["resume_released"] = {id(t) for t in _moments(b)} <= spy.to and len(_moments(b)) > 0
        b.reacquire_memory()
        out["resumed"] = b.sft_step(batch)
        out["w_resumed"] = _weights(b)
    except Exception as e:  # noqa: BLE001 - every rank fails alike (no collective in release_memory)
        out["resume_error"] = repr(e)
    del b
    ps.destroy_model_parallel()
    return out


def _grads(ckpt: str, bf16: bool) -> dict:
    """Master gradients as the optimizer sees them, and the dtypes of the data-parallel all-reduces."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lampo.record import TokenBatch
    from pipeline.backends.megatron_backend.backend import MegatronBackend

    n = 2 * (1 + SMALL_PER_RANK)
    weights = torch.ones(n)
    weights[0] = weights[n // 2] = BIG  # the first micro-batch of each DP rank
    batch = TokenBatch.from_sequences([[5, 17, 42]] * n, [[7, 9, 11, 13, 2]] * n, pad_id=0, advantages=weights)
    cfg = make_cfg(1, 1, bf16=bf16)
    cfg.backend.micro_batch_size, cfg.backend.grad_clip = 1, 1e9  # no clipping: compare raw gradients
    backend = MegatronBackend.from_config(cfg, ckpt, lr=1e-3, total_steps=10)

    # the closures below run inside _forward_backward / _optimizer_step, before `del backend` (which pyflakes reads
    # as leaving `backend` undefined in them: F821)
    def loss_fn(logits, mb):
        lp, _ = backend._per_token(logits, mb, entropy=False)  # noqa: F821
        loss = -((lp * mb.response_mask).sum(-1) * mb.advantages.to(lp.dtype)).sum() / 64.0
        return loss, None

    out: dict = {"dp_reduce_dtypes": []}
    dp_group = ps.get_data_parallel_group()
    real_all_reduce, real_step = dist.all_reduce, backend.optimizer.step

    def all_reduce(t, *args, group=None, **kwargs):
        if group is dp_group:
            out["dp_reduce_dtypes"].append(t.dtype)
        return real_all_reduce(t, *args, group=group, **kwargs)

    def step(*args, **kwargs):
        out["grads"] = {n: m.grad.detach().float().clone() for n, m in backend.master.named()}  # noqa: F821
        return real_step(*args, **kwargs)

    backend.optimizer.step = step
    dist.all_reduce = all_reduce
    try:
        backend._forward_backward(batch, loss_fn)
        backend._optimizer_step()
    finally:
        dist.all_reduce = real_all_reduce
    del backend
    ps.destroy_model_parallel()
    return out


def _sync(ckpt: str) -> dict:
    from megatron.core import parallel_state as ps

    from pipeline.backends.megatron_backend.backend import MegatronBackend

    backend = MegatronBackend.from_config(make_cfg(1, 2, bf16=True), ckpt, lr=1e-3, total_steps=10)
    with Spy() as spy:
        got = [(k, v.device, v.dtype) for k, v in backend.named_full_tensors()]
    out = {"tensors": got, "host_copies": spy.host, "device": backend.device}
    del backend
    ps.destroy_model_parallel()
    return out


def _worker(ckpt: str, root: str) -> dict:
    return {"colocate": _colocate(ckpt, root), "grads_bf16": _grads(ckpt, True), "grads_fp32": _grads(ckpt, False),
            "sync": _sync(ckpt)}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_accel")
    ckpt = make_checkpoint(root / "init", "qwen2", tied=False)
    return run_distributed(_worker, 2, str(ckpt), str(root))


def test_release_moves_the_zero_optimizers_real_state_and_round_trips(out):
    for rank in out:
        c = rank["colocate"]
        assert c["n_moments"] > 0 and c["n_masters"] > 0
        assert c["released"], "release_memory did not hand the live AdamW moments / fp32 masters to the host"
        assert c["reacquired"], "reacquire_memory did not bring them back"
        assert c["after_round_trip"] == c["ref"]
        for k, v in c["w_ref"].items():
            assert torch.equal(c["w_round_trip"][k], v), k


def test_release_after_resume(out):
    for rank in out:
        c = rank["colocate"]
        assert "resume_error" not in c, c.get("resume_error")
        assert c["resume_released"]
        assert c["resumed"] == c["ref"]  # the step after the checkpoint, as without save/resume
        for k, v in c["w_ref"].items():
            assert torch.equal(c["w_resumed"][k], v), k


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def test_bf16_gradients_accumulate_and_reduce_in_fp32(out):
    bf16, fp32 = out[0]["grads_bf16"], out[0]["grads_fp32"]
    want = _flat(fp32["grads"])
    got = _flat(bf16["grads"])
    # what a bf16 sum over the micro-batches (then a bf16 all-reduce) gives: every micro-batch after the big one is
    # below half an ulp of the running sum. Simulated on the fp32 gradient of one weight-1 micro-batch.
    unit = want / (2 * (BIG + SMALL_PER_RANK))
    acc = (BIG * unit).bfloat16()
    for _ in range(SMALL_PER_RANK):
        acc = acc + unit.bfloat16()
    bf16_sum = (acc + acc).float()
    err = ((got - want).norm() / want.norm()).item()
    err_bf16_sum = ((bf16_sum - want).norm() / want.norm()).item()
    assert err_bf16_sum > 0.08  # the case is hard for bf16 accumulation
    assert err < err_bf16_sum / 5, f"bf16 run is {err:.4f} from fp32 (a bf16 sum would be {err_bf16_sum:.4f})"
    for rank in out:
        assert rank["grads_bf16"]["dp_reduce_dtypes"], "no data-parallel gradient reduction seen"
        assert set(rank["grads_bf16"]["dp_reduce_dtypes"]) == {torch.float32}


def test_weight_sync_stays_on_the_model_device(out):
    main = out[0]["sync"]
    assert len(main["tensors"]) > 0
    assert {dtype for _, _, dtype in main["tensors"]} >= {torch.bfloat16}  # the model's dtype, not fp32 masters
    for name, device, _ in main["tensors"]:
        assert device == main["device"], name
    for rank in out:
        assert rank["sync"]["host_copies"] == [], "weights were copied to the host on the way to the rollout engine"


def _full_tensors_on(ckpt: str, tp: int, ranks: list[int]) -> dict:
    import torch.distributed as tdist

    from pipeline.backends.megatron_backend.backend import MegatronBackend

    backend = MegatronBackend.from_config(make_cfg(tp, 1), ckpt, lr=1e-3, total_steps=10)
    return {"rank": tdist.get_rank(), "weights": {k: v.clone() for k, v in backend.named_full_tensors(ranks=ranks)}}


@pytest.mark.parametrize("tp", [1, 2])  # TP=1: DP=2; TP=2: each rank holds half of every layer
def test_full_tensors_reach_every_engine_leader(tmp_path, tp):
    """With two rollout engines (leaders 0 and 1) both receive the whole model; by default only rank 0 does."""
    ckpt = str(make_checkpoint(tmp_path / "hf", "qwen2", tied=True))
    both = run_distributed(_full_tensors_on, 2, ckpt, tp, [0, 1])
    assert both[0]["weights"].keys() == both[1]["weights"].keys() and both[0]["weights"]
    for k, v in both[0]["weights"].items():
        assert torch.equal(v, both[1]["weights"][k]), k
    hf = load_file(Path(ckpt) / "model.safetensors")
    torch.testing.assert_close(both[1]["weights"]["model.layers.1.mlp.down_proj.weight"],
                               hf["model.layers.1.mlp.down_proj.weight"])
    default = run_distributed(_full_tensors_on, 2, ckpt, tp, [0])
    assert default[0]["weights"] and not default[1]["weights"]
