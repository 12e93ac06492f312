"""Megatron-core training backend: tensor and pipeline parallelism behind :class:`TrainingBackend`.

Every rank of a ``torchrun`` world constructs the backend with the same arguments and calls the same methods with the
same (full) batch; the backend takes this data-parallel rank's share, runs it through megatron-core's
forward-backward schedule (1F1B with pipeline parallelism, plain micro-batch accumulation without), and returns the
same metrics on every rank. The model is the HF architecture mapped into megatron-core (:mod:`.model`); weights
arrive from and leave as Hugging Face tensors (:mod:`.convert`).

Gradient bookkeeping is explicit and identical for every layout (degree 1 included): after the schedule, gradients
are summed over data-parallel ranks (losses use global normalisers, so the sum is the full-batch gradient), the two
copies of a tied embedding are summed over megatron's embedding group (``pp > 1``), and the global gradient norm counts
each parameter once (tensor-parallel duplicates such as norms only on TP rank 0, the tied copy only on the first
stage), then clips like ``torch.nn.utils.clip_grad_norm_``. The optimizer is ``torch.optim.AdamW`` on each rank's
shards (element-wise, so sharded AdamW equals unsharded AdamW) with the torch backend's warm-up + cosine schedule.

Options (``BackendConfig``): ``bf16`` makes the model's parameters and pipeline activations bf16, with fp32 master
weights for the optimizer and gradients accumulated and reduced in fp32 (:mod:`.optim`); ``recompute_activations`` is
megatron-core's full uniform recomputation; ``distributed_optimizer`` partitions the AdamW state over data-parallel
ranks (ZeRO-1, torch's ``ZeroRedundancyOptimizer``, not megatron-core's CUDA-only ``DistributedOptimizer``);
``sequence_parallel`` splits the activations outside attention and MLP along the sequence over TP ranks (sequences
padded to a multiple of TP); ``rollout.colocate`` moves the optimizer state, the separate fp32 masters and the
reference model to the host around rollouts (on CUDA only; the CPU tests run that branch by forcing it). All of these,
and TP/PP/DP, are tested on CPU over gloo; NCCL/CUDA is the same code with another device and process-group backend.
"""
from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lampo.files import atomic_path
from lampo.record import TokenBatch
from lampo.seeds import derive_seed
from pipeline.backends.base import LossFn, MicroStep, TrainingBackend
from pipeline.backends.common import (
    OptimizerSpec,
    inner_optimizer,
    load_checkpoint_file,
    move_optimizer_state,
    rng_state,
    set_rng_state,
)
from pipeline.backends.megatron_backend import weights
from pipeline.backends.megatron_backend.logprobs import aligned, vocab_parallel_entropy, vocab_parallel_logprobs
from pipeline.backends.megatron_backend.model import FAMILIES, Arch, Precision, arch_from_hf, build_model
from pipeline.backends.megatron_backend.optim import MasterWeights
from pipeline.backends.megatron_backend.parallel import (
    Layout,
    check_layout,
    init_parallel,
    layout_for_world,
    world_size_from_env,
)
from pipeline.backends.megatron_backend.reshard import reshard, shard_file
from pipeline.backends.megatron_backend.schedule import broadcast_from_last_stage, run_schedule
from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.backends.base import Objective
    from pipeline.config import BackendConfig, Config, ModelConfig

SHARE = "_loss_share"  # a micro-batch's additive share of the batch loss, carried through the schedule
METRICS = "_metrics"  # and its metrics


