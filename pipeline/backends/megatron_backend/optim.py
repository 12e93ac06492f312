"""fp32 master weights for a low-precision (bf16) model; with an fp32 model the masters are the parameters themselves.

The optimizer (AdamW) always steps fp32 tensors. With bf16 parameters, gradients are copied up to fp32 masters before
clipping and the step, and the updated masters are copied back down - the scheme megatron-core's mixed-precision
optimizer uses, written here for plain parameters (megatron-core's own needs its CUDA-only DDP buffers). With fp32
parameters every copy is skipped, so the fp32 path is the degenerate case of the same code.
"""
from __future__ import annotations

import torch
from torch import Tensor


class MasterWeights:
    def __init__(self, model: torch.nn.Module, initial: dict[str, Tensor] | None = None):
        """``initial``: fp32 values by parameter name (the checkpoint), so masters do not inherit bf16 rounding."""
        self.pairs: list[tuple[str, Tensor, Tensor]] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dtype == torch.float32:
                master = p
            else:
                src = initial[name] if initial is not None else p.detach()
                master = src.detach().to(device=p.device, dtype=torch.float32).clone()
            self.pairs.append((name, p, master))

    def params(self) -> list[Tensor]:
        return [m for _, _, m in self.pairs]

    def named(self) -> list[tuple[str, Tensor]]:
        return [(n, m) for n, _, m in self.pairs]

    def grads_to_master(self) -> None:
        for _, p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    def master_to_model(self) -> None:
        with torch.no_grad():
            for _, p, m in self.pairs:
                if m is not p:
                    p.copy_(m)

    def zero_grad(self) -> None:
        for _, p, m in self.pairs:
            p.grad = None
            m.grad = None

    def state(self) -> dict[str, Tensor]:
        """fp32 weights by parameter name (what a checkpoint stores)."""
        return {n: m.detach().cpu() for n, _, m in self.pairs}

    def load(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, _, m in self.pairs:
                m.copy_(state[n])
        self.master_to_model()
