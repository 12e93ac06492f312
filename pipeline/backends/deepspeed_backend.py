"""DeepSpeed ZeRO training backend: the torch backend's exact step, data-parallel over ``torch.distributed`` ranks.

One ``sft_step``/``rl_step`` is one optimizer step on the GLOBAL batch it is given, whatever the world size:

* the batch is cut into micro-batches of ``backend.micro_batch_size`` rows exactly as :class:`TorchBackend` cuts it,
  and micro-batch ``m`` runs on data-parallel rank ``m % world``. A rank with fewer micro-batches than the others runs
  a zero-weight dummy forward/backward, because ZeRO's gathers and reductions are collective and must be matched;
* loss normalisers (response-token count, sequence count) are computed on the global batch, so every micro-batch loss
  is already a share of the global loss. DeepSpeed would divide it by ``gradient_accumulation_steps`` (we pass
  ``scale_wrt_gas=False``) and its gradient reduction averages over ranks (we multiply by the world size first), so
  the reduced gradient is the plain sum that the torch backend accumulates;
* the accumulation boundary is set by hand on the last micro-batch, so a batch of any size is one optimizer step;
  ``gradient_accumulation_steps`` in the DeepSpeed config is updated to the real count every step for its bookkeeping.

Optimizer and schedule: AdamW (``backend.adam_*`` betas and eps, decoupled weight decay) built by DeepSpeed from its
config: ``torch.optim.AdamW`` normally, DeepSpeed's CPU Adam in AdamW mode when ``backend.offload_optimizer`` is on
(that op is compiled on first use). The LR follows :func:`~pipeline.backends.common.warmup_cosine` through a
``LambdaLR`` that DeepSpeed steps at each optimizer step; gradient clipping is DeepSpeed's ``gradient_clipping``.

Devices: on CUDA, NCCL and one GPU per local rank; bf16 (``backend.bf16``) is used only there, with DeepSpeed keeping
fp32 master weights. Without CUDA we set ``DS_ACCELERATOR=cpu`` before DeepSpeed first looks for an accelerator (an
explicit ``DS_ACCELERATOR`` in the environment wins) and use gloo. ``torch.distributed`` is initialised from the
variables ``torchrun`` sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), or as a one-process group on a
free local port when they are absent; an already initialised process group is used as is.

Departures from the torch backend, none of which changes the computed step: the KL reference model is a plain frozen
copy replicated on every rank (not ZeRO-partitioned); the HF checkpoint is loaded in fp32 on the CPU by every rank
before DeepSpeed moves/partitions it (no ``zero.Init``), so ZeRO-3 saves optimizer and gradient memory, not load-time
memory; ``save``/``load`` use DeepSpeed's own checkpoint format (sharded optimizer state), and ``export_hf`` writes
the standard HF format. A step with a non-finite gradient norm is skipped (no update) and counted, as in every backend
(:class:`~pipeline.backends.base.TrainingBackend`): ZeRO stages skip such a step themselves (and the LR schedule with
it: ``was_step_applied``), at stage 0 we check before stepping. No fp16 loss scaling is configured (bf16 or fp32
only), so DeepSpeed never skips a step for a loss-scale overflow that would not be a real fault.

Colocated rollouts (``rollout.colocate``, CUDA): :meth:`~DeepSpeedBackend.release_memory` moves the optimizer
state to the host (``engine.offload_states`` for what DeepSpeed can move, the torch AdamW moments by hand where it
cannot: stage 0, and stage 3 without DeepSpeed's FusedAdam) and keeps the model weights in place for the weight sync;
the CPU tests run this branch by faking the device.
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lampo.record import TokenBatch
from pipeline.backends.base import LossFn, MicroStep, TrainingBackend
from pipeline.backends.common import (
    OptimizerSpec,
    hf_logits,
    inner_optimizer,
    load_checkpoint_file,
    move_optimizer_state,
    rng_state,
    set_rng_state,
    token_logprobs_from_logits,
)
from pipeline.config import ConfigError
from pipeline.dist import init_process_group
from pipeline.models import load_hf_model

if TYPE_CHECKING:
    from pipeline.backends.base import Objective
    from pipeline.config import BackendConfig, Config, ModelConfig

CHECKPOINT_TAG = "state"  # DeepSpeed's sub-folder inside a save() folder


def setup_accelerator() -> torch.device:
    """The device this process trains on, after pointing DeepSpeed at the CPU accelerator when there is no CUDA.

    Must run before DeepSpeed's first ``get_accelerator()`` call (importing deepspeed does not make one).
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        raise RuntimeError(f"no CUDA device, but DeepSpeed uses the {get_accelerator().device_name()!r} accelerator "
                           "(DS_ACCELERATOR is set or DeepSpeed was initialised earlier); unset DS_ACCELERATOR")
    # DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce op for CPU *inference* (2-3 minutes, C++) when
    # it creates its backend; training collectives never use it (inference_all_reduce falls back to torch), so mark
    # it unavailable. DeepSpeed keeps this dict in its module precisely so that edits persist.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return torch.device("cpu")


