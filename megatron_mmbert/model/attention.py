"""Bidirectional packed attention: global and sliding-window layers, documents kept apart.

Two kernels sit behind megatron-core's ``SelfAttention`` (QKV projection, RoPE, output projection):

* :class:`SDPAAttention` (CPU, and GPUs without TransformerEngine): PyTorch
  ``scaled_dot_product_attention`` on ``[b, s]`` rows with a boolean mask that allows a key only in
  the query's own segment (``cu_seqlens``) and, on local layers, within +-W/2 positions.
* TransformerEngine's ``TEDotProductAttention`` (referenced by name in the TE spec) on the THD
  layout with ``cu_seqlens`` and ``config.window_size``.

Which layers are local is decided once, from ``config.window_attn_skip_freq`` (megatron-core's own
per-layer list, read by TE as well), so both kernels agree with ModernBERT's ``i % N == 0`` rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention


@dataclass
class AttentionInputs:
    """Per-forward attention context shared by all layers of a stage.

    ``global_mask`` / ``local_mask``: boolean ``[b, 1, s, s]`` (True = may attend) for the SDPA
    kernel, None on the THD path. ``global_rope`` / ``local_rope``: fp32 rotary angles of every token
    for the layer kind, ``[s, b, 1, d]`` (THD: ``[t, 1, 1, d]``, tokens in packed order).
    """

    global_mask: Optional[torch.Tensor]
    local_mask: Optional[torch.Tensor]
    global_rope: torch.Tensor
    local_rope: torch.Tensor


def segment_masks(cu_seqlens: torch.Tensor, positions: torch.Tensor, window: int):
    """Global and local boolean masks ``[b, 1, s, s]`` from segment boundaries and positions.

    A token may attend to keys of its own segment; local layers further require
    ``|pos_q - pos_k| <= window // 2`` (HF: ``local_attention // 2`` each side, 129 keys for 128).
    Returns ``(None, [1, 1, s, s])`` when every row is a single segment.
    """
    b, s = positions.shape
    starts = torch.arange(0, b * s + 1, s, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    if cu_seqlens.numel() == b + 1 and torch.equal(cu_seqlens, starts):
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

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope is None:
            raise RuntimeError("MMBertSelfAttention runs inside its forward (the rotary angles come with the mask)")
        # query/key: [s, b, heads, d] (THD: [t, 1, heads, d]); angles: [s, b, 1, d] (THD: [t, 1, 1, d])
        query = apply_rotary_pos_emb(query, self._rope, config=self.config)
        key = apply_rotary_pos_emb(key, self._rope, config=self.config)
        return query, key, value


class SDPAAttention(MegatronModule):
    """Core attention with PyTorch SDPA and an explicit boolean mask (no parameters).

    Takes ``query/key/value`` as ``[s, b, heads, head_dim]`` (this TP rank's heads) and returns
    ``[s, b, heads * head_dim]``, the contract of megatron's ``DotProductAttention``.
    """

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
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
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
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
