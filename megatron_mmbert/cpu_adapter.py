"""Run megatron-core's real code paths on machines without a GPU (CPU + gloo).

megatron-core 0.16.1 hard-codes CUDA on the path of a training step: ``device="cuda"`` tensor
factories in the schedules, optimizers, DDP buffers and checkpoint savers, ``torch.cuda`` RNG state in
the tensor-parallel RNG tracker, ``torch.cuda.synchronize`` after every checkpoint preload and P2P
exchange, ``Tensor.cuda()`` and ``param.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers
(the full list is in the megatron-core reference, section 7.3.1). None of these is a missing
feature, so instead of faking megatron-core in tests we redirect those device calls to the CPU.

What :func:`install` changes, and only when ``torch.cuda.is_available()`` is false:

* every ``megatron.core.*`` module (loaded now or imported later) sees, under its global name
  ``torch``, a view of torch whose tensor factories map a ``cuda`` device to the CPU and whose
  ``torch.cuda`` is a CPU shim (``current_device`` -> cpu, ``synchronize`` -> no-op, RNG state ->
  the CPU generator). torch itself is untouched for everyone else;
* the tensor-parallel RNG tracker's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` use the CPU
  generator, so ``model_parallel_cuda_manual_seed`` and dropout forks keep their semantics;
* ``Tensor.cuda()`` and the no-argument ``Tensor.type()`` behave as on a GPU *only when called from
  megatron-core code* (a frame check), so the optimizers' type checks accept CPU tensors.

It refuses any megatron-core other than the pinned version: each redirect was read against 0.16.1.
Never import this on a GPU job for speed: it is a correctness adapter for CPU runs and CI.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import types
from typing import Any, Callable

import torch

PINNED_MEGATRON_CORE = "0.16.1"

_installed = False
_real_torch = torch
_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor", "eye", "linspace",
)  # fmt: skip


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int)  # a CUDA ordinal such as torch.cuda.current_device()


def _cpu_factory(fn: Callable) -> Callable:
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    return factory


class _NullStream:
    """Stands in for torch.cuda.Stream/Event on conditional paths (single stream on CPU)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NullStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _make_cuda_shim() -> types.ModuleType:
    shim = types.ModuleType("torch.cuda (megatron_mmbert CPU shim)")
    shim.__dict__.update(_real_torch.cuda.__dict__)
    shim.is_available = lambda: False
    shim.current_device = lambda: torch.device("cpu")
    shim.device_count = lambda: 0
    shim.synchronize = lambda *args, **kwargs: None
    shim.empty_cache = lambda: None
    shim.get_rng_state = lambda device=None: torch.get_rng_state()
    shim.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    shim.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    shim.manual_seed_all = shim.manual_seed
    shim.memory_allocated = lambda *args, **kwargs: 0
    shim.max_memory_allocated = lambda *args, **kwargs: 0
    shim.Stream = _NullStream
    shim.Event = _NullStream
    shim.current_stream = lambda *args, **kwargs: _NullStream()
    shim.default_stream = lambda *args, **kwargs: _NullStream()
    shim.stream = lambda *args, **kwargs: _nullcontext()
    return shim


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _make_torch_view() -> types.ModuleType:
    view = types.ModuleType("torch (megatron_mmbert CPU view)")
    view.__dict__.update(_real_torch.__dict__)
    for name in _FACTORIES:
        setattr(view, name, _cpu_factory(getattr(_real_torch, name)))
    view.cuda = _make_cuda_shim()

    # Attributes torch creates lazily (submodules imported later) still resolve.
    def __getattr__(name: str) -> Any:
        return getattr(_real_torch, name)

    view.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return view


_TORCH_VIEW: types.ModuleType | None = None


def _patch_module(module: types.ModuleType) -> None:
    if getattr(module, "torch", None) is _real_torch:
        module.torch = _TORCH_VIEW
    if module.__name__ == "megatron.core.tensor_parallel.random":
        module._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
        module._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    if module.__name__ == "megatron.core.tensor_parallel.layers":
        _rebind_autocast_functions(module)


def _rebind_autocast_functions(module: types.ModuleType) -> None:
    """The linear autograd Functions are wrapped in ``torch.amp.custom_fwd/custom_bwd(device_type=
    "cuda")`` at import: their backward re-enters the forward's *CUDA* autocast state. On the CPU the
    forward's CPU autocast (``precision: amp_bf16``) would be lost in backward (bf16 grads against
    fp32 saved inputs). Re-wrap the undecorated methods for the CPU."""
    for obj in list(vars(module).values()):
        if not (isinstance(obj, type) and issubclass(obj, _real_torch.autograd.Function)):
            continue
        for name, wrap in (("forward", _real_torch.amp.custom_fwd), ("backward", _real_torch.amp.custom_bwd)):
            fn = obj.__dict__.get(name)
            inner = getattr(getattr(fn, "__func__", None), "__wrapped__", None)
            if isinstance(fn, staticmethod) and inner is not None:
                setattr(obj, name, staticmethod(wrap(inner, device_type="cpu")))


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Patches each megatron.core module right after it is executed."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                real_exec = spec.loader.exec_module

                def exec_module(module, _real=real_exec):
                    _real(module)
                    _patch_module(module)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


def _from_megatron(frame_depth: int = 2) -> bool:
    return sys._getframe(frame_depth).f_globals.get("__name__", "").startswith("megatron.core")


def _patch_tensor_methods() -> None:
    real_type = torch.Tensor.type
    real_cuda = torch.Tensor.cuda

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and _from_megatron():
            return real_type(self).replace("torch.", "torch.cuda.", 1)
        return real_type(self, dtype, non_blocking, **kwargs)

    def cuda(self, device=None, non_blocking=False, **kwargs):
        if _from_megatron():
            return self
        return real_cuda(self, device, non_blocking, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    torch.Tensor.cuda = cuda  # type: ignore[method-assign]


class _DropForkWarning(logging.Filter):
    # On CPU the "CUDA" RNG and the CPU RNG are one generator, so the tracker's check that the CPU
    # state did not move inside a fork fires on every dropout: it is expected here, not a bug.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def check_megatron_version() -> str:
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version != PINNED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron-core {version} is installed, but megatron_mmbert is pinned to "
            f"{PINNED_MEGATRON_CORE} (its CPU adapter and layer specs were checked against that "
            f"release); run: pip install megatron-core=={PINNED_MEGATRON_CORE}"
        )
    return version


def install() -> bool:
    """Install the adapter if there is no GPU; returns whether it is active. Idempotent."""
    global _installed, _TORCH_VIEW
    if _installed:
        return True
    if torch.cuda.is_available():
        return False
    check_megatron_version()
    _TORCH_VIEW = _make_torch_view()
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            _patch_module(module)
    sys.meta_path.insert(0, _PatchOnImport())
    _patch_tensor_methods()
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropForkWarning())
    _installed = True
    return True
