"""Forward-only passes through megatron-core's pipeline schedules (evaluation, verification).

Every TP/PP/VPP layout runs the same code: ``get_forward_backward_func`` with
``forward_only=True``; the last pipeline stage collects the outputs.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch


def schedule_shape(chunk: torch.nn.Module, batch: Dict[str, torch.Tensor]):
    """(seq_length, micro_batch_size) that megatron's P2P exchange uses for this batch.

    SDPA rows travel as ``[s, b, h]``; TE's THD layout as one packed row ``[b*s, 1, h]``.
    """
    b, s = batch["tokens"].shape
    return (b * s, 1) if _unwrap(chunk).backend == "te" else (s, b)


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def to_device(batch: Dict, device: torch.device) -> Dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def forward_logits(
    chunks: List[torch.nn.Module], batches: Iterable[Dict[str, torch.Tensor]], device=None
) -> Optional[List[torch.Tensor]]:
    """Full-vocabulary logits ``[b, s, vocab]`` per batch on the last pipeline stage, else None.

    Every rank passes the same batches (each pipeline stage needs positions and boundaries).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    if not batches:
        return []
    device = device or next(chunks[0].parameters()).device

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        logits = model(
            batch["tokens"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"],
            return_logits=True,
        )
        return logits, None  # no loss function: the schedule collects the output as is

    for chunk in chunks:
        chunk.eval()
    seq_length, micro_batch_size = schedule_shape(chunks[0], batches[0])
    shapes = {schedule_shape(chunks[0], b) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"all batches of one call must share a shape, got {sorted(shapes)}")
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return [o.detach().cpu() for o in outputs]
    return None
