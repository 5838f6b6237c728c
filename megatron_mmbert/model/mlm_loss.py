"""The MLM head's decoder and cross-entropy, fused and chunked: ``[labelled tokens x vocab]`` logits
never exist at once.

With a 256k vocabulary the decoder is the largest single cost of an encoder step: at 16 x 1024
tokens and 30% masking the logits alone are 5 GB in fp32, and a plain ``linear -> cross_entropy``
keeps them (and a same-sized softmax) alive from the forward to the backward. Here the labelled
tokens go through the decoder ``chunk_rows`` at a time:

* logits of a chunk in the compute dtype (the autocast dtype under amp_bf16, else the weight's),
  upcast to fp32 for the softmax; the decoder bias is added in fp32, as megatron's
  ``ColumnParallelLinear`` + ``vocab_parallel_cross_entropy(logits.float())`` did;
* vocab-parallel under tensor parallelism, as megatron-core's ``vocab_parallel_cross_entropy``
  (max, sum of exponentials and the target's logit all-reduced over the TP group, per chunk);
* the training accuracy's argmax on the same chunk (ties to the lowest id);
* the gradient chunk by chunk: ``d logits = softmax - onehot`` in the compute dtype for the two
  GEMMs, the weight and bias gradients accumulated in fp32 over chunks.

Two gradient schedules, same numbers:

* ``reduction="sum"`` (training): the gradient is computed in the forward pass (as Liger-Kernel's
  fused linear cross-entropy does) and scaled by the upstream scalar in backward. The head is the
  last op of the forward and the first of the backward, so holding its gradients in between costs
  no peak memory, and the decoder GEMM runs once, not twice;
* ``reduction="none"`` (per-token losses: evaluation, parity checks): only the log-sum-exp per
  token is kept; backward recomputes each chunk's logits (no collective needed: the saved
  log-sum-exp is already global).

Padded vocabulary columns (only on the last TP rank) get ``finfo(float32).min``: no probability,
no gradient, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

CHUNK_LOGITS = 1 << 25
"""Default logits elements per chunk (32 Mi: 128 MiB in fp32), split into rows of the local vocab."""


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the (padded) vocabulary."""

    start: int
    """First vocabulary id of this rank's columns."""
    valid: int
    """How many of this rank's columns are real vocabulary ids (the rest is padding)."""
    group: Optional[object] = None
    """The tensor-parallel process group, or None at TP 1."""


def default_chunk_rows(local_vocab: int, budget: int = CHUNK_LOGITS) -> int:
    """Rows per chunk so that one chunk's logits hold about ``budget`` elements (at least 16)."""
    return max(16, budget // max(1, local_vocab))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the weight's device, else the weight's dtype."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        torch.distributed.all_reduce(t, op=op, group=group)
    return t


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """fp32 logits ``[rows, local vocab]``: GEMM in ``h``'s dtype, bias added in fp32, padding masked."""
    if h.dtype == torch.float32:
        logits = torch.addmm(bias.float(), h, weight.t())
    else:
        logits = (h @ weight.t()).float().add_(bias.float())
    if shard.valid < logits.shape[-1]:
        logits[:, shard.valid:] = torch.finfo(torch.float32).min
    return logits


def _chunk_softmax(logits: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor,
                   shard: VocabShard, want_argmax: bool):
    """Global (log-sum-exp, target logit, argmax or None) per row of a chunk; ``logits`` becomes
    the softmax in place (one chunk-sized buffer, no temporaries of its size)."""
    from torch.distributed import ReduceOp

    local_max, local_arg = logits.max(dim=-1)
    global_max = _all_reduce(local_max.clone(), ReduceOp.MAX, shard.group)
    target_logit = logits.gather(1, local_target.unsqueeze(1)).squeeze(1) * here
    argmax = None
    if want_argmax:
        argmax = local_arg + shard.start
        if shard.group is not None:
            argmax = torch.where(local_max == global_max, argmax, torch.full_like(argmax, 2**62))
            argmax = _all_reduce(argmax, ReduceOp.MIN, shard.group)
    logits.sub_(global_max.unsqueeze(1)).exp_()
    both = _all_reduce(torch.stack([logits.sum(dim=-1), target_logit]), ReduceOp.SUM, shard.group)
    logits.div_(both[0].unsqueeze(1))
    return torch.log(both[0]) + global_max, both[1], argmax


def _grad_logits(probs, local_target, here, scale: Optional[torch.Tensor], dtype):
    """``(softmax - onehot) * scale`` in ``dtype``, from the softmax (overwritten)."""
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, local_target] -= here
    if scale is not None:
        probs.mul_(scale.unsqueeze(1))
    return probs.to(dtype)


