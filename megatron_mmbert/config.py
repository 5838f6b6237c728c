"""The typed configuration of a model, its parallel layout and the training phases.

One dataclass per concern, a docstring on every field. Each section checks its own fields in its
``validate()`` (``config_base.from_dict`` and ``config_base.check`` call it); ``validate_layout``
checks a model against a parallel layout and a world size *before* any process group exists. Every
error names the values involved and the fix. Named presets cover the published models and a tiny CPU model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Union

from megatron_mmbert.config_base import ConfigError, check, check_safe_name, from_dict


@dataclass
class ModelConfig:
    """Architecture of a ModernBERT / mmBERT encoder with its MLM head."""

    vocab_size: int = 256000
    """Tokenizer vocabulary size (unpadded). Padded internally to a multiple of
    ``make_vocab_size_divisible_by * tensor_parallel``; padded rows never receive probability."""
    hidden_size: int = 768
    """Width of the residual stream."""
    intermediate_size: int = 1152
    """Width of each GeGLU half (fc1 produces 2x this: GELU(first half) * second half)."""
    num_layers: int = 22
    """Number of transformer layers."""
    num_attention_heads: int = 12
    """Attention heads (multi-head attention; no grouped-query attention in ModernBERT)."""
    global_attn_every_n_layers: int = 3
    """Layers with ``i % N == 0`` (0-indexed) attend globally; the others use the sliding window."""
    local_attention: int = 128
    """Total sliding-window width W: a query sees keys within +-W/2 positions (HF ``local_attention``)."""
    global_rope_theta: float = 160000.0
    """RoPE base of the global-attention layers (a phase may override it)."""
    local_rope_theta: float = 160000.0
    """RoPE base of the sliding-window layers (a phase may override it)."""
    max_position_embeddings: int = 8192
    """Longest document position the model is meant for (written to the HF config)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon (all norms are bias-free)."""
    embedding_dropout: float = 0.0
    """Dropout after the embedding LayerNorm."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (0 in mmBERT; must be 0 for the fused TE/flash paths)."""
    attention_output_dropout: float = 0.1
    """Dropout on the attention output projection before the residual add (mmBERT: 0.1)."""
    mlp_dropout: float = 0.0
    """Dropout on the MLP output before the residual add (mmBERT: 0.0)."""
    init_std: float = 0.02
    """Standard deviation of the truncated-normal init; output projections use
    ``init_std / sqrt(2 * num_layers)``."""
    init_cutoff_factor: float = 2.0
    """Truncate the init normal at this many standard deviations."""
    pad_token_id: int = 0
    """Padding id (HF ``padding_idx`` of the token embedding; its row starts at zero in HF)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (times the tensor-parallel size)."""
    attention_backend: Literal["auto", "te", "flash", "flex", "sdpa"] = "auto"
    """Attention kernel, chosen at start-up and logged: ``auto`` takes TransformerEngine's THD path
    when TE on this GPU can run both layer kinds at the run's precision (TE / cuDNN / flash-attn
    versions: docs/training.md), else flash-attn 2 varlen (CUDA, bf16), else FlexAttention on CUDA,
    else PyTorch SDPA with block-diagonal window masks, and logs why. A named backend that cannot run
    here is a start-up error naming what is missing and the fix."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute, megatron-core's own checkpointing (``TransformerConfig.recompute_granularity``;
    Megatron-LM ``--recompute-granularity``): ``selective`` keeps no core-attention activations and
    runs the attention again in the backward (one more attention forward per layer); ``full`` keeps
    only the input of each checkpointed chunk of layers (``recompute_method``,
    ``recompute_num_layers``) and runs the whole chunk again in the backward (one more forward of
    those layers). Less activation memory, same results (``model/recompute.py``)."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """With ``recompute: full``, which layers (megatron-core's ``recompute_method``; Megatron-LM
    ``--recompute-method``): ``uniform`` splits each pipeline stage's layers into chunks of
    ``recompute_num_layers`` and keeps only each chunk's input; ``block`` recomputes the first
    ``recompute_num_layers`` layers of each stage and keeps the other layers' activations."""
    recompute_num_layers: int = 1
    """With ``recompute: full``: layers per checkpointed chunk (``uniform``; 1 keeps one hidden
    state per layer) or layers recomputed per pipeline stage (``block``) (megatron-core's
    ``recompute_num_layers``; Megatron-LM ``--recompute-num-layers``)."""
    local_attention_block: Optional[int] = None
    """FlexAttention's key-block size on sliding-window layers (query blocks are 128): with 64, a
    +-64 window reads 256 keys per 128 queries instead of 384 (``attention.document_block_mask``).
    None: 64 where verified -- the CPU -- and 128 on CUDA, where torch's default Triton tiles refuse
    64-key blocks in the backward and 64 compiles the local layers' kernel with Inductor's
    autotuning (docs/training.md "Step performance"). A power of two from 16 to 128."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format for the transformer layers' GEMMs (TransformerEngine only; None trains without FP8).
    A run asking for FP8 without TE stops at start-up instead of silently training in bf16."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe (tensorwise needs TE >= 2.2, blockwise TE >= 2.3, mxfp8 Blackwell GPUs)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def is_global_layer(self, layer: int) -> bool:
        """Whether 0-indexed ``layer`` uses full attention (ModernBERT's ``i % N == 0`` rule)."""
        return layer % self.global_attn_every_n_layers == 0

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Parameter count of the unpadded model with the tied decoder counted once (as HF does)."""
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        per_layer = 3 * h * h + h * h + 2 * i * h + i * h + 2 * h  # qkv, proj, fc1, fc2, two norms
        total = n * per_layer - h  # layer 0 has no attention pre-norm
        total += h  # embedding norm
        total += h  # final norm
        total += h * h + h  # head dense and head norm
        total += v  # decoder bias
        if include_embedding:
            total += v * h
        return total

    def validate(self) -> None:
        """Checks of the architecture on its own (the layout's are :func:`validate_layout`'s)."""
        if self.num_attention_heads < 1:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} must be >= 1",
                              field="num_attention_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; pick heads dividing the width",
                field="hidden_size",
            )
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings", field="hidden_size")
        if self.local_attention <= 0 or self.local_attention % 2:
            raise ConfigError(
                f"model.local_attention={self.local_attention} must be a positive even total window "
                "(keys within +-local_attention/2)", field="local_attention"
            )
        if self.global_attn_every_n_layers < 1:
            raise ConfigError("model.global_attn_every_n_layers must be >= 1", field="global_attn_every_n_layers")
        if self.recompute_num_layers < 1:
            raise ConfigError(f"model.recompute_num_layers={self.recompute_num_layers} must be >= 1",
                              field="recompute_num_layers")
        if self.local_attention_block is not None and self.local_attention_block not in (16, 32, 64, 128):
            raise ConfigError(f"model.local_attention_block={self.local_attention_block} must be 16, 32, 64 "
                              "or 128 (or unset: the machine's default)", field="local_attention_block")
        if self.vocab_size < 1 or self.make_vocab_size_divisible_by < 1:
            raise ConfigError("model.vocab_size and model.make_vocab_size_divisible_by must be positive",
                              field="vocab_size" if self.vocab_size < 1 else "make_vocab_size_divisible_by")
        if self.num_layers < 1 or self.intermediate_size < 1:
            raise ConfigError("model.num_layers and model.intermediate_size must be positive",
                              field="num_layers" if self.num_layers < 1 else "intermediate_size")
        if self.fp8 is not None and self.attention_backend not in ("auto", "te"):
            raise ConfigError(
                f"model.fp8={self.fp8!r} needs TransformerEngine layers, but "
                f"model.attention_backend={self.attention_backend!r}; set attention_backend to auto or te",
                field="fp8",
            )


@dataclass
class ParallelConfig:
    """How the model and data are split over processes (Megatron-core parallel layout)."""

    tensor_parallel: int = 1
    """Tensor-parallel size: attention heads and MLP columns split over this many ranks."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size: layers split into this many stages."""
    virtual_pipeline: Optional[int] = None
    """Virtual stages per pipeline rank (interleaved 1F1B); needs pipeline_parallel > 1."""
    context_parallel: int = 1
    """Context-parallel size. Only 1 is supported: nothing splits the packed rows and ``cu_seqlens``
    per context-parallel rank, so a larger value is refused rather than handed to megatron-core."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms and dropout (needs tensor_parallel > 1)."""
    use_distributed_optimizer: bool = False
    """Shard fp32 master weights and optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's data-parallel all-reduce (reduce-scatter under the distributed
    optimizer) as soon as the backward has filled it, overlapping it with the rest of the backward
    (megatron-core DDP's ``overlap_grad_reduce``; Megatron-LM ``--overlap-grad-reduce``). Same results."""
    overlap_param_gather: bool = False
    """Distributed optimizer only: all-gather the updated parameters bucket by bucket during the
    next forward instead of at the end of the optimizer step (megatron-core's
    ``overlap_param_gather``; Megatron-LM ``--overlap-param-gather``). Saves and evaluations gather
    first. Same results."""

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)

    def validate(self) -> None:
        """Checks of the layout on its own (against a model and a world size: :func:`validate_layout`)."""
        tp, pp, cp = self.tensor_parallel, self.pipeline_parallel, self.context_parallel
        for name, value in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("context_parallel", cp)):
            if value < 1:
                raise ConfigError(f"parallel.{name}={value} must be >= 1", field=name)
        if self.virtual_pipeline is not None:
            if pp < 2:
                raise ConfigError(
                    f"parallel.virtual_pipeline={self.virtual_pipeline} needs "
                    f"parallel.pipeline_parallel > 1 (got {pp}); unset virtual_pipeline", field="virtual_pipeline"
                )
            if self.virtual_pipeline < 1:
                raise ConfigError(f"parallel.virtual_pipeline={self.virtual_pipeline} must be >= 1",
                                  field="virtual_pipeline")
        if self.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1",
                              field="sequence_parallel")
        if cp > 1:
            # megatron-core would accept it, but the data path feeds every CP rank whole rows and
            # whole-row cu_seqlens: attention and loss would be silently wrong.
            raise ConfigError(
                f"parallel.context_parallel={cp} is not supported: nothing splits batches or cu_seqlens "
                "per context-parallel rank; set parallel.context_parallel: 1 (use tensor/pipeline "
                "parallelism for long rows)", field="context_parallel"
            )


