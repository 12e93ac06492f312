"""fp32 master weights and fp32 gradient accumulation for a low-precision (bf16) model; with an fp32 model the masters
are the parameters themselves.

The optimizer (AdamW) always steps fp32 tensors. With bf16 parameters:

* gradients accumulate in fp32, in the master's ``.grad`` (the "main grad"). A hook that runs after autograd has
  written a parameter's bf16 gradient of one backward pass adds it into the master's fp32 gradient and drops the bf16
  one, so no bf16 sum spans micro-batches, and the data-parallel reduction (:func:`.grads.sync_grads`) then runs on
  the fp32 sums. Summing many micro-batches in bf16 (8 significant bits) loses every contribution smaller than half an
  ulp of the running sum; megatron-core's ``DistributedDataParallel`` avoids this the same way (its backward
  post-hook does ``param.main_grad.add_(param.grad); param.grad = None`` into fp32 buffers when
  ``grad_reduce_in_fp32=True``). That class is not used here because its contiguous gradient buffers are allocated
  on ``torch.cuda.current_device()`` (``param_and_grad_buffer.py``), so the CPU/gloo tests could not run it, and its
  bucketed overlap would replace the explicit reductions that :mod:`.grads` does identically for every layout;
* the updated masters are copied back down into the parameters after the step - the scheme of megatron-core's
  mixed-precision optimizer, written for plain parameters.

With fp32 parameters no hook is installed and every copy is skipped, so the fp32 path is the degenerate case of the
same code (autograd accumulates into ``p.grad``, which is the master's gradient).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class MasterWeights:
    def __init__(self, model: torch.nn.Module, initial: dict[str, Tensor] | None = None):
        """``initial``: fp32 values by parameter name (the checkpoint), so masters do not inherit bf16 rounding."""
        self.pairs: list[tuple[str, Tensor, Tensor]] = []
        self._hooks: list[Any] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dtype == torch.float32:
                master = p
            else:
                src = initial[name] if initial is not None else p.detach()
                master = src.detach().to(device=p.device, dtype=torch.float32).clone()
                self._hooks.append(p.register_post_accumulate_grad_hook(_accumulate_into(master)))
            self.pairs.append((name, p, master))

    def params(self) -> list[Tensor]:
        return [m for _, _, m in self.pairs]

    def named(self) -> list[tuple[str, Tensor]]:
        return [(n, m) for n, _, m in self.pairs]

    def grads_to_master(self) -> None:
        """Fold any low-precision gradient the hooks did not see (none when the backward ran through autograd) into the
        fp32 master gradients; afterwards every gradient of this rank is in ``master.grad``."""
        for _, p, m in self.pairs:
            if m is not p and p.grad is not None:
                _add_into(m, p.grad)
                p.grad = None

    def master_to_model(self) -> None:
        with torch.no_grad():
            for _, p, m in self.pairs:
                if m is not p:
                    p.copy_(m)

    def zero_grad(self) -> None:
        for _, p, m in self.pairs:
            p.grad = None
            m.grad = None

    def distinct(self) -> list[Tensor]:
        """The masters that are separate fp32 copies (bf16 model); empty for an fp32 model."""
        return [m for _, p, m in self.pairs if m is not p]

    def to(self, device: torch.device | str) -> int:
        """Move the separate fp32 masters (and any gradient they hold) to ``device`` in place (``.data`` is swapped,
        so the optimizer's references stay valid); returns the bytes handed to ``device``. The model's own parameters
        do not move."""
        moved = 0
        with torch.no_grad():
            for m in self.distinct():
                m.data = m.to(device)
                if m.grad is not None:
                    m.grad = m.grad.to(device)
                moved += m.numel() * m.element_size()
        return moved

    def state(self) -> dict[str, Tensor]:
        """fp32 weights by parameter name (what a checkpoint stores)."""
        return {n: m.detach().cpu() for n, _, m in self.pairs}

    def load(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, _, m in self.pairs:
                m.copy_(state[n])
        self.master_to_model()


def _add_into(master: Tensor, grad: Tensor) -> None:
    if master.grad is None:
        master.grad = grad.to(torch.float32, copy=True)
    else:
        master.grad.add_(grad)  # fp32 += bf16: the addend is widened first, the sum is fp32


def _accumulate_into(master: Tensor):
    def hook(p: Tensor) -> None:
        _add_into(master, p.grad)
        p.grad = None

    return hook
