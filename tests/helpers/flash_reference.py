"""TEST REFERENCE for flash-attn 2's ``flash_attn_varlen_func`` -- not a kernel, never shipped.

flash-attn needs a CUDA GPU and cannot be installed on the CPU machines CI runs on, so the flash
backend's plumbing (packed THD tokens, ``cu_seqlens``, ``max_seqlen``, ``window_size``, head layout,
output shape) is tested against this pure-PyTorch function written from flash-attn's documented
signature and semantics (``flash_attn/flash_attn_interface.py``, flash-attn 2.x docstring):

* ``q``: ``(total_q, nheads, headdim)``; ``k``, ``v``: ``(total_k, nheads_k, headdim)`` with
  ``nheads % nheads_k == 0`` (MQA/GQA); ``cu_seqlens_q/_k``: ``(batch + 1,)`` int32 cumulative lengths;
  ``max_seqlen_q/_k``: the longest sequence.
* ``softmax_scale`` defaults to ``1 / sqrt(headdim)``; ``causal`` aligns the mask bottom-right.
* ``window_size=(left, right)``: query ``i`` attends keys ``j`` with ``i + seqlen_k - seqlen_q - left
  <= j <= i + seqlen_k - seqlen_q + right``; ``-1`` means unlimited on that side.
* Returns ``out``: ``(total_q, nheads, headdim)``.

Arguments this reference does not model (softcap, ALiBi, paged KV, returning probabilities) raise,
so a caller relying on them cannot pass here. The real kernel is compared with this function in
``tests/test_packed_attention.py`` wherever ``flash_attn`` imports on a GPU.
"""

from __future__ import annotations

import math

import torch


def reference_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    if softcap or alibi_slopes is not None or return_attn_probs or block_table is not None:
        raise NotImplementedError("the test reference models neither softcap, ALiBi, probabilities nor paged KV")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 tensor (flash-attn's contract), got {cu.dtype} {tuple(cu.shape)}")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q/k/v must be (total, heads, headdim), got {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    if int(cu_seqlens_q[-1]) != q.shape[0] or int(cu_seqlens_k[-1]) != k.shape[0]:
        raise ValueError("cu_seqlens must end at the number of packed tokens")
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    if max(lengths_q) > max_seqlen_q or max(lengths_k) > max_seqlen_k:
        raise ValueError(f"max_seqlen ({max_seqlen_q}, {max_seqlen_k}) below the longest sequence ({max(lengths_q)}, {max(lengths_k)})")
    heads, heads_k = q.shape[1], k.shape[1]
    if heads % heads_k:
        raise ValueError(f"nheads={heads} is not a multiple of nheads_k={heads_k}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = window_size
    if causal:
        right = 0
    out = torch.empty_like(q)
    compute = torch.promote_types(q.dtype, torch.float32)  # flash-attn accumulates in fp32
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q[:-1], bounds_q[1:]), zip(bounds_k[:-1], bounds_k[1:])):
        qi = q[q0:q1].transpose(0, 1).to(compute)  # [heads, n_q, d]
        ki = k[k0:k1].transpose(0, 1).repeat_interleave(heads // heads_k, 0).to(compute)
        vi = v[k0:k1].transpose(0, 1).repeat_interleave(heads // heads_k, 0).to(compute)
        scores = (qi @ ki.transpose(1, 2)) * scale
        row = torch.arange(q1 - q0, device=q.device)[:, None] + (k1 - k0) - (q1 - q0)  # bottom-right aligned
        col = torch.arange(k1 - k0, device=q.device)[None, :]
        allowed = torch.ones_like(scores[0], dtype=torch.bool)
        if left >= 0:
            allowed &= col >= row - left
        if right >= 0:
            allowed &= col <= row + right
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        if dropout_p > 0.0:
            probs = torch.nn.functional.dropout(probs, p=dropout_p)
        out[q0:q1] = (probs @ vi).transpose(0, 1).to(q.dtype)
    return out