MAX_PHASE_TOKENS = 10**15
"""A phase budget above this (300x mmBERT's three trillion tokens) is a typo, not a plan."""


@dataclass
class PhaseConfig:
    """One training phase (pre-training, mid-training or decay): data mix, masking, RoPE, LR segment."""

    name: str
    """Phase name, used in logs, checkpoints and cache keys (e.g. ``pretrain``, ``mid``, ``decay``)."""
    tokens: int
    """Token budget of the phase (counted as packed row capacity: steps x global batch x seq_len)."""
    seq_len: int = 1024
    """Packed row length in tokens."""
    global_rope_theta: Optional[float] = None
    """RoPE base of global layers in this phase (None: the model's)."""
    local_rope_theta: Optional[float] = None
    """RoPE base of local layers in this phase (None: the model's)."""
    mask_rate: float = 0.3
    """Fraction of tokens selected for prediction at the start of the phase."""
    mask_rate_end: Optional[float] = None
    """If set, the mask rate anneals linearly to this value by the end of the phase."""
    languages: Union[str, List[str]] = "all"
    """Active languages: ``all``, ``top:N`` (the N largest by tokens), an explicit list, or (in a run
    config) the name of one of its ``language_sets``."""
    temperature: float = 0.7
    """Sampling exponent tau: p_i proportional to n_i^tau over active languages (n_i = tokens)."""
    temperature_end: Optional[float] = None
    """If set, tau anneals linearly to this value by the end of the phase."""
    fixed_shares: Dict[str, float] = field(default_factory=dict)
    """Fixed sampling shares for named languages/sources (e.g. ``{eng_Latn: 0.35, code: 0.05}``);
    the rest of the mass is spread by temperature over the remaining active languages."""
    max_epochs_per_language: Optional[float] = None
    """UniMax-style cap: no language is repeated more than this many epochs in the phase."""
    global_batch_size: Optional[int] = None
    """Rows per optimizer step in this phase (None: the training config's)."""
    manifest: Optional[str] = None
    """The phase's own manifest (e.g. mid-training/decay's higher-quality sources: FineWeb2-HQ,
    filtered DCLM, books); None: the run's ``data.manifest``. The phase's ``languages`` and
    ``fixed_shares`` then name that manifest's keys, and each of its languages is its own stream
    (``{folder}~{content hash}/{language}``), continued by every phase that names the same manifest."""

    def validate(self) -> None:
        """Checks of the phase on its own (against the run's batch, schedule and data: preflight)."""
        check_safe_name(self.name, "name")  # names checkpoint folders (phase_end_{name}) and cache keys
        where = f"phase {self.name!r}"
        if self.tokens <= 0:
            raise ConfigError(f"{where}: tokens must be positive, got {self.tokens}", field="tokens")
        if self.tokens > MAX_PHASE_TOKENS:
            raise ConfigError(field="tokens", message=(
                f"tokens={self.tokens:,} is more than {MAX_PHASE_TOKENS:.0e} tokens (mmBERT's whole recipe "
                "is about 3e12); a typo? Give the phase's budget in tokens"))
        if self.seq_len <= 0:
            raise ConfigError(f"{where}: seq_len must be positive, got {self.seq_len}", field="seq_len")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"{where}: global_batch_size must be >= 1 (or null: the run's), got "
                              f"{self.global_batch_size}", field="global_batch_size")
        for name in ("global_rope_theta", "local_rope_theta", "max_epochs_per_language"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{where}: {name} must be a positive number (or null), got {value}", field=name)
        for name in ("mask_rate", "mask_rate_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ConfigError(f"{where}: {name} must be in (0, 1), got {value}", field=name)
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}: {name} must be in [0, 1], got {value}", field=name)
        if isinstance(self.languages, str) and not (
            self.languages == "all" or (self.languages.startswith("top:") and self.languages[4:].isdigit())
        ):
            raise ConfigError(
                f"{where}: languages must be 'all', 'top:N' or a list of language names, "
                f"got {self.languages!r}", field="languages"
            )
        if isinstance(self.languages, str) and self.languages.startswith("top:") and int(self.languages[4:]) < 1:
            raise ConfigError(f"languages={self.languages!r}: top:N needs N >= 1", field="languages")
        total_fixed = sum(self.fixed_shares.values())
        if any(v < 0 for v in self.fixed_shares.values()) or total_fixed >= 1.0 + 1e-9:
            raise ConfigError(
                f"{where}: fixed_shares must be non-negative and sum below 1, got {self.fixed_shares}",
                field="fixed_shares",
            )


PRESETS: Dict[str, ModelConfig] = {
    # mmBERT (jhu-clsp): Gemma 2 vocabulary, both thetas 160k after context extension.
    "mmbert-small": ModelConfig(
        vocab_size=256000, hidden_size=384, intermediate_size=1152, num_layers=22, num_attention_heads=6
    ),
    "mmbert-base": ModelConfig(
        vocab_size=256000, hidden_size=768, intermediate_size=1152, num_layers=22, num_attention_heads=12
    ),
    # ModernBERT-base (answerdotai): local layers keep theta 10k at long context.
    "modernbert-base": ModelConfig(
        vocab_size=50368,
        hidden_size=768,
        intermediate_size=1152,
        num_layers=22,
        num_attention_heads=12,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
    ),
    # A few-hundred-thousand-parameter model for CPU runs and tests; window shorter than rows.
    "tiny": ModelConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=96,
        num_layers=4,
        num_attention_heads=4,
        local_attention=32,
        global_rope_theta=10000.0,
        local_rope_theta=10000.0,
        max_position_embeddings=1024,
    ),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A copy of preset ``name`` with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def load_model_config(data: Union[str, Dict]) -> ModelConfig:
    """A ModelConfig from a preset name or a dict ``{preset: NAME, <field>: value, ...}``."""
    if isinstance(data, str):
        return model_preset(data)
    data = dict(data)
    preset = data.pop("preset", None)
    if preset and preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = dataclasses.asdict(PRESETS[preset]) if preset else {}
    base.update(data)
    return from_dict(ModelConfig, base, "model")


def validate_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> None:
    """Check that ``model`` can be laid out as ``parallel`` over ``world_size`` processes: each
    section's own rules (:meth:`ModelConfig.validate`, :meth:`ParallelConfig.validate`), then the
    rules of the two together and the world size.

    Runs before any process group is created; every error names the values and the fix.
    """
    errors = []
    for where, section in (("model", model), ("parallel", parallel)):
        try:
            check(section, where)
        except ConfigError as e:
            errors.append(e)
    if errors:
        raise ConfigError.combine(errors)
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
            f"parallel.tensor_parallel={tp}; use a tensor-parallel size that divides the head count",
            field="parallel.tensor_parallel",
        )
    if model.intermediate_size % tp:
        raise ConfigError(
            f"model.intermediate_size={model.intermediate_size} is not divisible by "
            f"parallel.tensor_parallel={tp}; use a tensor-parallel size that divides it",
            field="parallel.tensor_parallel",
        )
    stages = pp * (parallel.virtual_pipeline or 1)
    if model.num_layers % stages:
        what = (
            f"parallel.pipeline_parallel={pp} x parallel.virtual_pipeline={parallel.virtual_pipeline} "
            f"= {stages} stages"
            if parallel.virtual_pipeline
            else f"parallel.pipeline_parallel={pp}"
        )
        raise ConfigError(
            f"model.num_layers={model.num_layers} is not divisible by {what}; "
            "choose a stage count that divides the layer count", field="parallel.pipeline_parallel"
        )
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel x "
            f"context_parallel = {tp} x {pp} x {cp} = {model_parallel}; launch a multiple of "
            f"{model_parallel} processes or change the layout"
        )
    padded = model.padded_vocab_size(tp)
    if padded % tp:
        raise ConfigError(f"padded vocab {padded} is not divisible by tensor_parallel={tp}")
