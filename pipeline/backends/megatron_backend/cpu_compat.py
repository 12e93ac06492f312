"""Run megatron-core 0.16.x on CPU (gloo) by redirecting its few CUDA assumptions; used by tests and the tiny CPU run.

megatron-core targets CUDA. Measured on 0.16.1, a CPU forward/backward with tensor and pipeline parallelism fails
only where the library names the GPU directly:

* ``torch.cuda.current_device()`` as an allocation device (rotary embedding, tensor-parallel gathers, pipeline p2p);
* ``torch.cuda.synchronize()`` after pipeline p2p;
* ``device="cuda"`` literals in the pipeline schedules (a token counter);
* the CUDA RNG states tracker (``tensor_parallel.random``), which reads and writes CUDA generator state.

:func:`enable` fixes exactly these, and only inside the megatron-core modules listed in :data:`PATCHED_MODULES`: each
of them gets its module-global ``torch`` replaced by a thin proxy whose ``cuda.current_device()`` is the CPU,
``cuda.synchronize()`` is a no-op, ``cuda.manual_seed`` / ``get_rng_state`` / ``set_rng_state`` act on the CPU
generator (so the RNG tracker's named streams are CPU generator states), and whose tensor factories map
``device="cuda"`` to the CPU. Everything else resolves to the real ``torch``; nothing outside megatron-core changes.
The RNG tracker's two state accessors are pointed at the CPU generator.

The default core attention (which forks the CUDA RNG tracker and uses a global CUDA buffer) is not patched; the model
uses :class:`pipeline.backends.megatron_backend.attention.SDPAttention` through megatron-core's layer-spec mechanism
instead.

Pinned: :data:`SUPPORTED` is the tested version range. On another version, or when a patched module or symbol is no
longer there (or no longer mentions CUDA, meaning the list is stale), :func:`enable` raises instead of guessing.
"""
from __future__ import annotations

import importlib
import inspect
import types
from typing import Any

import torch

#: megatron-core versions this layer was written and tested against (major, minor)
SUPPORTED = ((0, 16),)

#: modules on the CPU training path that name CUDA directly (megatron-core 0.16.1), and why each is needed
PATCHED_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # get_emb moves inv_freq to current_device()
    "megatron.core.tensor_parallel.mappings",  # TP all-gather output buffers (gather_from_tensor_model_parallel_region)
    "megatron.core.tensor_parallel.layers",  # sequence parallelism: all-gather buffers in the linear backward
    "megatron.core.utils",  # sequence parallelism: GlobalMemoryBuffer (the linear layers' all-gather scratch)
    "megatron.core.tensor_parallel.random",  # RNG tracker: torch.cuda.get/set_rng_state, manual_seed
    "megatron.core.pipeline_parallel.p2p_communication",  # shape/activation buffers, synchronize()
    "megatron.core.pipeline_parallel.schedules",  # device="cuda" token counters
)

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like", "ones_like")
_enabled = False


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is outside the range the CPU compatibility layer was tested with."""


def _cpu_device(device: Any) -> Any:
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda") or (
            isinstance(device, str) and device.startswith("cuda:")):
        return torch.device("cpu")
    return device


def _factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as seen by a patched megatron-core module."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by a patched megatron-core module: real torch except the CUDA names above."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def check_version() -> str:
    """Return the installed megatron-core version; raise :class:`MegatronVersionError` outside :data:`SUPPORTED`."""
    try:
        from megatron.core.package_info import __version__
    except ImportError as e:
        raise MegatronVersionError(
            f"megatron-core is not importable ({e}); install it with `pip install megatron-core==0.16.1`") from None
    major, minor = (int(x) for x in __version__.split(".")[:2])
    if (major, minor) not in SUPPORTED:
        tested = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
        raise MegatronVersionError(
            f"megatron-core {__version__} is installed, but the CPU compatibility layer was tested only with {tested}. "
            "Install megatron-core==0.16.1, or re-check every entry of cpu_compat.PATCHED_MODULES against the new "
            "version's source and extend cpu_compat.SUPPORTED.")
    return __version__


def enable() -> None:
    """Apply the CPU redirections (idempotent). Call before building a model; never on a CUDA run."""
    global _enabled
    if _enabled:
        return
    version = check_version()
    proxy = _TorchOnCpu()
    for name in PATCHED_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            raise MegatronVersionError(f"megatron-core {version}: module {name} is gone ({e}); "
                                       "cpu_compat.PATCHED_MODULES is stale") from None
        if getattr(mod, "torch", None) is not torch or "cuda" not in inspect.getsource(mod):
            raise MegatronVersionError(f"megatron-core {version}: {name} no longer uses torch.cuda the way "
                                       "cpu_compat expects; re-check cpu_compat.PATCHED_MODULES")
        mod.torch = proxy
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    for sym in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not callable(getattr(random, sym, None)):
            raise MegatronVersionError(f"megatron-core {version}: tensor_parallel.random.{sym} is gone; "
                                       "cpu_compat cannot redirect the RNG tracker")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    _enabled = True


def is_enabled() -> bool:
    return _enabled