def _accumulate(grad_w: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> None:
    """``grad_w (fp32) += d.T @ h``: in place in fp32, else the compute-dtype GEMM added in fp32."""
    if d.dtype == grad_w.dtype:
        grad_w.addmm_(d.t(), h)
    else:
        grad_w.add_(d.t() @ h)


class ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    """``CE(hidden @ weight.T + bias, target)`` over a vocab-parallel ``weight`` (see the module
    docstring). Returns ``(loss, correct)``: per-token losses ``[n]`` (or their sum) in fp32, and
    the number of rows whose argmax is the target (no gradient; 0 unless ``count_correct``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, shard: VocabShard, chunk_rows: int,
                reduction: str, count_correct: bool):
        dtype = compute_dtype(weight)
        device_type = weight.device.type
        n = hidden.shape[0]
        local = target - shard.start
        here = ((local >= 0) & (local < shard.valid)).float()
        local = torch.where(here.bool(), local, torch.zeros_like(local))
        h, w = hidden.to(dtype), weight.to(dtype)
        eager_grads = reduction == "sum" and torch.is_grad_enabled() and any(ctx.needs_input_grad[:3])
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        if eager_grads:
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        with torch.autocast(device_type, enabled=False):
            for a in range(0, n, chunk_rows):
                b = min(a + chunk_rows, n)
                probs = _chunk_logits(h[a:b], w, bias, shard)
                lse, target_logit, argmax = _chunk_softmax(probs, local[a:b], here[a:b], shard, count_correct)
                losses[a:b] = lse - target_logit
                lse_all[a:b] = lse
                if count_correct:
                    correct += (argmax == target[a:b]).sum()
                if eager_grads:
                    d = _grad_logits(probs, local[a:b], here[a:b], None, dtype)
                    grad_h[a:b] = d @ w
                    _accumulate(grad_w, d, h[a:b])
                    grad_b.add_(d.float().sum(0))
        ctx.mark_non_differentiable(correct)
        ctx.shard, ctx.chunk_rows, ctx.reduction, ctx.dtype = shard, chunk_rows, reduction, dtype
        ctx.eager = eager_grads
        if eager_grads:
            # Kept on ctx, not saved: backward hands them over and drops them, so autograd can take
            # the weight gradient as it is instead of copying it (one weight-sized buffer, not two).
            ctx.eager_grads = [grad_h, grad_w, grad_b]
            ctx.input_dtypes = (hidden.dtype, weight.dtype, bias.dtype)
        else:
            ctx.save_for_backward(hidden, weight, bias, local, here, lse_all)
        return (losses.sum() if reduction == "sum" else losses), correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        if ctx.eager:
            grad_h, grad_w, grad_b = ctx.eager_grads
            ctx.eager_grads = None
            h_dtype, w_dtype, b_dtype = ctx.input_dtypes
            scale = grad_loss.float()
            # in place: the saved gradients are used once (no second weight-sized buffer)
            return ((grad_h.float() * scale).to(h_dtype), grad_w.mul_(scale).to(w_dtype),
                    grad_b.mul_(scale).to(b_dtype), None, None, None, None, None)
        hidden, weight, bias, local, here, lse_all = ctx.saved_tensors
        dtype, shard, n = ctx.dtype, ctx.shard, hidden.shape[0]
        h, w = hidden.to(dtype), weight.to(dtype)
        scale = grad_loss.float()
        if scale.dim() == 0:
            scale = scale.expand(n)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        with torch.autocast(weight.device.type, enabled=False):
            for a in range(0, n, ctx.chunk_rows):
                b = min(a + ctx.chunk_rows, n)
                probs = _chunk_logits(h[a:b], w, bias, shard).sub_(lse_all[a:b].unsqueeze(1)).exp_()
                d = _grad_logits(probs, local[a:b], here[a:b], scale[a:b], dtype)
                grad_h[a:b] = d @ w
                _accumulate(grad_w, d, h[a:b])
                grad_b.add_(d.float().sum(0))
        return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype), grad_b.to(bias.dtype),
                None, None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                          shard: VocabShard, chunk_rows: Optional[int] = None, reduction: str = "none",
                          count_correct: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` (``weight``: this rank's vocabulary rows)
    against ``target`` (global ids), chunked (module docstring). ``hidden`` must already be the
    TP-replicated input whose gradient the caller all-reduces (``copy_to_tensor_model_parallel_region``).
    Returns ``(per-token losses [n] or their sum, correct count)``."""
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    return ChunkedVocabParallelCrossEntropy.apply(hidden, weight, bias, target, shard, rows, reduction, count_correct)


__all__ = ["CHUNK_LOGITS", "ChunkedVocabParallelCrossEntropy", "VocabShard", "chunked_cross_entropy",
           "compute_dtype", "default_chunk_rows"]
