"""torchrun worker (2 ranks, TP 2): the chunked vocab-parallel MLM loss against megatron-core's
``vocab_parallel_cross_entropy`` on the same shards; losses, gradients and argmax. argv: OUT_PT."""

import os
import sys

import torch


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from megatron.core import parallel_state

    from megatron_mmbert import cpu_adapter
    from megatron_mmbert.model.mlm_loss import VocabShard, chunked_cross_entropy
    from tests.helpers.mlm_loss_reference import head_inputs, reference_loss

    cpu_adapter.install()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    vocab, per_rank, n = 117, 64, 45  # 128 padded columns: rank 1 holds 53 real ones
    h, w_full, b_full, target = head_inputs(n, 24, 2 * per_rank, seed=11, vocab=vocab)
    target[:15] = (h[:15] @ w_full[:vocab].t() + b_full[:vocab]).argmax(-1)  # some right predictions
    w, b = w_full[rank * per_rank:(rank + 1) * per_rank], b_full[rank * per_rank:(rank + 1) * per_rank]
    start = rank * per_rank
    shard = VocabShard(start=start, valid=max(0, min(per_rank, vocab - start)), group=group)
    results = {}
    for dtype in (None, torch.bfloat16):
        for reduction in ("none", "sum"):
            outs = []
            for fn in ("ours", "reference"):
                hh, ww, bb = (t.clone().requires_grad_(True) for t in (h, w, b))
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    if fn == "ours":
                        loss, correct = chunked_cross_entropy(hh, ww, bb, target, shard, chunk_rows=7,
                                                              reduction=reduction, count_correct=True)
                    else:
                        losses, arg = reference_loss(hh, ww, bb, target, start, shard.valid, group)
                        loss, correct = (losses.sum() if reduction == "sum" else losses), (arg == target).sum()
                weights = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(0.7)
                (loss * weights).sum().backward()
                # the caller all-reduces the input gradient (copy_to_tensor_model_parallel_region)
                torch.distributed.all_reduce(hh.grad, group=group)
                outs.append([loss.detach(), correct, hh.grad, ww.grad, bb.grad])
            results[(str(dtype), reduction)] = outs
    torch.save(results, sys.argv[1] + f".rank{rank}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
