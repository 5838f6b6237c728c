"""Running micro-batches through megatron-core's pipeline schedules, for any TP/PP/VPP layout.

``run_schedule`` is the one place that calls ``get_forward_backward_func``: training
(``training/step.py``) and forward-only evaluation (``forward_logits``) both go through it, so the
P2P shapes and per-chunk iterators are set up identically.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch


def schedule_shape(chunk: torch.nn.Module, batch: Dict[str, torch.Tensor]):
    """(seq_length, micro_batch_size) that megatron's P2P exchange uses for this batch.

    SDPA rows travel as ``[s, b, h]``; the THD layout (TE, flash-attn, FlexAttention) as one packed
    row ``[b*s, 1, h]``.
    """
    from megatron_mmbert.model.specs import PACKED_BACKENDS

    b, s = batch["tokens"].shape
    return (b * s, 1) if _unwrap(chunk).backend in PACKED_BACKENDS else (s, b)


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def to_device(batch: Dict, device: torch.device) -> Dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def run_schedule(
    chunks: List[torch.nn.Module],
    forward_step: Callable,
    micro_batches: Sequence[Dict[str, torch.Tensor]],
    forward_only: bool,
):
    """``get_forward_backward_func`` over ``micro_batches``; each chunk gets its own iterator over
    the same micro-batches (every pipeline stage needs positions and boundaries)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_batches = list(micro_batches)
    shapes = {schedule_shape(chunks[0], b) for b in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"all micro-batches of one schedule must share a shape, got {sorted(shapes)}")
    seq_length, micro_batch_size = shapes.pop()
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def forward_logits(
    chunks: List[torch.nn.Module], batches: Iterable[Dict[str, torch.Tensor]], device=None
) -> Optional[List[torch.Tensor]]:
    """Full-vocabulary logits ``[b, s, vocab]`` per batch on the last pipeline stage, else None."""
    from megatron.core import parallel_state

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
    with torch.no_grad():
        outputs = run_schedule(chunks, forward_step, batches, forward_only=True)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return [o.detach().cpu() for o in outputs]
    return None
