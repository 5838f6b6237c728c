"""The MLM loss as the encoder computed it before the chunked head (the reference for
``model/mlm_loss.py``): megatron's ``ColumnParallelLinear`` GEMM (under autocast: a compute-dtype
GEMM plus the fp32 bias), the padded columns masked, ``vocab_parallel_cross_entropy(logits.float())``
and the argmax over the whole vocab-split row."""

import torch


def reference_loss(hidden, weight, bias, target, start: int, valid: int, tp_group=None):
    """(per-token losses, argmax) with megatron-core's own vocab-parallel cross-entropy."""
    from megatron.core import tensor_parallel

    logits = hidden @ weight.t()
    logits = logits + bias  # megatron's linear: the output plus the bias (promoted under autocast)
    if valid < logits.shape[-1]:
        ids = torch.arange(logits.shape[-1])
        logits = logits.masked_fill(ids >= valid, torch.finfo(logits.dtype).min)
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)
    with torch.no_grad():
        local_max, local_arg = logits.float().max(dim=-1)
        arg = local_arg + start
        if tp_group is not None:
            global_max = local_max.clone()
            torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
            arg = torch.where(local_max == global_max, arg, torch.full_like(arg, 2**62))
            torch.distributed.all_reduce(arg, op=torch.distributed.ReduceOp.MIN, group=tp_group)
    return losses, arg


def head_inputs(n: int, hidden: int, local_vocab: int, seed: int, vocab_start: int = 0, vocab: int = None):
    """Random hidden states, a decoder shard, its bias and targets over ``vocab`` real ids."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(local_vocab, hidden, generator=g) * 0.2
    b = torch.randn(local_vocab, generator=g) * 0.1
    target = torch.randint(0, vocab or local_vocab, (n,), generator=g)
    return h, w, b, target
