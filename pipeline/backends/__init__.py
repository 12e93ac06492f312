"""Training backends, chosen by name. Each entry names the module and class so that heavy libraries (DeepSpeed,
megatron-core) are imported only when that backend is used."""
from __future__ import annotations

import importlib

from lampo.registry import Registry
from pipeline.backends.base import TrainingBackend

BACKENDS: Registry[str] = Registry("training backend")
BACKENDS.register("torch")("pipeline.backends.torch_backend:TorchBackend")
BACKENDS.register("deepspeed")("pipeline.backends.deepspeed_backend:DeepSpeedBackend")
BACKENDS.register("megatron")("pipeline.backends.megatron_backend.backend:MegatronBackend")


def backend_class(name: str) -> type[TrainingBackend]:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["BACKENDS", "TrainingBackend", "backend_class"]
