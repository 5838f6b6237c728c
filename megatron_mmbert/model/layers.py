"""Small building blocks megatron-core lacks for ModernBERT: a bias-free LayerNorm, a fixed-rate
bias-dropout-add, the rotary tables and the lazy reference to TransformerEngine classes."""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add


class BiasFreeLayerNorm(torch.nn.LayerNorm):
    """LayerNorm with a weight and no bias (ModernBERT's ``norm_bias=False``).

    megatron-core only offers LayerNorms with a bias (torch, TE and Apex alike). Built by
    ``build_module(spec, config=..., hidden_size=..., eps=...)`` like Megatron's own norms; under
    sequence parallelism the weight's gradient is partial per rank, so it is tagged for the
    tensor-parallel all-reduce in ``finalize_model_grads``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, bias=False, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def residual_bias_dropout_add(rate: Optional[float] = None) -> Callable:
    """megatron's bias-dropout-add builder, keeping the residual stream in the residual's dtype.

    ``rate``: the dropout whatever the layer asks for (None: the layer's ``hidden_dropout``).
    megatron's TransformerLayer applies the same ``hidden_dropout`` after attention and after the
    MLP; mmBERT drops out 0.1 after attention and 0.0 after the MLP, so the MLP's BDA sets 0.

    Dtype: megatron's version casts the residual to the branch output's dtype, so under autocast
    (``precision: amp_bf16``) the residual stream would drop to bf16 after the first layer. Here
    the branch output is cast up to the residual's dtype instead: the stream stays fp32, as in
    mmBERT's Composer ``amp_bf16`` (fp32 embedding-norm output, fp32 residual adds). Under fp32 or
    megatron's ``Float16Module`` both already agree and nothing changes.
    """

    def builder(training: bool, fused: bool):
        inner = get_bias_dropout_add(training, fused)

        def bias_dropout_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if x.dtype != residual.dtype:
                x = x.to(residual.dtype)
                bias = None if bias is None else bias.to(residual.dtype)
            return inner((x, bias), residual, prob if rate is None else rate)

        return bias_dropout_add

    return builder


class LazyClass:
    """A class named by module path, imported only when instantiated.

    Lets the TransformerEngine spec name megatron-core's TE wrappers without importing TE, so the
    spec can be built and inspected on machines where TE cannot be installed.
    """

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def resolve(self):
        try:
            return getattr(importlib.import_module(self.module), self.name)
        except ImportError as exc:
            raise ImportError(
                f"{self.module}.{self.name} needs TransformerEngine, which is not installed; "
                "use model.attention_backend: sdpa or install TE "
                "(it ships in NGC PyTorch containers)"
            ) from exc

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LazyClass({self.module}.{self.name})"


class RotaryTable(torch.nn.Module):
    """Rotary angles for the rotate-half (GPT-NeoX) convention, as HF ModernBERT computes them.

    ``inv_freq = theta ** (-arange(0, d, 2) / d)`` in fp32; the angle of position p is
    ``p * inv_freq`` in fp32, duplicated for both halves. Theta changes between phases (10k -> 160k),
    so it is a setting, not checkpointed state.

    The frequencies stay fp32 whatever the model is cast to: megatron's ``Float16Module`` calls
    ``.bfloat16()`` on the whole model, buffers included, and bf16 frequencies (8 mantissa bits) put
    the angle at position 8191 off by up to ~1.5 rad, so a bf16 run would train a model that fp32
    evaluation and the HF export do not compute. :meth:`_apply` (behind ``.to()``, ``.bfloat16()``,
    ``.cuda()``) therefore recomputes them from ``theta`` in fp32 on the buffer's new device.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.set_theta(theta)

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        # HF ModernBERT's formula (ModernBertRotaryEmbedding), computed on the CPU in fp32 and moved.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return (1.0 / (self.theta**exponent)).to(device)

    def set_theta(self, theta: float) -> None:
        self.theta = float(theta)
        self.inv_freq = self._frequencies(self.inv_freq.device)  # a new fp32 buffer, never a copy_

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.inv_freq = self._frequencies(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Angles (fp32) for ``positions`` ``[b, s]`` (or ``[s]``), shaped ``[s, b, 1, d]`` (``[s, 1, 1, d]``)."""
        if positions.dim() == 1:
            positions = positions[None]
        angles = positions.t().float()[..., None] * self.inv_freq.to(positions.device)
        return torch.cat((angles, angles), dim=-1)[:, :, None, :]
