"""The CPU compatibility layer is narrow (megatron-core modules only) and fails loudly outside what it was tested on."""
from __future__ import annotations

import pytest
import torch

from pipeline.backends.megatron_backend import cpu_compat


def test_redirects_cuda_only_inside_megatron():
    import megatron.core.pipeline_parallel.schedules as schedules

    real_current_device = torch.cuda.current_device
    cpu_compat.enable()
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is the real torch
    assert torch.cuda.current_device is real_current_device  # torch itself is untouched
    assert cpu_compat.is_enabled()


def test_other_megatron_version_is_refused(monkeypatch):
    import megatron.core.package_info as info

    monkeypatch.setattr(info, "__version__", "0.17.0")
    with pytest.raises(cpu_compat.MegatronVersionError, match="0.17.0.*0.16.x"):
        cpu_compat.check_version()


def test_stale_module_list_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_enabled", False)
    monkeypatch.setattr(cpu_compat, "PATCHED_MODULES", ("megatron.core.package_info",))
    with pytest.raises(cpu_compat.MegatronVersionError, match="package_info"):
        cpu_compat.enable()


def test_missing_module_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_enabled", False)
    monkeypatch.setattr(cpu_compat, "PATCHED_MODULES", ("megatron.core.no_such_module",))
    with pytest.raises(cpu_compat.MegatronVersionError, match="no_such_module.*stale"):
        cpu_compat.enable()
