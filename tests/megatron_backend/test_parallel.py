"""Megatron backend vs Hugging Face / the torch backend, over gloo in 2 CPU processes.

One spawned job (module fixture) runs every layout of a 2-process world in turn - TP=1 (with DP=2), TP=2, PP=2 -
so process start-up and imports are paid once; each test then asserts on its part of the results:

* logits of the megatron model equal the HF model's (fp32, max abs error < 1e-4), for Qwen2 (tied), Qwen3 (QK-norm,
  tied), Llama 3 (scaled RoPE, untied) and Phi-3 (fused QKV and gate/up in HF, untied);
* one SFT step and then one LamPO RL step (PPO clip, KL to the reference, entropy bonus) give the same loss, gradient
  norm and updated weights (gathered back to HF names) as the single-process torch backend - for DP=2, TP=2, PP=2
  (tied embeddings split across stages), ZeRO-1 over DP=2, TP=2 with activation recomputation, and TP=2 with
  sequence parallelism (Qwen2 and Qwen3);
* bf16 parameters (fp32 master weights) with PP=2 stay within bf16 precision of fp32.
"""
from __future__ import annotations

import pytest
import torch

from tests.megatron_backend.harness import make_checkpoint, run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) in a world of 2; (1, 1) runs with data_parallel=2
#: backend runs compared with the torch backend: name -> (tp, pp, backend options)
VARIANTS = {
    "dp2": (1, 1, {}), "tp2": (2, 1, {}), "pp2": (1, 2, {}),
    "dp2_zero1": (1, 1, {"distributed_optimizer": True}),
    "tp2_recompute": (2, 1, {"recompute_activations": True}),
    "tp2_qwen3": (2, 1, {}),  # QK-norm weights: replicated, but each TP rank only sees its own heads' gradients
    "tp2_sp": (2, 1, {"sequence_parallel": True}),  # the batch's odd length (11) exercises padding to TP
    "tp2_sp_qwen3": (2, 1, {"sequence_parallel": True}),
}
TRAINED = {"tp2_qwen3": "qwen3", "tp2_sp_qwen3": "qwen3"}  # variant -> family trained (default qwen2)
EXACT = sorted(VARIANTS)  # fp32: same result within fp32 tolerance
FAMILIES = {"qwen2": True, "qwen3": True, "llama": False, "phi3": False}  # family -> tied embeddings
LR = 1e-3


def make_cfg(tp: int = 1, pp: int = 1, name: str = "megatron", **options):
    from pipeline.config import Config

    cfg = Config()
    cfg.backend.name, cfg.backend.tensor_parallel, cfg.backend.pipeline_parallel = name, tp, pp
    for k, v in options.items():
        setattr(cfg.backend, k, v)
    cfg.backend.micro_batch_size = 2  # the 5-sequence batch runs as 2 + 2 + 1 (or 2 + 1 per DP rank)
    cfg.backend.grad_clip = 1.0
    algo = cfg.rl.algorithm
    algo.kl_coef, algo.entropy_coef, algo.clip_low, algo.clip_high = 0.05, 0.01, 0.2, 0.28
    cfg.rollout.max_new_tokens = 8
    return cfg


def make_batch():
    from lampo.record import TokenBatch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 99, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 3)]
    responses = [torch.randint(0, 99, (n,), generator=g).tolist() for n in (6, 2, 9, 4, 5)]  # T = 11
    adv = torch.randn(5, generator=g)
    return TokenBatch.from_sequences(prompts, responses, pad_id=0, advantages=adv)


def rl_batch(batch, logprobs, ref_logprobs):
    """Old log-probs perturbed away from the current ones, so that ratios differ from 1 and clipping happens."""
    g = torch.Generator().manual_seed(4)
    b = batch.select(slice(None))
    b.old_logprobs = (logprobs + 0.3 * torch.randn(logprobs.shape, generator=g)) * batch.attention_mask
    b.ref_logprobs = ref_logprobs
    return b


def steps(backend, batch) -> dict:
    """What both backends are compared on: log-probs, one SFT step, one RL step, and the weights after each."""
    out = {"logprobs": backend.token_logprobs(batch)}
    ref = backend.token_logprobs(batch, reference=True)
    out["sft"] = backend.sft_step(batch)
    out["w_sft"] = {k: v.detach().cpu().clone() for k, v in backend.named_full_tensors()}
    out["rl"] = backend.rl_step(rl_batch(batch, out["logprobs"], ref))
    out["w_rl"] = {k: v.detach().cpu().clone() for k, v in backend.named_full_tensors()}
    return out


def _logits(ckpt: str, ids: torch.Tensor, tp: int, pp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from transformers import AutoConfig

    from lampo.record import TokenBatch
    from pipeline.backends.megatron_backend.model import arch_from_hf, build_model
    from pipeline.backends.megatron_backend.parallel import init_parallel, layout_for_world
    from pipeline.backends.megatron_backend.schedule import broadcast_from_last_stage, run_schedule
    from pipeline.backends.megatron_backend.weights import load_into, read_hf_state

    use_cuda = dist.get_backend() == "nccl"
    init_parallel(layout_for_world(tp, pp, dist.get_world_size()), seed=0, use_cuda=use_cuda)
    config = AutoConfig.from_pretrained(ckpt)
    arch = arch_from_hf(config)
    model = build_model(arch, config, tp, pp)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    ids = ids.to(device)
    load_into(model, read_hf_state(ckpt), arch, tp, pp, ps.get_tensor_model_parallel_rank(),
              ps.get_pipeline_model_parallel_rank())
    ones = torch.ones_like(ids)
    mbs = [TokenBatch(ids[:2], ones[:2], ones[:2].float()), TokenBatch(ids[2:], ones[2:], ones[2:].float())]

    def loss_fn(logits, mb):
        full = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size]  # (b, T, V): test only
        return logits.sum() * 0.0, {"logits": full.detach().cpu()}

    with torch.no_grad():
        out = run_schedule(model.to(device), mbs, loss_fn, forward_only=True)
    local = torch.cat([o["logits"] for o in out]) if out else None
    return broadcast_from_last_stage(local, (*ids.shape, arch.vocab_size)).cpu()


