"""Layer specs: one per backend, the same module tree and checkpoint keys.

A ModernBERT layer in megatron-core terms::

    input_layernorm     BiasFreeLayerNorm (IdentityOp in layer 0: ModernBERT skips it there)
    self_attention      MMBertSelfAttention
      linear_qkv        ColumnParallelLinear          | TEColumnParallelLinear
      core_attention    SDPAAttention                 | TEDotProductAttention (THD + window)
      linear_proj       RowParallelLinear             | TERowParallelLinear
    self_attn_bda       bias-dropout-add at attention_output_dropout (config.hidden_dropout)
    pre_mlp_layernorm   BiasFreeLayerNorm
    mlp                 megatron MLP with gated_linear_unit (GeGLU, erf GELU on the first half)
      linear_fc1 / linear_fc2   Column/RowParallelLinear | TEColumn/TERowParallelLinear
    mlp_bda             bias-dropout-add at mlp_dropout

The TE backend keeps the norms as separate bias-free modules instead of TE's fused
LayerNorm+Linear: TE's fused norm always owns a bias, which ModernBERT does not have, and keeping the
norm outside gives both backends identical parameter names. The TE classes are referenced by name
(:class:`LazyClass`), so this module imports and the spec can be inspected without TE.
"""

from __future__ import annotations

from typing import List, Literal

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.transformer.attention import SelfAttentionSubmodules

from megatron_mmbert.model.attention import FlashVarlenAttention, FlexAttention, MMBertSelfAttention, SDPAAttention
from megatron_mmbert.model.layers import BiasFreeLayerNorm, LazyClass, residual_bias_dropout_add

Backend = Literal["sdpa", "te", "flash", "flex"]
"""Layer backends with a spec here (the kernels ``model/backends.py`` chooses among)."""
PACKED_BACKENDS = ("te", "flash", "flex")
"""Backends that run the packed THD layout (``[t, 1, h]`` with ``cu_seqlens``) instead of masked rows."""
_CORE_ATTENTION = {"sdpa": SDPAAttention, "flash": FlashVarlenAttention, "flex": FlexAttention}
_TE = "megatron.core.extensions.transformer_engine"


def _linears(backend: Backend):
    if backend != "te":
        return ColumnParallelLinear, RowParallelLinear, _CORE_ATTENTION[backend]
    return (
        ModuleSpec(module=(_TE, "TEColumnParallelLinear")),
        ModuleSpec(module=(_TE, "TERowParallelLinear")),
        LazyClass(_TE, "TEDotProductAttention"),
    )


def layer_spec(backend: Backend, first_layer: bool, mlp_dropout: float) -> ModuleSpec:
    """The spec of one encoder layer for ``backend`` (``first_layer``: no attention pre-norm)."""
    column, row, core_attention = _linears(backend)
    # The THD path marks packed input as padding; the SDPA path gets an explicit mask.
    mask_type = AttnMaskType.padding if backend in PACKED_BACKENDS else AttnMaskType.arbitrary
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if first_layer else BiasFreeLayerNorm,
            self_attention=ModuleSpec(
                module=MMBertSelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=residual_bias_dropout_add(),
            pre_mlp_layernorm=BiasFreeLayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=residual_bias_dropout_add(mlp_dropout),
        ),
    )


def block_spec(config, backend: Backend, mlp_dropout: float, vp_stage=None) -> TransformerBlockSubmodules:
    """Specs of the layers this pipeline stage builds, and the final norm.

    megatron's TransformerBlock builds every spec it is given, so the list is cut to this stage
    (as megatron's GPT block spec does); layer 0 is the one without attention pre-norm.
    """
    from megatron.core import parallel_state

    offset = get_transformer_layer_offset(
        config, vp_stage, parallel_state.get_pipeline_model_parallel_rank()
    )
    count = get_num_layers_to_build(
        config, vp_stage, parallel_state.get_pipeline_model_parallel_rank()
    )
    layers: List[ModuleSpec] = [
        layer_spec(backend, first_layer=(offset + i == 0), mlp_dropout=mlp_dropout)
        for i in range(count)
    ]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=BiasFreeLayerNorm)