class DeepSpeedBackend(TrainingBackend):
    def __init__(self, model_path: str | Path, *, backend: BackendConfig, model: ModelConfig,
                 optimizer: OptimizerSpec, objective: Objective | None = None, seed: int = 0, colocate: bool = False,
                 max_nonfinite: int = 3, max_batch: int = 1, reference: bool = False):
        self._check_options(backend)
        super().__init__(backend=backend, objective=objective, colocate=colocate, max_nonfinite=max_nonfinite)
        self.device = setup_accelerator()
        init_process_group(use_cuda=self.device.type == "cuda")
        import deepspeed

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world == 1:
            os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it; torchrun sets it
        self.is_main = self.rank == 0
        self.bf16 = backend.bf16 and self.device.type == "cuda"
        self.micro = backend.micro_batch_size
        hf_model = load_hf_model(model_path, model, torch.device("cpu")).train()  # fp32; DeepSpeed moves/casts it
        if backend.recompute_activations:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference = None
        if reference:
            dtype = torch.bfloat16 if self.bf16 else torch.float32
            self.reference = copy.deepcopy(hf_model).to(self.device, dtype).eval().requires_grad_(False)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=hf_model, model_parameters=[p for p in hf_model.parameters() if p.requires_grad],
            config=self._ds_config(optimizer, max_batch), lr_scheduler=optimizer.schedule)
        self.module = self.engine.module  # the HF model (ZeRO-3: parameters partitioned)
        self.step = 0

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        cls._check_options(cfg.backend)

    @staticmethod
    def _check_options(b: BackendConfig) -> None:
        """Refuse ``backend.*`` options this backend cannot run (at config load, and again at construction)."""
        if b.tensor_parallel != 1 or b.pipeline_parallel != 1:
            raise ConfigError(f"backend.tensor_parallel={b.tensor_parallel}, pipeline_parallel={b.pipeline_parallel}: "
                             "the deepspeed backend is data-parallel only (ZeRO); set both to 1 or use "
                             "backend=megatron for tensor/pipeline parallelism")
        if b.sequence_parallel or b.distributed_optimizer:
            raise ConfigError("backend.sequence_parallel and backend.distributed_optimizer are Megatron options; with "
                             "backend=deepspeed shard the optimizer with backend.zero_stage instead")
        if b.offload_optimizer and b.zero_stage == 0:
            raise ConfigError("backend.offload_optimizer needs ZeRO: set backend.zero_stage to 1, 2 or 3")
        if b.micro_batch_size < 1:
            raise ConfigError(f"backend.micro_batch_size={b.micro_batch_size} must be >= 1")

    def _ds_config(self, spec: OptimizerSpec, max_batch: int) -> dict[str, Any]:
        b = self.options
        # The real accumulation count is set every step; the initial one only has to be > 1 whenever a step can
        # accumulate (a batch of up to ``max_batch`` sequences), because ZeRO's offload path picks its gradient
        # buffers from it at construction.
        gas = max(1, math.ceil(max_batch / (self.micro * self.world)))
        zero: dict[str, Any] = {"stage": b.zero_stage}
        adam = spec.adamw_options()
        if b.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        return {
            "train_micro_batch_size_per_gpu": self.micro,
            "gradient_accumulation_steps": gas,
            "train_batch_size": self.micro * gas * self.world,
            "gradient_clipping": b.grad_clip,
            "optimizer": {"type": "AdamW", "params": {
                **adam, "betas": list(adam["betas"]), "torch_adam": not b.offload_optimizer}},
            "zero_optimization": zero,
            "bf16": {"enabled": self.bf16, "check_grad_overflow": True},  # skip (and report) inf/NaN steps
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    # --- forward ------------------------------------------------------------------------------------------------------
    def _my_micro_batches(self, batch: TokenBatch) -> tuple[list[TokenBatch], list[int | None]]:
        """All micro-batches of the global ``batch`` and the indices this rank runs; ``None`` pads a rank to the
        common count ``ceil(M / world)`` with a dummy micro-batch."""
        mbs = batch.split(self.micro)
        mine: list[int | None] = list(range(self.rank, len(mbs), self.world))
        mine += [None] * (math.ceil(len(mbs) / self.world) - len(mine))
        return mbs, mine

    @torch.no_grad()
    def token_logprobs(self, batch: TokenBatch, *, reference: bool = False) -> Tensor:
        model = self._scoring_model(self.engine, reference)
        mbs, mine = self._my_micro_batches(batch)
        T = batch.input_ids.shape[1]
        local = torch.zeros((len(mine), self.micro, T), device=self.device)  # (k, micro, T)
        for k, m in enumerate(mine):
            mb = mbs[0 if m is None else m].to(self.device)
            lp = token_logprobs_from_logits(hf_logits(model, mb), mb.input_ids)  # (b, T); dummy: gathers only
            local[k, :len(mb)] = lp * mb.attention_mask
        if self.world > 1:
            shards = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(shards, local)
        else:
            shards = [local]
        # micro-batch m was computed by rank m % world as its (m // world)-th
        return torch.cat([shards[m % self.world][m // self.world, :len(mb)].cpu() for m, mb in enumerate(mbs)])

    # --- the backend's part of the training step (TrainingBackend.sft_step / rl_step) ------------------------------
    def _forward_backward(self, batch: TokenBatch, loss_fn: LossFn) -> list[MicroStep]:
        """Forward/backward of this rank's micro-batches (micro-batch ``m`` on rank ``m % world``); every rank's
        results are gathered, in micro-batch order."""
        mbs, mine = self._my_micro_batches(batch)
        self.engine.set_train_batch_size(len(mine) * self.micro * self.world)
        parts = []
        for k, m in enumerate(mine):
            self.engine.set_gradient_accumulation_boundary(k == len(mine) - 1)
            mb = mbs[0 if m is None else m].to(self.device)
            logits = hf_logits(self.engine, mb)
            if m is None:  # keeps collectives matched; contributes exactly zero gradient
                loss = logits.float().sum() * 0.0
            else:
                loss, metrics = loss_fn(logits, mb)
                parts.append((m, MicroStep(mb.response_mask.sum().item(), loss.item(), metrics)))
            # undo DeepSpeed's mean over data-parallel ranks; scale_wrt_gas=False: no division by the micro-batch count
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
        return [p for _, p in sorted(parts, key=lambda p: p[0])]

    def _optimizer_step(self) -> dict[str, float]:
        lr = self.scheduler.get_last_lr()[0]
        own_norm = None
        if self.options.zero_stage == 0:  # without ZeRO DeepSpeed neither records the norm nor skips on inf/NaN
            own_norm = torch.nn.utils.get_total_norm([p.grad for p in self.module.parameters() if p.grad is not None])
            if not torch.isfinite(own_norm):
                self.module.zero_grad(set_to_none=True)
                return self._skipped(own_norm.item(), lr)
        self.engine.step()
        if not self.engine.was_step_applied():  # ZeRO saw inf/NaN gradients: no update, no LR step, grads cleared
            return self._skipped(self.engine.get_global_grad_norm(), lr)
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = grad_norm if grad_norm is not None else own_norm
        if grad_norm is not None and not math.isfinite(float(grad_norm)):  # a path that did not skip: say so
            raise FloatingPointError(f"gradient norm is {float(grad_norm)} at step {self.step - 1} and DeepSpeed "
                                     "applied the update; resume from the last checkpoint with a lower learning rate")
        # no norm at all only when DeepSpeed computes none (ZeRO 1/2 without gradient clipping)
        return {"grad_norm": float(grad_norm) if grad_norm is not None else math.nan, "lr": lr, "skipped": False}

    # --- checkpoints and weights --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Collective: every rank must call it. Writes DeepSpeed's checkpoint under ``path/state`` (optimizer state
        sharded per rank) plus one RNG file per rank."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, client_state={"step": self.step})
        torch.save(rng_state(), path / f"rng_rank{self.rank}.pt")
        dist.barrier()

    def load(self, path: str | Path) -> None:
        """Collective. The world size must match the one that saved (ZeRO shards are per rank).

        Our own file (the RNG state) is read with ``weights_only=True`` (:func:`~.common.load_checkpoint_file`), before
        DeepSpeed reads its files. DeepSpeed's own files are NOT: ``engine.load_checkpoint`` reads them through its
        checkpoint engine, ``TorchCheckpointEngine.load`` in ``deepspeed/runtime/checkpoint_engine/
        torch_checkpoint_engine.py``, which calls ``torch.load(path, map_location=..., weights_only=False)`` (deepspeed
        0.19.x), for the model states (``DeepSpeedEngine._load_checkpoint`` in ``deepspeed/runtime/engine.py``, via
        ``SDLoaderFactory`` in ``deepspeed/runtime/state_dict_factory.py``) and for the ZeRO optimizer shards
        (``DeepSpeedEngine._get_all_zero_checkpoint_state_dicts``). Those shards do pickle DeepSpeed classes
        (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``), so ``weights_only=True`` would refuse them as they
        are. What protects a resume here is the checkpoint's ``MANIFEST.json`` (sha256 of every file, checked by
        :meth:`pipeline.context.Context.begin_stage` before this is called): it catches a damaged or swapped file, but
        not someone who can rewrite the manifest too - only resume DeepSpeed checkpoints from a run folder you trust.
        """
        path = Path(path)
        rng_file = path / f"rng_rank{self.rank}.pt"
        if not (path / CHECKPOINT_TAG).is_dir() or not rng_file.is_file():
            raise FileNotFoundError(f"{path} holds no DeepSpeed backend checkpoint for rank {self.rank} (expected "
                                    f"{CHECKPOINT_TAG}/ and {rng_file.name}); was it saved by this backend with the "
                                    "same world size?")
        rng = load_checkpoint_file(rng_file)
        loaded, client = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        self.step = client["step"]
        set_rng_state(rng)

    def named_full_tensors(self, ranks: Sequence[int] = (0,)) -> Iterator[tuple[str, Tensor]]:
        """Collective under ZeRO-3 (each parameter is gathered in turn). Yields detached copies on the ranks of
        ``ranks`` only, in ``state_dict`` order with Hugging Face names (tied weights under each of their names)."""
        from deepspeed.runtime.zero import GatheredParameters

        for name, t in self.module.state_dict(keep_vars=True).items():
            with GatheredParameters([t], modifier_rank=None):  # no-op unless t is ZeRO-3 partitioned
                full = t.detach().clone() if self.rank in ranks else None
            if full is not None:
                yield name, full

    def export_hf(self, path: str | Path) -> None:
        """Collective; the main rank writes config.json + model.safetensors (in the training dtype: bf16 when
        ``backend.bf16``)."""
        state = dict(self.named_full_tensors())
        if self.is_main:
            self.module.save_pretrained(path, state_dict=state, safe_serialization=True)
        dist.barrier()

    # --- colocated rollouts -------------------------------------------------------------------------------------------
    def _moves_optimizer_state_itself(self) -> bool:
        """Whether the AdamW state is moved here rather than by ``engine.offload_states``.

        Without ZeRO (stage 0) the engine's optimizer is a plain torch optimizer (or DeepSpeed's BF16 wrapper), which
        has no ``offload_states``. At stage 3, DeepSpeed offloads optimizer state and fp32 masters only for its own
        FusedAdam (``stage3.py``, ``offload_states``: "Offloading is supported only for DeepSpeed FusedAdam.", an
        assertion), and this backend builds ``torch.optim.AdamW``. With ``offload_optimizer`` that state already lives
        on the host. Stages 1-2 offload any torch optimizer's state themselves (``offload_optimizer_states``).
        """
        b = self.options
        if b.offload_optimizer:
            return False
        if b.zero_stage == 0:
            return True
        if b.zero_stage == 3:
            from deepspeed.ops.adam.fused_adam import FusedAdam

            return not isinstance(inner_optimizer(self.engine.optimizer), FusedAdam)
        return False

    def _offload_include(self) -> list[Any]:
        """The ZeRO states ``engine.offload_states`` moves: never ``lp_params``, the model weights - the weight sync
        to the rollout engine reads them right after :meth:`release_memory` (stage 1-2 would otherwise re-point every
        parameter at a host buffer, and the engine would be sent host tensors), and the next step needs them."""
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as S

        if self._moves_optimizer_state_itself():  # stage 3 without FusedAdam: gradients' buffers only
            return [S.lp_grads, S.contiguous_grad_buffer]
        return [S.optim_states, S.hp_params, S.lp_grads, S.contiguous_grad_buffer]

    def _offloads(self) -> bool:
        return self.device.type == "cuda" and self.colocate

    def _move_training_state(self, *, to_host: bool) -> None:
        """To the host: the optimizer state (AdamW moments; with ZeRO also the fp32 master partition and the gradient
        partitions); the model weights stay for the weight sync. Back: all of it to the accelerator."""
        from deepspeed.accelerator import get_accelerator

        if self._moves_optimizer_state_itself():
            device = "cpu" if to_host else get_accelerator().current_device_name()
            move_optimizer_state(self.engine.optimizer, device)
        if self.options.zero_stage > 0:
            if to_host:
                self.engine.offload_states(include=self._offload_include())
            else:
                self.engine.reload_states()
