"""Bidirectional packed attention: global and sliding-window layers, documents kept apart.

Four kernels sit behind megatron-core's ``SelfAttention`` (QKV projection, RoPE, output projection);
``model/backends.py`` chooses one per run:

* :class:`SDPAAttention` (CPU, and the fallback everywhere): PyTorch ``scaled_dot_product_attention``
  on ``[b, s]`` rows with a boolean mask that allows a key only in the query's own segment
  (``cu_seqlens``) and, on local layers, within +-W/2 positions.
* The packed (THD) layout, all ``b * s`` tokens as one sequence ``[t, heads, d]`` with ``cu_seqlens``:
  TransformerEngine's ``TEDotProductAttention`` (referenced by name in the TE spec);
  :class:`FlashVarlenAttention` (flash-attn 2's ``flash_attn_varlen_func``, ``window_size``);
  :class:`FlexAttention` (PyTorch FlexAttention with a block-sparse ``BlockMask`` built by
  :func:`document_block_mask` once per micro-batch and layer kind).

Which layers are local is decided once, from ``config.window_attn_skip_freq`` (megatron-core's own
per-layer list, read by TE as well), so every kernel agrees with ModernBERT's ``i % N == 0`` rule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_mmbert.model.recompute import replaying_autocast


@dataclass
class AttentionInputs:
    """Per-forward attention context shared by all layers of a stage.

    ``global_mask`` / ``local_mask``: boolean ``[b, 1, s, s]`` (True = may attend) for the SDPA
    kernel; a FlexAttention ``BlockMask`` each for the flex kernel; None for TE and flash-attn (they
    read ``cu_seqlens`` from ``PackedSeqParams`` and the window from the config).
    ``global_rope`` / ``local_rope``: fp32 rotary angles of every token for the layer kind,
    ``[s, b, 1, d]`` (THD: ``[t, 1, 1, d]``, tokens in packed order).
    """

    global_mask: Optional[object]
    local_mask: Optional[object]
    global_rope: torch.Tensor
    local_rope: torch.Tensor


def segment_masks(cu_seqlens: torch.Tensor, positions: torch.Tensor, window: int):
    """Global and local boolean masks ``[b, 1, s, s]`` from segment boundaries and positions.

    A token may attend to keys of its own segment; local layers further require
    ``|pos_q - pos_k| <= window // 2`` (HF: ``local_attention // 2`` each side, 129 keys for 128).
    Returns ``(None, [1, 1, s, s])`` when every row is a single segment, and masks ``[1, 1, b * s,
    b * s]`` over the flattened micro-batch when a segment crosses from one row into the next
    (best_fit's ``data.packed_row: micro_batch``): :class:`SDPAAttention` then attends over the
    micro-batch as one sequence, as the packed (THD) kernels do.
    """
    b, s = positions.shape
    # Which case this is, decided on the host copy of the boundaries (the batch keeps cu_seqlens on
    # the CPU; a device copy is read back once): no device read per micro-batch.
    cu = cu_seqlens.detach().cpu().numpy()
    starts = np.arange(0, b * s + 1, s)
    if b > 1 and not np.isin(starts[1:-1], cu).all():
        return segment_masks(cu_seqlens, positions.reshape(1, b * s), window)
    cu_seqlens = cu_seqlens.to(positions.device)
    if cu.size == b + 1 and np.array_equal(cu, starts):
        # One segment per row (long documents): global layers need no mask at all, and local
        # layers share one band for the whole batch, so SDPA can take its unmasked kernel.
        pos = torch.arange(s, device=positions.device)
        band = (pos[:, None] - pos[None, :]).abs() <= window // 2
        return None, band[None, None]
    flat = torch.arange(b * s, device=positions.device)
    segment = torch.searchsorted(cu_seqlens.to(flat.dtype), flat, right=True).view(b, s)
    global_mask = segment[:, :, None] == segment[:, None, :]
    distance = (positions[:, :, None] - positions[:, None, :]).abs()
    local_mask = global_mask & (distance <= window // 2)
    return global_mask[:, None], local_mask[:, None]


class MMBertSelfAttention(SelfAttention):
    """megatron-core SelfAttention that picks the rotary angles and mask of its layer kind.

    ModernBERT uses different RoPE bases on global and local layers; megatron passes one rotary
    tensor to every layer, so the model passes :class:`AttentionInputs` and each layer selects.

    RoPE is applied here, right after the QKV projection, with one angle per token (the model
    computes them from each token's position in its document), instead of by megatron: its THD path
    (``_apply_rotary_pos_emb_thd``) reads ``cu_seqlens`` back to the host (``.tolist()``) and slices
    the table per document in a Python loop, in every layer -- a device sync per layer per
    micro-batch. Per-token angles make both layouts (SDPA's ``[s, b]`` rows and TE's packed
    ``[t, 1]``) one elementwise rotation, through megatron's own unfused rotary function.
    """

    def __init__(self, config, submodules, layer_number, *args, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.is_local = is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        )
        self._rope: Optional[torch.Tensor] = None

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        inputs: AttentionInputs = attention_mask
        if self.is_local:
            mask, self._rope = inputs.local_mask, inputs.local_rope
        else:
            mask, self._rope = inputs.global_mask, inputs.global_rope
        try:
            return super().forward(hidden_states, mask, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._rope = None

    def _checkpointed_attention_forward(self, query, key, value, attention_mask, rotary_pos_emb=None,
                                        attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """``model.recompute: selective``: megatron-core's own activation checkpoint
        (``tensor_parallel.checkpoint``) around the core attention, as megatron's version of this
        method, except that the mask travels in the closure (megatron's passes it as a checkpoint
        argument, which must be a tensor, and FlexAttention's ``BlockMask`` is not one) and the
        recompute runs under the forward's autocast. Dropout replays megatron's RNG tracker states."""

        def core_attention(q, k, v):
            return self.core_attention(q, k, v, attention_mask, attn_mask_type=attn_mask_type or self.attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params)

        # The recompute runs in the backward, outside the forward's autocast (amp_bf16): replay it.
        return tensor_parallel.checkpoint(replaying_autocast(core_attention, query.device.type), False, query, key, value)

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope is None:
            raise RuntimeError("MMBertSelfAttention runs inside its forward (the rotary angles come with the mask)")
        # query/key: [s, b, heads, d] (THD: [t, 1, heads, d]); angles: [s, b, 1, d] (THD: [t, 1, 1, d])
        query = apply_rotary_pos_emb(query, self._rope, config=self.config)
        key = apply_rotary_pos_emb(key, self._rope, config=self.config)
        return query, key, value


class CoreAttention(MegatronModule):
    """What every core-attention kernel here takes from megatron's ``SelfAttention`` (the
    constructor of megatron's ``DotProductAttention``; no parameters): dropout, softmax scale and
    whether this layer is local (``W/2`` keys each side) or global."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.is_local = bool(is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number))
        self.half_window = config.window_size[0] if self.is_local else None


class SDPAAttention(CoreAttention):
    """Core attention with PyTorch SDPA and an explicit boolean mask (the window is in the mask).

    Takes ``query/key/value`` as ``[s, b, heads, head_dim]`` (this TP rank's heads) and returns
    ``[s, b, heads * head_dim]``, the contract of megatron's ``DotProductAttention``.
    """

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None:
            raise ValueError("SDPAAttention works on [s, b] rows with a mask, not on THD input")
        s, b = query.shape[0], query.shape[1]
        if attention_mask is not None and b > 1 and attention_mask.shape[-1] == b * s:
            # segments cross rows (segment_masks): the micro-batch as one sequence of b * s tokens
            q, k, v = (t.transpose(0, 1).reshape(1, b * s, *t.shape[2:]).permute(0, 2, 1, 3)
                       for t in (query, key, value))  # [1, heads, b * s, d]
            out = self._sdpa(q, k, v, attention_mask)  # [1, heads, b * s, d]
            return out.permute(0, 2, 1, 3).reshape(b, s, -1).transpose(0, 1).contiguous()
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        return self._sdpa(q, k, v, attention_mask).permute(2, 0, 1, 3).reshape(s, b, -1)

    def _sdpa(self, q, k, v, attention_mask):
        dropout = self.dropout if self.training else 0.0
        if dropout > 0.0:
            # Attention probabilities are split over TP ranks: each rank needs its own stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=self.softmax_scale
                )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, scale=self.softmax_scale
            )
        return out


# -- packed (THD) kernels -------------------------------------------------------------------------


FLEX_BLOCK = 128
"""FlexAttention's block size (its default; the compiled CUDA kernels tile by it). Query blocks are
always this size; global layers' key blocks too."""

LOCAL_KV_BLOCK = 64
"""Key-block size of sliding-window layers where it is verified (the CPU; ``model.local_attention_block``
unset). With 128-query blocks, a +-64 window reads 256 keys per query block at 64-key blocks and 384
at 128: the window's 129 keys plus what the block edges add."""


def local_kv_block(configured: Optional[int], device: torch.device) -> int:
    """The key-block size of local layers' ``BlockMask``: ``model.local_attention_block``, or when
    unset :data:`LOCAL_KV_BLOCK` on the CPU and :data:`FLEX_BLOCK` on CUDA, where 64-key blocks need
    :func:`flex_kernel`'s narrow-block kernel (its Inductor autotuning pass; docs/training.md
    "Step performance") and stay opt-in until the GPU check has timed them
    (``benchmarks/model_throughput.py --local-blocks 128,64``)."""
    if configured is not None:
        return configured
    return FLEX_BLOCK if device.type == "cuda" else LOCAL_KV_BLOCK


def document_block_mask(cu_seqlens: torch.Tensor, total: int, half_window: Optional[int],
                        block: Union[int, Tuple[int, int]] = FLEX_BLOCK, padded_total: Optional[int] = None):
    """FlexAttention ``BlockMask`` for ``total`` packed tokens: a query sees the keys of its own
    document (``cu_seqlens``) and, when ``half_window`` is given, only those with ``|q - k| <=
    half_window`` (within a document, index distance is position distance). ``block``: one size,
    or (query block, key block): a +-64 window with 128 x 64 blocks reads 256 keys per query block
    instead of 384 (the compiled kernel's tiles must divide the blocks: docs/training.md).

    ``padded_total`` (>= ``total``): the mask covers that many tokens, the ones after ``total``
    forming one more document of padding that no real token sees (:func:`flex_padded_tokens`:
    evaluation and short micro-batches run at the training token count, so the compiled kernel
    keeps one shape).

    Built from block boundaries alone, without evaluating the mask over the ``[t, t]`` grid (what
    ``create_block_mask`` does uncompiled): documents are contiguous and their ids non-decreasing,
    so query block ``i`` and key block ``j`` share a document iff ``first[i] <= last[j] and first[j]
    <= last[i]``, and are *full* (no per-token mask needed) iff both lie in one document and, on
    local layers, their farthest tokens are within the window. Only ``[t / block]^2`` booleans and
    no host sync.
    """
    from torch.nn.attention.flex_attention import BlockMask

    q_block, kv_block = (block, block) if isinstance(block, int) else block
    device = cu_seqlens.device
    padded = total if padded_total is None else padded_total
    if padded < total:
        raise ValueError(f"padded_total={padded_total} is less than the {total} tokens of the micro-batch")
    q_blocks, kv_blocks = -(-padded // q_block), -(-padded // kv_block)
    tokens = torch.arange(max(q_blocks * q_block, kv_blocks * kv_block), device=device)
    # Document id per token (tokens in [total, padded) get the id after the last document, so ids
    # stay non-decreasing); the tail after ``padded`` gets -1 so that a compiled kernel evaluating
    # the rest of the last block indexes in bounds and matches nothing real.
    document = torch.searchsorted(cu_seqlens[1:].to(torch.int64), tokens, right=True)
    document = torch.where(tokens < padded, document, torch.full_like(document, -1))

    def bounds(size, count):
        starts = torch.arange(count, device=device) * size
        ends = torch.clamp(starts + size, max=padded) - 1  # last token of the block
        return starts, ends, document[starts], document[ends], starts + size > padded

    q_start, q_end, q_first, q_last, q_pad = bounds(q_block, q_blocks)
    k_start, k_end, k_first, k_last, k_pad = bounds(kv_block, kv_blocks)
    shares = (q_first[:, None] <= k_last[None, :]) & (k_first[None, :] <= q_last[:, None])
    full = (q_first == q_last)[:, None] & (k_first == k_last)[None, :] & (q_first[:, None] == k_first[None, :])
    full &= ~q_pad[:, None] & ~k_pad[None, :]  # a block running past the tokens is never full
    if half_window is not None:
        nearest = torch.maximum(k_start[None, :] - q_end[:, None], q_start[:, None] - k_end[None, :]).clamp(min=0)
        farthest = torch.maximum(k_end[None, :] - q_start[:, None], q_end[:, None] - k_start[None, :])
        shares &= nearest <= half_window
        full &= farthest <= half_window

    def mask_mod(b, h, q, k):
        same = document[q] == document[k]
        if half_window is None:
            return same
        return same & ((q - k).abs() <= half_window)

    def indices(allowed):
        count = allowed.sum(-1, dtype=torch.int32)
        order = torch.argsort((~allowed).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count[None, None], order[None, None]

    partial_count, partial_index = indices(shares & ~full)
    full_count, full_index = indices(full)
    return BlockMask.from_kv_blocks(
        partial_count, partial_index, full_count, full_index, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
        seq_lengths=(padded, padded),
    )


def flex_padded_tokens(total: int, target: Optional[int]) -> int:
    """The token count FlexAttention runs a micro-batch of ``total`` tokens at: ``target`` (the
    run's training micro-batch, ``micro_batch_size * seq_len`` of the phase) or the next multiple of
    it. Compiled with ``dynamic=False``, flex compiles a kernel per shape; evaluation rows and the
    short last micro-batch of a phase would each add one, and past Dynamo's recompile limit flex
    silently runs eager, materialising the whole ``[t, t]`` score matrix (116 GB at 49k tokens).
    ``target`` None: no padding."""
    if not target or total == target:
        return total
    return -(-total // target) * target


_COMPILED_FLEX = None
FLEX_RECOMPILE_LIMIT = 64
"""Compiled variants (shapes x layer kinds x train/eval) FlexAttention may have in one process.
Dynamo's default (``recompile_limit``, 8) is passed by a three-phase run with evaluations; with
:func:`flex_padded_tokens` a run needs 4 per distinct training token count. Past the limit the call
fails loudly (``fail_on_recompile_limit_hit``) instead of falling back to eager FlexAttention."""


def _eager_flex(*args, **kwargs):
    """Uncompiled FlexAttention, without its warning that uncompiled runs materialise the scores
    (known, and said in ``backends.flex_support``)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(*args, **kwargs)


def flex_kernel(device: torch.device, block: Tuple[int, int] = (FLEX_BLOCK, FLEX_BLOCK)):
    """FlexAttention for a ``BlockMask`` of ``block`` (query block, key block): compiled once per
    process on CUDA (inductor's block-sparse Triton kernels, forward and backward). On CPU it runs
    eager: torch has no FlexAttention backward there, and compiling the CPU forward takes about a
    minute per shape -- too slow for evaluation and CI.

    Key blocks narrower than 128 (local layers, ``model.local_attention_block``) get their own
    compiled kernel (:func:`narrow_block_kernel_options`)."""
    global _COMPILED_FLEX, _COMPILED_FLEX_NARROW
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return _eager_flex
    if tuple(block) == (FLEX_BLOCK, FLEX_BLOCK):
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = limit_recompiles(torch.compile(flex_attention, dynamic=False))
        return _COMPILED_FLEX
    options = narrow_block_kernel_options(*block)
    if _COMPILED_FLEX_NARROW is None:
        # Inductor's autotuning pass: its backward keeps only candidate tiles that divide the mask's
        # blocks, and the one default candidate (H100, head_dim 64: 128-key tiles) does not divide 64;
        # the autotuning candidates do, and take the tiles of ``kernel_options`` (one kernel each pass).
        _COMPILED_FLEX_NARROW = limit_recompiles(
            torch.compile(_narrow_block_flex, dynamic=False, options={"max_autotune": True}))
    return functools.partial(_COMPILED_FLEX_NARROW, kernel_options=options)


_COMPILED_FLEX_NARROW = None


def _narrow_block_flex(*args, **kwargs):
    """FlexAttention under its own name, so the narrow-block kernel has its own compiled variants
    (Dynamo keeps them per function) beside the 128 x 128 kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


def narrow_block_kernel_options(q_block: int, kv_block: int) -> dict:
    """FlexAttention ``kernel_options`` for a ``BlockMask`` of ``q_block`` x ``kv_block``
    (``kv_block`` < 128): the Triton tiles torch picks by default on H100 for head_dim 64 (torch
    2.11-2.13, ``torch/_inductor/template_heuristics/triton.py``: forward ``BLOCK_M, BLOCK_N`` = 128,
    128, 4 warps, 3 stages; backward ``BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2`` = 64, 128, 128, 64,
    8 warps, 3 stages) with every key tile cut to the key block, as Inductor requires (the kernel's
    tiles must divide the mask's blocks; ``BLOCK_N1 % BLOCK_M1 == 0`` and ``BLOCK_M2 % BLOCK_N2 ==
    0`` in the backward template)."""
    if q_block != FLEX_BLOCK or kv_block not in (16, 32, 64):
        raise ValueError(f"narrow FlexAttention blocks are {FLEX_BLOCK} x 16/32/64, not {q_block} x {kv_block}")
    key_tile = min(64, kv_block)
    return {
        "fwd_BLOCK_M": q_block, "fwd_BLOCK_N": kv_block, "fwd_num_warps": 4, "fwd_num_stages": 3,
        "bwd_BLOCK_M1": key_tile, "bwd_BLOCK_N1": kv_block, "bwd_BLOCK_M2": q_block, "bwd_BLOCK_N2": key_tile,
        "bwd_num_warps": 8, "bwd_num_stages": 3,
    }


def limit_recompiles(compiled, limit: int = FLEX_RECOMPILE_LIMIT):
    """``compiled`` called under a recompile limit of ``limit`` that fails when passed, set for
    these calls only (other compiled functions of the process keep Dynamo's settings)."""
    import torch._dynamo

    config = torch._dynamo.config  # names as of torch 2.6+, then the older ones
    settings = {"recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit": limit}
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            settings[name] = True
            break
    else:
        raise RuntimeError(f"torch {torch.__version__} cannot fail on its recompile limit: FlexAttention "
                           "would fall back to eager (out of memory at long rows); use torch >= 2.6")

    def call(*args, **kwargs):
        # Set and restored by hand: ~4x cheaper than config.patch, and this runs once per layer.
        saved = {name: getattr(config, name) for name in settings}
        for name, value in settings.items():
            setattr(config, name, value)
        try:
            return compiled(*args, **kwargs)
        finally:
            for name, value in saved.items():
                setattr(config, name, value)

    call.compiled = compiled
    return call


class _PackedAttention(CoreAttention):
    """Core attention on the packed layout: ``query/key/value`` ``[t, heads, d]`` (this TP rank's
    heads), output ``[t, heads * d]`` (megatron's THD contract, see ``Attention.forward``)."""

    @staticmethod
    def _packed(packed_seq_params):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("packed attention kernels take THD input with PackedSeqParams (cu_seqlens)")
        return packed_seq_params


class FlexAttention(_PackedAttention):
    """PyTorch FlexAttention with the micro-batch's ``BlockMask`` of this layer's kind (built once
    per micro-batch by the model, shared by every layer of the kind). No dropout (FlexAttention has
    none; ``backends.flex_support`` refuses attention_dropout > 0)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        self._packed(packed_seq_params)
        if self.dropout > 0.0 and self.training:
            raise ValueError("FlexAttention has no attention dropout; use another model.attention_backend")
        t, padded = query.shape[0], attention_mask.seq_lengths[0]
        if padded != t:  # evaluation / a short micro-batch at the training shape (flex_padded_tokens)
            query, key, value = (_pad_tokens(x, padded) for x in (query, key, value))
        q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # [1, heads, t, d]
        kernel = flex_kernel(query.device, attention_mask.BLOCK_SIZE)
        out = kernel(q, k, v, block_mask=attention_mask, scale=self.softmax_scale)
        return out[0, :, :t].transpose(0, 1).reshape(t, -1)


def _pad_tokens(x: torch.Tensor, padded: int) -> torch.Tensor:
    """``x`` ``[t, heads, d]`` with zero tokens appended up to ``padded``, laid out with ``x``'s
    strides (a compiled kernel is specialised to strides too: a contiguous copy would be another
    variant)."""
    out = torch.empty_strided((padded, *x.shape[1:]), x.stride(), dtype=x.dtype, device=x.device)
    out[: x.shape[0]] = x
    out[x.shape[0]:] = 0
    return out


def load_flash_varlen():
    """flash-attn 2's ``flash_attn_varlen_func`` (imported when a flash model is built)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise ImportError(
            "model.attention_backend: flash needs flash-attn 2 (pip install flash-attn, on a CUDA "
            "machine); use model.attention_backend: auto"
        ) from exc
    return flash_attn_varlen_func


class FlashVarlenAttention(_PackedAttention):
    """flash-attn 2's ``flash_attn_varlen_func`` over the packed tokens: ``cu_seqlens`` keep
    documents apart, ``window_size=(W/2, W/2)`` on local layers (``(-1, -1)``: unlimited), not
    causal. Dropout on the attention probabilities runs under the TP RNG tracker (heads are split
    over TP ranks: each rank needs its own stream), as megatron does for its own kernels."""

    def __init__(self, config, layer_number: int, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        self.kernel = load_flash_varlen()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        packed = self._packed(packed_seq_params)
        window = (self.half_window, self.half_window) if self.is_local else (-1, -1)
        dropout = self.dropout if self.training else 0.0
        kwargs = dict(
            cu_seqlens_q=packed.cu_seqlens_q,
            cu_seqlens_k=packed.cu_seqlens_kv,
            max_seqlen_q=packed.max_seqlen_q,
            max_seqlen_k=packed.max_seqlen_kv,
            dropout_p=dropout,
            softmax_scale=self.softmax_scale,
            causal=False,
            window_size=window,
        )
        if dropout > 0.0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self.kernel(query, key, value, **kwargs)
        else:
            out = self.kernel(query, key, value, **kwargs)
        return out.reshape(out.shape[0], -1)