def _worker(ckpts: dict[str, str], ids: torch.Tensor, batch) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from pipeline.backends.megatron_backend.backend import MegatronBackend

    results: dict = {}
    for tp, pp in LAYOUTS:
        for family, ckpt in ckpts.items():
            results["logits", family, tp, pp] = _logits(ckpt, ids, tp, pp)
        ps.destroy_model_parallel()
    for name, (tp, pp, options) in VARIANTS.items():
        backend = MegatronBackend.from_config(make_cfg(tp, pp, **options), ckpts[TRAINED.get(name, "qwen2")], lr=LR,
                                  total_steps=10, warmup_steps=0, min_lr_ratio=0.1, reference=True)
        results["steps", name] = steps(backend, batch)
        del backend
        ps.destroy_model_parallel()
    bf16 = MegatronBackend.from_config(make_cfg(1, 2, bf16=True), ckpts["qwen2"], lr=LR, total_steps=10)
    results["bf16_logprobs"] = bf16.token_logprobs(batch)
    results["bf16_sft"] = bf16.sft_step(batch)
    return results if dist.get_rank() == 0 else {}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_ckpts")
    return {f: str(make_checkpoint(root / f, f, tied=tied)) for f, tied in FAMILIES.items()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 99, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def results(ckpts, ids):
    return run_distributed(_worker, 2, ckpts, ids, make_batch())[0]


@pytest.fixture(scope="module")
def torch_runs(ckpts):
    from pipeline.backends.torch_backend import TorchBackend

    out = {}
    for family in sorted(set(TRAINED.values()) | {"qwen2"}):
        backend = TorchBackend.from_config(make_cfg(name="torch"), ckpts[family], lr=LR, total_steps=10, warmup_steps=0,
                               min_lr_ratio=0.1, reference=True)
        out[family] = steps(backend, make_batch())
    return out


@pytest.fixture(scope="module")
def torch_steps(torch_runs):
    return torch_runs["qwen2"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_hf(results, ckpts, ids, family, tp, pp):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpts[family], dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    err = (results["logits", family, tp, pp] - want).abs().max().item()
    assert err < 1e-4, f"{family} tp={tp} pp={pp}: max abs logit error {err}"


@pytest.mark.parametrize("variant", EXACT)
def test_logprobs_match_torch_backend(results, torch_runs, variant):
    got, want = results["steps", variant]["logprobs"], torch_runs[TRAINED.get(variant, "qwen2")]["logprobs"]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["sft", "rl"])
@pytest.mark.parametrize("variant", EXACT)
def test_step_matches_torch_backend(results, torch_runs, kind, variant):
    got, want = results["steps", variant], torch_runs[TRAINED.get(variant, "qwen2")]
    for key in ("loss", "grad_norm", "lr"):
        assert got[kind][key] == pytest.approx(want[kind][key], rel=1e-5, abs=1e-6), key
    if kind == "rl":
        for key in ("pg_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high"):
            if key in want[kind]:
                assert got[kind][key] == pytest.approx(want[kind][key], rel=1e-5, abs=1e-6), key
    w_got, w_want = got[f"w_{kind}"], want[f"w_{kind}"]
    w_want = {k: v for k, v in w_want.items() if k != "lm_head.weight"}  # tied: not a separate tensor in HF files
    assert w_got.keys() == w_want.keys()
    assert_weights_close(w_got, w_want)


def assert_weights_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    """Weights after AdamW steps agree to ``atol``, except for a few elements whose gradient is at fp32 rounding level.

    Adam's first step moves each element by about ``lr * g / (|g| + eps)``: an element whose gradient is ~1e-8 in
    both runs can land anywhere within ``lr`` of its start depending on the summation order (equally valid in fp32).
    So at most 0.1% of elements may differ by more than ``atol``, and none by more than the two steps' ``2 * lr``.
    """
    bad = total = 0
    for k in want:
        err = (got[k] - want[k]).abs()
        assert err.max().item() <= 2 * LR * 1.01, f"{k}: max abs error {err.max().item()}"
        bad += int((err > atol).sum())
        total += err.numel()
    assert bad <= 1e-3 * total, f"{bad} of {total} weights differ by more than {atol}"


def test_the_steps_change_the_weights(torch_steps, ckpts):
    """Guards the parity tests against comparing two untouched copies of the initial weights."""
    from pipeline.backends.megatron_backend.weights import read_hf_state

    init = read_hf_state(ckpts["qwen2"])
    delta = max((torch_steps["w_sft"][k] - v).abs().max().item() for k, v in init.items())
    assert delta > 10 * 1e-5  # AdamW's first step moves weights by about lr = 1e-3


def test_bf16_runs_close_to_fp32(results, torch_steps):
    """bf16 parameters and pipeline activations (PP=2), fp32 master weights: same numbers to bf16 precision."""
    mask = make_batch().attention_mask.bool()
    err = (results["bf16_logprobs"] - torch_steps["logprobs"])[mask].abs().max().item()
    assert err < 0.1
    assert results["bf16_sft"]["loss"] == pytest.approx(torch_steps["sft"]["loss"], rel=2e-2)
