"""Resume a checkpoint saved with another TP x PP layout: merge its shards to HF layout, split them for this one.

AdamW's state is element-wise (``exp_avg`` and ``exp_avg_sq`` have their parameter's shape), so the moments are
resharded with exactly the weight conversion of :mod:`.convert`. Every rank reads every shard file of the checkpoint
and merges the full model and moments in host memory: simple and exact, sized for models whose full fp32 weights
and two moments fit in one host's memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.backends.common import load_checkpoint_file
from pipeline.backends.megatron_backend import convert
from pipeline.backends.megatron_backend.model import Arch

MOMENTS = ("exp_avg", "exp_avg_sq")


def shard_file(path: Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(path) / f"megatron_tp{tp_rank}_pp{pp_rank}.pt"


def reshard(path: Path, saved: tuple[int, int], arch: Arch, tp: int, pp: int, tp_rank: int, pp_rank: int,
            names: list[str]) -> dict[str, Any]:
    """This rank's ``{"model", "optimizer", "scheduler", "step"}`` in layout ``(tp, pp)`` from a checkpoint saved
    with layout ``saved`` = (tp, pp). ``names``: this rank's trainable parameter names, in optimizer order."""
    stp, spp = saved
    files = {(r, s): load_checkpoint_file(shard_file(path, r, s), map_location="cpu")  # weights_only=True
             for r in range(stp) for s in range(spp)}
    first = files[0, 0]
    out = {"scheduler": first["scheduler"], "step": first["step"]}
    out["model"] = _split({k: f["model"] for k, f in files.items()}, arch, stp, spp, tp, pp, tp_rank, pp_rank)
    states = {k: _state_by_name(f) for k, f in files.items()}
    group = dict(first["optimizer"]["param_groups"][0], params=list(range(len(names))))
    if not any(states.values()):  # saved before the first optimizer step
        out["optimizer"] = {"state": {}, "param_groups": [group]}
        return out
    step = next(st["step"] for s in states.values() for st in s.values())
    moments = {m: _split({k: {n: st[m] for n, st in s.items()} | _zeros_for_missing(files[k]["model"], s, m)
                          for k, s in states.items()}, arch, stp, spp, tp, pp, tp_rank, pp_rank) for m in MOMENTS}
    out["optimizer"] = {"state": {i: {"step": step.clone() if isinstance(step, Tensor) else step,
                                      **{m: moments[m][n] for m in MOMENTS}} for i, n in enumerate(names)},
                        "param_groups": [group]}
    return out


def _state_by_name(f: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    names = f["param_names"]
    return {names[i]: st for i, st in f["optimizer"]["state"].items()}


def _zeros_for_missing(model: dict[str, Tensor], state: dict[str, Any], moment: str) -> dict[str, Tensor]:
    return {n: torch.zeros_like(w) for n, w in model.items() if n not in state}


def _split(shards: dict[tuple[int, int], dict[str, Tensor]], arch: Arch, stp: int, spp: int, tp: int, pp: int,
           tp_rank: int, pp_rank: int) -> dict[str, Tensor]:
    full = convert.megatron_to_hf(shards, arch, stp, spp)
    return convert.hf_to_megatron(full, arch, tp, pp, tp_rank, pp_rank)
