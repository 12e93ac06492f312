"""The DeepSpeed backend computes exactly the torch backend's step, in one process and in a 2-process gloo world.

Each scenario runs log-probs, one SFT step and one LamPO RL step (PPO clip with perturbed old log-probs so that
clipping happens, KL to the reference, entropy bonus, seq-mean-token-mean so that the global sequence count matters)
on an 8-sequence batch cut into micro-batches of 3. With 2 ranks that is 2 micro-batches on rank 0 and 1 plus a
zero-weight dummy on rank 1, so the uneven-shard path is exercised. Checked against :class:`TorchBackend`: the
metrics, the log-probs and the updated weights (fp32, CPU), also with activation recomputation. Also: save -> load
resumes identically (the next step after loading equals the next step without the round trip), a non-finite gradient
is skipped without updating anything, and counted (ZeRO 0/2/3), ZeRO-3's ``export_hf`` gathers the full weights,
``validate_config`` refuses layouts this backend cannot run, and the colocated-rollout memory release (its CUDA branch,
with the device faked) moves the optimizer state and round-trips exactly at ZeRO 0/2/3.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from lampo.record import TokenBatch
from pipeline.config import Config, ConfigError

pytest.importorskip("deepspeed", reason="the DeepSpeed backend needs deepspeed (pip install deepspeed)")

LR, MICRO, N = 1e-2, 3, 8


def make_checkpoint(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    model.save_pretrained(path)
    return path


def make_cfg(stage: int) -> Config:
    cfg = Config()
    cfg.backend.name, cfg.backend.zero_stage, cfg.backend.micro_batch_size = "deepspeed", stage, MICRO
    algo = cfg.rl.algorithm
    algo.kl_coef, algo.entropy_coef, algo.clip_high, algo.loss_agg = 0.05, 0.01, 0.28, "seq-mean-token-mean"
    cfg.rollout.max_new_tokens = 8
    return cfg


def make_backend(cls: type, ckpt: Path, stage: int, cfg: Config | None = None) -> Any:
    return cls.from_config(cfg or make_cfg(stage), ckpt, lr=LR, total_steps=10, warmup_steps=2, min_lr_ratio=0.1,
                           weight_decay=0.01, reference=True)


def make_batch(seed: int) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    lens = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompts = [torch.randint(1, 64, (lens(2, 6),), generator=g).tolist() for _ in range(N)]
    responses = [torch.randint(1, 64, (lens(1, 8),), generator=g).tolist() for _ in range(N)]
    return TokenBatch.from_sequences(prompts, responses, pad_id=0, advantages=torch.randn(N, generator=g))


def scenario(backend: Any) -> dict[str, Any]:
    """Log-probs, an SFT step, then an RL step whose old log-probs come from the backend itself (perturbed)."""
    batch = make_batch(1)
    out: dict[str, Any] = {"sft": backend.sft_step(make_batch(0))}
    lp = backend.token_logprobs(batch)
    noise = 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
    batch.old_logprobs = (lp + noise) * batch.attention_mask
    batch.ref_logprobs = backend.token_logprobs(batch, reference=True)
    out.update(logprobs=lp, ref_logprobs=batch.ref_logprobs, rl=backend.rl_step(batch))
    out["weights"] = dict(backend.named_full_tensors())
    return out


def assert_same(got: dict[str, Any], want: dict[str, Any], atol: float) -> None:
    for step in ("sft", "rl"):
        assert got[step].keys() == want[step].keys()
        for k, v in want[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-5, abs=atol), f"{step} metric {k}"
    for k in ("logprobs", "ref_logprobs"):
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-5)
    assert got["weights"].keys() == want["weights"].keys()
    for k, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][k].float(), w, atol=atol, rtol=1e-5, msg=f"weight {k}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ds") / "tiny")


@pytest.fixture(scope="module")
def torch_result(ckpt) -> dict[str, Any]:
    from pipeline.backends.torch_backend import TorchBackend

    return scenario(make_backend(TorchBackend, ckpt, 0))


# --- one process ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, recompute", [(2, False), (3, False), (3, True)])
def test_single_process_matches_torch_backend(ckpt, torch_result, stage, recompute):
    from pipeline.backends.deepspeed_backend import DeepSpeedBackend

    cfg = make_cfg(stage)
    cfg.backend.recompute_activations = recompute  # activation checkpointing changes memory, not the numbers
    assert_same(scenario(make_backend(DeepSpeedBackend, ckpt, stage, cfg)), torch_result, atol=2e-5)


def test_save_load_resumes_identically(ckpt, tmp_path):
    from pipeline.backends.deepspeed_backend import DeepSpeedBackend

    a = make_backend(DeepSpeedBackend, ckpt, 2)
    a.sft_step(make_batch(0))
    a.sft_step(make_batch(1))  # Adam moments and the LR schedule are past their first step
    a.save(tmp_path / "ckpt")
    want = (torch.rand(4), a.sft_step(make_batch(2)), dict(a.named_full_tensors()), a.step)
    b = make_backend(DeepSpeedBackend, ckpt, 2)
    b.load(tmp_path / "ckpt")
    got = (torch.rand(4), b.sft_step(make_batch(2)), dict(b.named_full_tensors()), b.step)
    assert torch.equal(got[0], want[0])  # the RNG resumes where it was saved
    assert got[1] == want[1] and got[3] == want[3] == 3
    for k, w in want[2].items():
        assert torch.equal(got[2][k], w), k


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_non_finite_gradient_is_skipped_counted_and_applies_no_update(ckpt, stage):
    """As in every backend (tests/pipeline/test_nonfinite.py): skipped, counted, the third in a row stops."""
    from pipeline.backends.base import NonFiniteSteps
    from pipeline.backends.deepspeed_backend import DeepSpeedBackend

    b = make_backend(DeepSpeedBackend, ckpt, stage)
    before = dict(b.named_full_tensors())
    hook = b.module.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("nan"))
    for n in (1, 2):
        m = b.sft_step(make_batch(0))
        assert m["skipped_updates"] == 1 and not math.isfinite(m["grad_norm"]) and b.nonfinite_in_a_row == n
    with pytest.raises(NonFiniteSteps, match="3 optimizer steps in a row.*no update was applied"):
        b.sft_step(make_batch(0))
    hook.remove()
    assert b.step == 0 and all(torch.equal(v, before[k]) for k, v in b.named_full_tensors())
    # nothing leaks into the next step: it equals a fresh backend's first step (weights, Adam state, LR schedule)
    fresh = make_backend(DeepSpeedBackend, ckpt, stage)
    assert b.sft_step(make_batch(0)) == fresh.sft_step(make_batch(0))
    want = dict(fresh.named_full_tensors())
    assert all(torch.equal(v, want[k]) for k, v in b.named_full_tensors())


def test_load_refuses_a_folder_without_a_checkpoint(ckpt, tmp_path):
    from pipeline.backends.deepspeed_backend import DeepSpeedBackend

    with pytest.raises(FileNotFoundError, match="no DeepSpeed backend checkpoint"):
        make_backend(DeepSpeedBackend, ckpt, 2).load(tmp_path)


@pytest.mark.parametrize("field, value, match", [
    ("tensor_parallel", 2, "data-parallel only"),
    ("pipeline_parallel", 2, "data-parallel only"),
    ("sequence_parallel", True, "Megatron options"),
    ("offload_optimizer", True, "needs ZeRO"),  # with zero_stage=0 below
])
def test_validate_config_refuses_unsupported_layouts(field, value, match):
    from pipeline.backends.deepspeed_backend import DeepSpeedBackend

    cfg = make_cfg(0)
    setattr(cfg.backend, field, value)
    with pytest.raises(ConfigError, match=match):
        DeepSpeedBackend.validate_config(cfg)
    DeepSpeedBackend.validate_config(make_cfg(0))  # the unchanged config passes


# --- colocated rollouts: the accelerator branch, faked on CPU --------------------------------------------------------
class MovedTensors:
    """Record ``id`` of every floating tensor handed to ``Tensor.to`` while active (stands in for "moved to the host":
    on CPU the move itself is a no-op)."""

    def __enter__(self):
        self.ids: set[int] = set()
        real = torch.Tensor.to

        def to(t, *args, **kwargs):
            if t.is_floating_point():
                self.ids.add(id(t))
            return real(t, *args, **kwargs)

        torch.Tensor.to = to
        return self

    def __exit__(self, *exc):
        del torch.Tensor.to  # back to TensorBase's method


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_release_and_reacquire_around_a_rollout(ckpt, stage):
    """release_memory -> (weight sync) -> reacquire_memory on the CUDA branch (device faked): the AdamW moments go to
    the host and back (stage 3: DeepSpeed refuses to offload a torch AdamW's state; stage 0: no ZeRO optimizer to ask),
    the weights stay where they are and are what the sync reads, and the next step equals a run without the trip."""
    from pipeline.backends.deepspeed_backend import DeepSpeedBackend

    ref = make_backend(DeepSpeedBackend, ckpt, stage)
    ref.sft_step(make_batch(0))
    want_step, want_weights = ref.sft_step(make_batch(1)), dict(ref.named_full_tensors())

    b = make_backend(DeepSpeedBackend, ckpt, stage)
    b.sft_step(make_batch(0))
    before = dict(b.named_full_tensors())
    storage = {n: getattr(p, "ds_tensor", p).data_ptr() for n, p in b.module.named_parameters()}
    adamw = getattr(b.engine.optimizer, "optimizer", b.engine.optimizer)  # inside ZeRO's wrapper, if any
    moments = [v for st in adamw.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments
    real_device = b.device
    b.device = torch.device("cuda")  # what release_memory / reacquire_memory decide on
    try:
        with MovedTensors() as moved:
            b.release_memory()
        assert {id(t) for t in moments} <= moved.ids, "release_memory left the AdamW moments on the accelerator"
        assert {n: getattr(p, "ds_tensor", p).data_ptr() for n, p in b.module.named_parameters()} == storage, \
            "release_memory moved the model weights, which the weight sync reads next"
        synced = dict(b.named_full_tensors())
        b.reacquire_memory()
    finally:
        b.device = real_device
    for k, v in before.items():
        assert torch.equal(synced[k], v), k
    assert b.sft_step(make_batch(1)) == want_step
    after = dict(b.named_full_tensors())
    for k, v in want_weights.items():
        assert torch.equal(after[k], v), k


# --- two processes over gloo ------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pipeline.backends.deepspeed_backend import DeepSpeedBackend

    results: dict[str, Any] = {}
    for stage in (2, 3):
        b = make_backend(DeepSpeedBackend, Path(ckpt), stage)
        results[stage] = scenario(b)
        if stage == 3:  # ZeRO-3 is where saving and exporting need gathers
            b.save(Path(out) / "ckpt")
            b.export_hf(Path(out) / "hf")
            results["next"] = (b.sft_step(make_batch(2)), dict(b.named_full_tensors()))
            c = make_backend(DeepSpeedBackend, Path(ckpt), 3)
            c.load(Path(out) / "ckpt")
            results["resumed"] = (c.sft_step(make_batch(2)), dict(c.named_full_tensors()))
            # two rollout engines (leaders 0 and 1) both receive the whole model; by default only rank 0
            results["leaders"] = (dict(c.named_full_tensors(ranks=[0, 1])), dict(c.named_full_tensors()))
    torch.save(results if rank == 0 else results["leaders"], Path(out) / f"results{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process(ckpt):
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(2, _free_port(), str(ckpt), out), nprocs=2, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + 240
        while not ctx.join(timeout=5):  # raises if a worker failed
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("the 2-process DeepSpeed run did not finish in 240 s (a collective mismatch hangs)")
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(Path(out) / "hf").state_dict()
        yield (torch.load(Path(out) / "results0.pt", weights_only=False), exported,
               torch.load(Path(out) / "results1.pt", weights_only=False))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_torch_backend(two_process, torch_result, stage):
    assert_same(two_process[0][stage], torch_result, atol=2e-5)


def test_two_process_zero3_save_load_resumes_identically(two_process):
    (m_next, w_next), (m_res, w_res) = two_process[0]["next"], two_process[0]["resumed"]
    assert m_res == pytest.approx(m_next, rel=1e-6)
    for k, w in w_next.items():
        torch.testing.assert_close(w_res[k], w, atol=1e-6, rtol=1e-6, msg=k)


def test_two_process_zero3_export_hf_writes_full_weights(two_process, torch_result):
    exported = two_process[1]
    for k, w in torch_result["weights"].items():
        torch.testing.assert_close(exported[k], w, atol=2e-5, rtol=1e-5, msg=k)


def test_two_process_zero3_full_tensors_reach_every_engine_leader(two_process):
    (rank0_both, rank0_default), (rank1_both, rank1_default) = two_process[0]["leaders"], two_process[2]
    assert rank0_both and rank0_both.keys() == rank1_both.keys()
    for k, w in rank0_both.items():
        assert torch.equal(rank1_both[k], w), k
    assert rank0_default and not rank1_default
