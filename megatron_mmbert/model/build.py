"""Build the model for this process: backend choice, FP8 checks, TransformerConfig, pipeline chunks.

This is the one place where our typed ModelConfig/ParallelConfig become megatron-core's
TransformerConfig, so every mapping decision (GeGLU unfused for exact GELU, list-form local/global
pattern, per-token loss) is written once.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import List, Literal, Optional

import torch
import torch.nn.functional as F

from megatron_mmbert.config import ConfigError, ModelConfig, ParallelConfig
from megatron_mmbert.model.backends import BackendChoice, Machine, choose_backend, probe
from megatron_mmbert.model.specs import Backend

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "amp_bf16"]
"""fp32; bf16: bf16 parameters (megatron's ``Float16Module`` casts the model); amp_bf16: fp32
parameters, the forward under ``torch.autocast(bfloat16)`` (mmBERT's Composer ``amp_bf16``)."""


def activation_precision(precision: str) -> str:
    """The dtype GEMMs and attention run in: what decides the attention kernels."""
    return "bf16" if precision == "amp_bf16" else precision


def select_backend(
    model: ModelConfig,
    precision: str = "fp32",
    context_parallel: int = 1,
    machine: Optional[Machine] = None,
    training: bool = True,
) -> BackendChoice:
    """The attention backend of this run, from the machine's TE / cuDNN / flash-attn versions
    (:mod:`megatron_mmbert.model.backends`); a request that cannot run is a ``ConfigError`` naming
    them, a fallback is logged. FP8 recipes the installed TE cannot run stop here too.
    ``training=False``: the model is only evaluated (FlexAttention then runs on CPU too)."""
    machine = machine or probe()
    choice = choose_backend(
        model.attention_backend,
        activation_precision(precision),
        machine,
        fp8=model.fp8 is not None,
        context_parallel=context_parallel,
        training=training,
        dropout=model.attention_dropout,
        head_dim=model.head_dim,
    )
    if choice.backend == "te":
        check_fp8(model, machine.te_version)
    return choice


_FP8_RECIPE_MIN_TE = {"delayed": "1.0", "tensorwise": "2.2.0", "blockwise": "2.3.0", "mxfp8": "2.1.0"}


def check_fp8(model: ModelConfig, te_version: Optional[str]) -> None:
    """Refuse an FP8 recipe the installed TE (or GPU) cannot run, before anything is built."""
    if model.fp8 is None:
        return
    from packaging.version import Version

    need = _FP8_RECIPE_MIN_TE[model.fp8_recipe]
    if te_version is None or Version(te_version) < Version(need):
        raise ConfigError(
            f"model.fp8_recipe={model.fp8_recipe!r} needs TransformerEngine >= {need}, "
            f"found {te_version}; choose model.fp8_recipe: delayed or upgrade TE"
        )
    if model.fp8_recipe == "mxfp8" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major < 10:
            raise ConfigError(
                "model.fp8_recipe='mxfp8' needs a Blackwell GPU (compute capability 10+); "
                "use tensorwise or delayed"
            )


def _trunc_normal(std: float, cutoff: float):
    """FlexBERT's init: normal(0, std) truncated at +-cutoff*std."""
    return functools.partial(torch.nn.init.trunc_normal_, mean=0.0, std=std, a=-cutoff * std, b=cutoff * std)


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Precision = "fp32",
    backend: Backend = "sdpa",
    te_attention: str = "auto",
):
    """megatron-core TransformerConfig for ``model`` under ``parallel`` at ``precision``
    (``te_attention``: megatron's ``AttnBackend`` name for TE's kernel set, see ``backends``)."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # amp_bf16 keeps fp32 parameters
    on_gpu = torch.cuda.is_available()
    half_window = model.local_attention // 2
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.intermediate_size,
        kv_channels=model.head_dim,
        # GeGLU with exact GELU: megatron's fused bias_geglu uses the tanh approximation.
        gated_linear_unit=True,
        activation_func=F.gelu,
        bias_activation_fusion=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.attention_output_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.norm_eps,
        normalization="LayerNorm",
        init_method=_trunc_normal(model.init_std, model.init_cutoff_factor),
        output_layer_init_method=_trunc_normal(
            model.init_std / math.sqrt(2.0 * model.num_layers), model.init_cutoff_factor
        ),
        embedding_init_method=_trunc_normal(model.init_std, model.init_cutoff_factor),
        init_method_std=model.init_std,
        # Local (sliding) layers: the list form, indexed by 0-based layer (megatron's integer form
        # would make 1-indexed multiples of N global, i.e. layers 2, 5, 8... - wrong for ModernBERT).
        window_size=(half_window, half_window),
        window_attn_skip_freq=[
            0 if model.is_global_layer(i) else 1 for i in range(model.num_layers)
        ],
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
        # model.recompute: megatron's selective recompute of the core attention (MMBertSelfAttention),
        # or full recompute of layers (model/recompute.py) chosen by megatron's method and count.
        recompute_granularity=None if model.recompute == "none" else model.recompute,
        recompute_modules=["core_attn"] if model.recompute == "selective" else None,
        recompute_method=model.recompute_method if model.recompute == "full" else None,
        recompute_num_layers=model.recompute_num_layers if model.recompute == "full" else None,
        # Layer 0 has no attention pre-norm, so layers are not stackable: checkpoint each layer under
        # its own global index (encoder.layers.{i}.*), which is also the HF-style canonical key.
        hetereogenous_dist_checkpoint=True,
        # The TE kernel set the backend choice allows (process-wide NVTE_* variables); SDPA reads none.
        attention_backend=AttnBackend[te_attention] if backend == "te" else AttnBackend.local,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        fp8=model.fp8,
        fp8_recipe=model.fp8_recipe if model.fp8 else "delayed",
    )


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: Precision = "fp32",
    device: Optional[torch.device] = None,
    training: bool = True,
) -> List[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), on ``device`` (default: this
    rank's GPU, or the CPU without one). ``training=False`` for a model that is only evaluated
    (parity, ``verify``): it may take a forward-only backend (FlexAttention on CPU).

    Megatron parallel state must be initialised (``runtime.initialize``).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage

    from megatron_mmbert.model.encoder import MMBertModel

    machine = probe()
    choice = select_backend(model, precision, parallel.context_parallel, machine, training)
    backend: Backend = choice.backend
    config = transformer_config(model, parallel, precision, backend, choice.te_attention or "auto")
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_pipeline_model_parallel_rank() == 0:
        for note in choice.notes:  # a fallback on a GPU machine is worth a warning; on a CPU, routine
            logger.log(logging.WARNING if machine.cuda else logging.INFO, "attention: %s", note)
        logger.info(
            "model: %s layers, hidden %d, %s, %s%s",
            model.num_layers,
            model.hidden_size,
            choice.describe(),
            precision,
            f", FP8 {model.fp8}/{model.fp8_recipe}" if model.fp8 else "",
        )
    if device is None:  # megatron's layers initialise on the current GPU; our norms and head follow
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    vpp = parallel.virtual_pipeline or 1
    chunks = []
    for stage in range(vpp):
        vp_stage = stage if parallel.virtual_pipeline else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=True) and is_vp_first_stage(vp_stage, parallel.virtual_pipeline)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and is_vp_last_stage(vp_stage, parallel.virtual_pipeline)
        chunk = MMBertModel(config, model, backend, pre_process=pre, post_process=post, vp_stage=vp_stage,
                            autocast_dtype=torch.bfloat16 if precision == "amp_bf16" else None)
        chunks.append(chunk.to(device))
    return chunks
