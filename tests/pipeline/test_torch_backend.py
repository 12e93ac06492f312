"""The torch backend: per-token log-prob layout, micro-batch invariance of SFT and RL steps, and exact resumption."""
from __future__ import annotations

import pytest
import torch

from lampo.record import TokenBatch
from pipeline.backends.torch_backend import TorchBackend
from pipeline.config import TinyModelConfig, load_config
from pipeline.tiny.model import create_tiny_checkpoint

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", SMALL, seed=0)


def make_backend(ckpt, micro: int, **over) -> TorchBackend:
    cfg = load_config(None, [f"backend.micro_batch_size={micro}", *[f"{k}={v}" for k, v in over.items()]])
    return TorchBackend.from_config(cfg, ckpt, lr=1e-2, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)


def random_batch(seed: int, n: int = 6, vocab: int = 20) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    return TokenBatch.from_sequences(prompts, responses, pad_id=0, advantages=torch.randn(n, generator=g))


# Adam's first steps are ~lr * sign(grad): float summation-order differences in near-zero gradients move a weight by
# a visible fraction of the step. Loss and gradient norm are compared tightly; weights to 0.5% of the step (lr/2).
STEP_ATOL = 2.5e-5


def weights(b: TorchBackend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in b.model.state_dict().items()}


def test_token_logprobs_layout(ckpt):
    b = make_backend(ckpt, 4)
    batch = random_batch(0)
    lp = b.token_logprobs(batch)
    assert lp.shape == batch.input_ids.shape
    assert torch.all(lp[:, 0] == 0) and torch.all(lp[batch.attention_mask == 0] == 0)
    i = 1  # row 1 alone, unpadded, through the model directly
    n = int(batch.attention_mask[i].sum())
    ids = batch.input_ids[i:i + 1, :n]
    ref = torch.log_softmax(b.model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(lp[i, 1:n], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-sum-constant"])
def test_rl_step_does_not_depend_on_micro_batch_size(ckpt, loss_agg):
    batch = random_batch(1)
    noise = 0.05 * torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(5))
    batch.old_logprobs = (make_backend(ckpt, 6).token_logprobs(batch) + noise) * batch.response_mask
    results = []
    for micro in (6, 1, 4):
        b = make_backend(ckpt, micro, **{"rl.algorithm.loss_agg": loss_agg})
        m = b.rl_step(batch)
        results.append((m, weights(b)))
    (m0, w0), *rest = results
    for m, w in rest:
        assert m["loss"] == pytest.approx(m0["loss"], abs=1e-5)
        assert m["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-4)
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], atol=STEP_ATOL, rtol=0)


def test_sft_step_does_not_depend_on_micro_batch_size_and_learns(ckpt):
    batch = random_batch(2)
    out = []
    for micro in (6, 2):
        b = make_backend(ckpt, micro)
        losses = [b.sft_step(batch)["loss"] for _ in range(5)]
        out.append((losses, weights(b)))
    torch.testing.assert_close(torch.tensor(out[0][0]), torch.tensor(out[1][0]), atol=1e-5, rtol=1e-5)
    assert out[0][0][-1] < out[0][0][0]  # it learns the batch
    for k in out[0][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], atol=5 * STEP_ATOL, rtol=0)


def test_save_load_resumes_exactly(ckpt, tmp_path):
    batch = random_batch(3)
    a = make_backend(ckpt, 3)
    a.sft_step(batch)
    a.save(tmp_path / "c")
    a.sft_step(batch)
    b = make_backend(ckpt, 3)
    b.load(tmp_path / "c")
    assert b.step == 1
    b.sft_step(batch)
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0, rtol=0)


def test_nan_loss_is_skipped_without_update(ckpt):
    """(tests/pipeline/test_nonfinite.py has the rest: the count, its reset, the stop at run.max_nonfinite_in_a_row.)"""
    b = make_backend(ckpt, 6)
    batch = random_batch(4)
    batch.old_logprobs = torch.full(batch.input_ids.shape, float("nan"))
    before = weights(b)
    assert b.rl_step(batch)["skipped_updates"] == 1 and b.step == 0
    for k, v in weights(b).items():
        assert torch.equal(v, before[k])


def test_adam_options_come_from_the_config(ckpt):
    b = make_backend(ckpt, 6, **{"backend.adam_beta2": 0.95, "backend.adam_eps": 1e-6})
    group = b.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-6


def test_non_finite_gradient_is_skipped_and_applies_no_update(ckpt):
    b = make_backend(ckpt, 2)
    before = weights(b)
    hook = b.model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("nan"))
    assert b.sft_step(random_batch(3))["skipped_updates"] == 1
    hook.remove()
    assert b.step == 0 and all(torch.equal(v, before[k]) for k, v in weights(b).items())
    assert all(p.grad is None for p in b.model.parameters())  # nothing leaks into the next step
    assert b.sft_step(random_batch(3)) == make_backend(ckpt, 2).sft_step(random_batch(3))


@pytest.mark.parametrize("step", ["sft_step", "rl_step"])
def test_an_empty_batch_is_refused(ckpt, step):
    b = make_backend(ckpt, 2)
    empty = random_batch(0).select(slice(0, 0))
    empty.old_logprobs = torch.zeros(empty.input_ids.shape)
    with pytest.raises(ValueError, match="non-empty batch"):
        getattr(b, step)(empty)
    assert b.step == 0