class MegatronBackend(TrainingBackend):
    def __init__(self, model_path: str | Path, *, backend: BackendConfig, model: ModelConfig,
                 optimizer: OptimizerSpec, objective: Objective | None = None, seed: int = 0, colocate: bool = False,
                 max_nonfinite: int = 3, max_batch: int = 1, reference: bool = False):
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        super().__init__(backend=backend, objective=objective, colocate=colocate, max_nonfinite=max_nonfinite)
        self.model_path = Path(model_path)
        b = backend
        self.use_cuda = torch.cuda.is_available()
        self.hf_config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=model.trust_remote_code)
        self.arch: Arch = arch_from_hf(self.hf_config)
        self.layout: Layout = layout_for_world(b.tensor_parallel, b.pipeline_parallel, world_size_from_env())
        check_layout(self.layout, num_heads=self.arch.num_heads, num_kv_heads=self.arch.num_kv_heads,
                     num_layers=self.arch.num_layers, world_size=world_size_from_env())
        # also picks this rank's GPU
        init_parallel(self.layout, seed=derive_seed(seed, "init"), use_cuda=self.use_cuda)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.use_cuda else torch.device("cpu")
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.is_main = dist.get_rank() == 0

        self.precision = Precision(params_dtype=torch.bfloat16 if b.bf16 else torch.float32,
                                   recompute_activations=b.recompute_activations,
                                   sequence_parallel=b.sequence_parallel)
        hf_state = weights.read_hf_state(model_path)
        self.model, shard = self._build(hf_state)
        self.model.train()
        self.master = MasterWeights(self.model, shard)  # the parameters themselves in fp32
        self.reference = self._build(hf_state)[0].eval().requires_grad_(False) if reference else None
        del hf_state, shard

        # AdamW on this rank's shards; with ``distributed_optimizer`` and DP > 1 its state is further partitioned over
        # the data-parallel group (ZeRO-1)
        zero = ps.get_data_parallel_group() if b.distributed_optimizer and self.layout.dp > 1 else None
        self.optimizer = optimizer.adamw(self.master.params(), zero_group=zero)
        self.scheduler = optimizer.schedule(self.optimizer)
        self.step = 0

    def _build(self, hf_state: dict[str, Tensor]) -> tuple[torch.nn.Module, dict[str, Tensor]]:
        model = build_model(self.arch, self.hf_config, self.layout.tp, self.layout.pp, self.precision)
        shard = weights.load_into(model, hf_state, self.arch, self.layout.tp, self.layout.pp, self.tp_rank,
                                  self.pp_rank)
        return model.to(self.device), shard

    # --- config-time checks -------------------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Refuse layouts the model or the world cannot take (at config time, naming the numbers)."""
        b = cfg.backend
        shape = _model_shape(cfg)
        # a hub id's shape is not read here (no download at load): pipeline.validate.validate_cluster checks heads and
        # layers against the model's real config before any stage runs; the world-size split is checked either way
        heads, kv_heads, layers = shape or (b.tensor_parallel, b.tensor_parallel, b.pipeline_parallel)
        try:
            check_layout(Layout(b.tensor_parallel, b.pipeline_parallel), num_heads=heads, num_kv_heads=kv_heads,
                         num_layers=layers, world_size=world_size_from_env())
        except ValueError as e:
            raise ConfigError(f"backend: {e}") from None

    # --- batches -> this rank's micro-batches -------------------------------------------------------------------------
    def _dp_share(self, batch: TokenBatch) -> TokenBatch:
        """Rows of ``batch`` that this data-parallel rank processes (contiguous chunks, in rank order)."""
        n, dp = len(batch), self.layout.dp
        if dp == 1:
            return batch
        bounds = [n * r // dp for r in range(dp + 1)]
        return batch.select(slice(bounds[self.dp_rank], bounds[self.dp_rank + 1]))

    def _micro_batches(self, batch: TokenBatch) -> list[TokenBatch]:
        share = self._dp_share(batch)
        if len(share) == 0:
            raise ValueError(f"batch of {len(batch)} sequences is smaller than data_parallel={self.layout.dp}")
        return [mb.to(self.device) for mb in share.split(self.options.micro_batch_size)]

    def _dp_gather_rows(self, t: Tensor) -> Tensor:
        """Concatenate per-DP-rank row blocks of a ``(b_r, T)`` tensor in rank order."""
        from megatron.core import parallel_state as ps

        if self.layout.dp == 1:
            return t
        parts: list[Any] = [None] * self.layout.dp
        dist.all_gather_object(parts, t.cpu(), group=ps.get_data_parallel_group())
        return torch.cat(parts)

    # --- forward ------------------------------------------------------------------------------------------------------
    def _per_token(self, logits: Tensor, mb: TokenBatch, *, entropy: bool) -> tuple[Tensor, Tensor | None]:
        """This micro-batch's aligned log-probs ``(b, T)`` and entropy ``(b, T)`` from vocab-parallel logits."""
        logits = logits[:, :-1]  # (b, T-1, Vp/tp): position t-1 predicts token t
        lp = aligned(vocab_parallel_logprobs(logits, mb.input_ids[:, 1:], self.arch.vocab_size), mb.attention_mask)
        ent = aligned(vocab_parallel_entropy(logits, self.arch.vocab_size), mb.attention_mask) if entropy else None
        return lp, ent

    @torch.no_grad()
    def token_logprobs(self, batch: TokenBatch, *, reference: bool = False) -> Tensor:
        model = self._scoring_model(self.model, reference)
        mbs = self._micro_batches(batch)

        def loss_fn(logits: Tensor, mb: TokenBatch) -> tuple[Tensor, dict[str, Any]]:
            lp, _ = self._per_token(logits, mb, entropy=False)
            return lp.sum() * 0.0, {"logprobs": lp.float().cpu()}

        outs = run_schedule(model, mbs, loss_fn, forward_only=True)
        local = torch.cat([o["logprobs"] for o in outs]) if outs else None
        shape = (sum(len(mb) for mb in mbs), batch.input_ids.shape[1])
        return self._dp_gather_rows(broadcast_from_last_stage(local, shape))

    # --- the backend's part of the training step (TrainingBackend.sft_step / rl_step) ------------------------------
    def _forward_backward(self, batch: TokenBatch, loss_fn: LossFn) -> list[MicroStep]:
        """This DP rank's micro-batches through megatron-core's schedule (``loss_fn`` runs on the last pipeline stage,
        which passes the results on to the other stages); every DP rank's results are gathered, in rank order, which
        is micro-batch order of the whole batch."""
        from megatron.core import parallel_state as ps

        def last_stage_loss(logits: Tensor, mb: TokenBatch) -> tuple[Tensor, dict[str, Any]]:
            loss, metrics = loss_fn(logits, mb)
            return loss, {SHARE: loss.item(), METRICS: metrics}

        mbs = self._micro_batches(batch)
        outs = run_schedule(self.model, mbs, last_stage_loss, forward_only=False)
        local = [MicroStep(mb.response_mask.sum().item(), o[SHARE], o[METRICS]) for mb, o in zip(mbs, outs)] \
            if outs else None
        local = broadcast_from_last_stage(local)
        if self.layout.dp == 1:
            return local
        gathered: list[Any] = [None] * self.layout.dp
        dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
        return [p for part in gathered for p in part]

    def _optimizer_step(self) -> dict[str, float]:
        from pipeline.backends.megatron_backend.grads import clip_grad_norm, sync_grads

        self.master.grads_to_master()
        sync_grads(self.model, self.layout, self.master)  # on the fp32 gradient sums
        grad_norm = clip_grad_norm(self.master.named(), self.options.grad_clip,
                                   tied_across_stages=self.model.tied_across_stages)
        return self._apply_update(grad_norm, self.master.zero_grad, after_update=self.master.master_to_model)

    # --- checkpoints --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Each (TP, PP) shard writes its own file from DP rank 0 (DP replicas are identical), plus ``layout.json``.

        RNG state differs per rank, so every rank writes its own small RNG file.
        """
        from megatron.core import tensor_parallel

        path = Path(path)
        if self.is_main:
            path.mkdir(parents=True, exist_ok=True)
            (path / "layout.json").write_text(json.dumps({"tp": self.layout.tp, "pp": self.layout.pp}))
        dist.barrier()
        if hasattr(self.optimizer, "consolidate_state_dict"):  # ZeRO: collect the partitions on DP rank 0
            self.optimizer.consolidate_state_dict(to=0)
        if self.dp_rank == 0:
            torch.save({"model": self.master.state(), "optimizer": self.optimizer.state_dict(),
                        "param_names": [n for n, _ in self.master.named()],
                        "scheduler": self.scheduler.state_dict(), "step": self.step},
                       shard_file(path, self.tp_rank, self.pp_rank))
        if hasattr(self.optimizer, "_all_state_dicts"):
            # ZeRO keeps the consolidated copy of every rank's state after save; it is stale from the next step on and
            # would pin the whole optimizer state in host memory until the next save
            self.optimizer._all_state_dicts = []
        rng = {"rng": rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
        torch.save(rng, path / f"rng_rank{dist.get_rank()}.pt")
        dist.barrier()

    def load(self, path: str | Path) -> None:
        """Restore :meth:`save`'s shards. Another DP degree needs nothing; another TP x PP layout is resharded
        (weights and AdamW moments, :mod:`.reshard`), and then the per-rank RNG states are not restored (they do not
        map across layouts; nothing on the training path draws random numbers: no dropout).

        Every file is read with ``weights_only=True`` (:func:`~pipeline.backends.common.load_checkpoint_file`): what
        :meth:`save` writes is tensors and plain containers only (the optimizer's and LR schedule's state dicts, the
        RNG states, megatron-core's RNG tracker states: a dict of byte tensors); megatron-core's own checkpoint loader
        (``dist_checkpointing``) is not used."""
        from megatron.core import tensor_parallel

        path = Path(path)
        saved = json.loads((path / "layout.json").read_text())
        same_layout = (saved["tp"], saved["pp"]) == (self.layout.tp, self.layout.pp)
        if same_layout:
            state = load_checkpoint_file(shard_file(path, self.tp_rank, self.pp_rank), map_location="cpu")
        else:
            state = reshard(path, (saved["tp"], saved["pp"]), self.arch, self.layout.tp, self.layout.pp,
                            self.tp_rank, self.pp_rank, [n for n, _ in self.master.named()])
        self.master.load(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if inner_optimizer(self.optimizer) is not self.optimizer:
            # ZeRO's load_state_dict also fills its wrapper's own .state: None for the other ranks' parameters and a
            # second copy of this rank's moments, which its step never reads (it steps the local optimizer, where the
            # loaded moments went). Drop them so the moments live once, where release_memory moves them.
            self.optimizer.state.clear()
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        rng_file = path / f"rng_rank{dist.get_rank()}.pt"
        if same_layout and rng_file.is_file():  # absent when resuming with more DP ranks than were saved
            rng = load_checkpoint_file(rng_file)
            set_rng_state(rng["rng"])
            tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])

    # --- weights out --------------------------------------------------------------------------------------------------
    def named_full_tensors(self, ranks: Sequence[int] = (0,)) -> Iterator[tuple[str, Tensor]]:
        """Full tensors in the model's dtype (bf16 with ``backend.bf16``), for the rollout engines, on the device the
        model trains on (CUDA: the engine receives them by IPC handle; no host copy), on each rank of ``ranks``.
        Tensors that need no merging may share storage with the live parameters: consume them before the next
        optimizer step."""
        yield from weights.gather_hf(dict(self.model.named_parameters()), self.arch, self.layout, self.pp_rank,
                                     self.dp_rank, device=self.device, ranks=ranks)

    def export_hf(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        # the fp32 master weights, one unit at a time to the host; collective: every rank iterates
        full = {k: v.cpu() for k, v in weights.gather_hf(dict(self.master.named()), self.arch, self.layout,
                                                         self.pp_rank, self.dp_rank, device=self.device)}
        if not self.is_main:
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.hf_config)
        cfg.dtype = "float32"  # what is written: the fp32 master weights
        cfg.save_pretrained(path)
        for extra in self.model_path.iterdir():  # tokenizer and generation files travel with the weights
            if extra.suffix in (".json", ".txt", ".model", ".jinja") and extra.name not in (
                    "config.json", "model.safetensors.index.json") and not (path / extra.name).exists():
                shutil.copy(extra, path / extra.name)
        with atomic_path(path / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp), metadata={"format": "pt"})

    # --- colocated rollouts -------------------------------------------------------------------------------------------
    def _offloads(self) -> bool:
        """Whether :meth:`release_memory` moves state to the host: on an accelerator with ``rollout.colocate``."""
        return self.use_cuda and self.colocate

    def _move_training_state(self, *, to_host: bool) -> None:
        """The optimizer state (AdamW moments, wherever the optimizer keeps them: for ZeRO-1 its local optimizer's),
        the separate fp32 master weights (bf16 model) and the reference model, to the host or back. The model's own
        parameters stay: the weight sync that follows :meth:`release_memory` reads them."""
        device = torch.device("cpu") if to_host else self.device
        move_optimizer_state(self.optimizer, device)
        self.master.to(device)
        if self.reference is not None:
            self.reference.to(device)


def _model_shape(cfg: Config) -> tuple[int, int, int] | None:
    """(attention heads, key/value heads, layers) of the configured model, read without loading weights; None for a
    hub id (not downloaded at config load)."""
    if cfg.model.path == "tiny":
        t = cfg.model.tiny
        return t.num_heads, t.num_kv_heads, t.num_layers
    config_json = Path(cfg.model.path) / "config.json"
    if not config_json.is_file():
        return None
    c = json.loads(config_json.read_text())
    if c.get("model_type") not in FAMILIES:
        raise ConfigError(f"model.path={cfg.model.path!r} is a {c.get('model_type')!r} model; backend=megatron maps "
                          f"{', '.join(sorted(FAMILIES))} - use backend=torch or backend=deepspeed for it")
    heads = c["num_attention_heads"]
    return heads, c.get("num_key_value_heads") or heads, c["num_hidden_layers"]
