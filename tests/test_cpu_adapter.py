"""The CPU adapter: pinned to megatron-core 0.16.1, scoped to megatron-core, active only without a GPU."""

import pytest
import torch

import megatron.core
from megatron_mmbert import cpu_adapter


def test_installed_megatron_core_is_the_pinned_release():
    # Fails loudly when another megatron-core is installed: the adapter and specs were read against it.
    assert megatron.core.__version__ == cpu_adapter.PINNED_MEGATRON_CORE == "0.16.1"


def test_other_megatron_core_versions_are_refused(monkeypatch):
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match="megatron-core 0.17.0 is installed, but megatron_mmbert is pinned to 0.16.1"):
        cpu_adapter.check_megatron_version()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the adapter is only for machines without a GPU")
def test_redirects_only_inside_megatron_core():
    assert cpu_adapter.install() is True
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as tp_random

    # megatron-core's view of torch puts "cuda" tensors on the CPU ...
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    # ... and its CUDA RNG calls use the CPU generator.
    torch.manual_seed(3)
    state = tp_random._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    # torch itself is untouched for everyone else.
    assert torch.zeros is not schedules.torch.zeros
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    # Tensor.type() answers as on a GPU only to megatron-core callers.
    assert torch.zeros(1).type() == "torch.FloatTensor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the adapter is only for machines without a GPU")
def test_modules_imported_later_are_patched_too():
    cpu_adapter.install()
    import importlib

    module = importlib.import_module("megatron.core.optimizer.grad_scaler")
    assert module.torch.tensor([1.0], device="cuda").device.type == "cpu"
