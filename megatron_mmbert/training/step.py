"""One optimizer step through megatron-core: DDP, the optimizer, the pipeline schedule.

The pieces are megatron-core's own, wired as Megatron-LM wires them (``training.py``):

* :func:`wrap_ddp`: ``Float16Module`` for bf16 (not for amp_bf16: fp32 parameters, autocast), then ``DistributedDataParallel`` with contiguous
  grad buffers (fp32 grad reduction), and the config hooks the schedules call (``no_sync_func``,
  ``finalize_model_grads_func``);
* :func:`build_optimizer`: ``get_megatron_optimizer`` from the run config's ``OptimizerSection``
  (Adam with decoupled weight decay, fp32 master weights under bf16, optionally the distributed
  optimizer), no weight decay on norms and biases;
  for ``stable_adamw`` the torch optimizer inside megatron's wrappers is replaced by
  ``training.stable_adamw.StableAdamW`` over the same param groups;
* :func:`train_step`: ``get_forward_backward_func`` over the micro-batches of one global batch, then
  ``optimizer.step()``, reported as a :class:`StepResult`. The loss is a per-token mean over the *global* batch
  (``calculate_per_token_loss``): micro-batches and DP ranks with different numbers of masked
  tokens are weighted by their token counts, so every parallel layout computes the same loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_mmbert.config import ParallelConfig
from megatron_mmbert.model.pipeline import _unwrap, run_schedule, to_device
from megatron_mmbert.training.config import OptimizerSection


@dataclass
class StepResult:
    """What one step reports, identical on every rank (global over the batch)."""

    loss: float
    """Per-token mean MLM loss over the labelled tokens of the global batch."""
    accuracy: float
    """Fraction of labelled tokens predicted correctly."""
    tokens: float
    """Labelled (masked) tokens of the global batch."""
    grad_norm: float = float("nan")
    """Global gradient norm (NaN for evaluation, or where megatron did not compute it)."""
    update_ok: bool = True
    """Whether the optimizer applied the update (False: non-finite gradients, skipped)."""
    time_forward_backward_s: float = 0.0
    """Seconds in the forward/backward schedule: on a GPU the device time between CUDA events
    recorded around it (the host returns from the schedule while kernels are still queued, so a
    host timer would put most of the backward into the optimizer); on CPU host time."""
    time_optimizer_s: float = 0.0
    """The rest of the step: the optimizer step and the report reduction (the step's wall time less
    ``time_forward_backward_s``, so the two add up to it exactly)."""


def wrap_ddp(chunks: List[torch.nn.Module], parallel: ParallelConfig, precision: str = "fp32"):
    """Wrap each model chunk for mixed precision and megatron-core DDP; returns the wrapped chunks."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    if precision == "bf16":
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather and parallel.use_distributed_optimizer,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk buckets: the same choice Megatron-LM makes for VPP.
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()  # identical replicas across data-parallel ranks
    one = lambda fns: fns if len(fns) > 1 else fns[0]  # noqa: E731 -- megatron takes one or a list
    config.no_sync_func = one([c.no_sync for c in wrapped])
    if ddp_config.overlap_grad_reduce:  # as Megatron-LM wires it: buckets start in the backward
        config.grad_sync_func = one([c.start_grad_sync for c in wrapped])
    if ddp_config.overlap_param_gather:  # the forward pre-hooks wait for each bucket's all-gather
        config.param_sync_func = one([c.start_param_sync for c in wrapped])
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def finish_param_sync(chunks: List[torch.nn.Module]) -> None:
    """Under ``overlap_param_gather`` the updated parameters arrive during the next forward: gather
    them now (before a save, an evaluation or the end of the run). Otherwise nothing to do."""
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def build_optimizer(chunks: List[torch.nn.Module], section: OptimizerSection, parallel: ParallelConfig, *,
                    lr: float, weight_decay: float, precision: str = "fp32"):
    """megatron-core optimizer over DDP-wrapped chunks (norms and biases excluded from decay).

    ``section`` gives the optimizer and its hyper-parameters; ``lr`` is the peak LR (the scheduler
    sets the current one each step), ``weight_decay`` megatron's AdamW coefficient
    (``p -= lr * wd * p``; ``optim.megatron_weight_decay`` converts mmBERT's fully decoupled decay)
    and ``precision`` the model's (bf16: fp32 master weights in the optimizer)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    bf16 = precision == "bf16"
    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=0.0,
        weight_decay=weight_decay,
        adam_beta1=section.adam_beta1,
        adam_beta2=section.adam_beta2,
        adam_eps=section.adam_eps,
        clip_grad=section.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        decoupled_weight_decay=True,
    )
    if section.name not in ("adamw", "stable_adamw"):
        raise ValueError(f"optimizer {section.name!r} is not one of adamw, stable_adamw")
    optimizer = get_megatron_optimizer(config, chunks)
    if section.name == "stable_adamw":
        from megatron_mmbert.training import stable_adamw

        stable_adamw.install(optimizer, chunks, lr, (section.adam_beta1, section.adam_beta2),
                             section.adam_eps, weight_decay)
    _unwrap(chunks[0]).config.grad_scale_func = optimizer.scale_loss
    return optimizer


def mlm_forward_step(device: torch.device):
    """The ``forward_step_func`` for megatron's schedules: MLM loss summed over labelled tokens,
    with (loss sum, labelled count, correct count) reported for logging. The labelled tokens are
    found on the CPU batch (``training.prefetch.prepare``), never on the device."""
    from megatron_mmbert.training.prefetch import prepare

    def forward_step(data_iterator, model):
        batch = to_device(prepare(next(data_iterator)), device)
        stats: Dict[str, torch.Tensor] = {}
        total = model(
            batch["tokens"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"],
            labels=batch["labels"], mlm_stats=stats, label_index=batch["label_index"], loss_reduction="sum",
        )
        count = batch["label_count"]

        def loss_func(total: torch.Tensor):
            correct = stats.get("correct", torch.zeros((), device=total.device))
            report = torch.stack([total.detach().float(), count.float(), correct.float()])
            return total, count, {"mlm": report}

        return total, loss_func

    return forward_step


class StepTimer:
    """The split of one step into forward/backward and the rest, without a host sync of its own.

    On CUDA it records events on the current stream (asynchronous: the GPU timestamps them when it
    gets there) and reads their distance only after the step's report reduction, which waits for the
    GPU anyway; on CPU, where work is synchronous, host timestamps. ``enabled=False``: nothing is
    recorded and both times read 0."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.marks: List = []

    def mark(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((time.perf_counter(), event))
        else:
            self.marks.append((time.perf_counter(), None))

    def split(self):
        """``(forward/backward seconds, rest seconds)`` between marks 0-1 and 1-end (after the
        step's last host read; on CUDA the last event is waited for, normally already passed)."""
        if not self.enabled or len(self.marks) < 3:
            return 0.0, 0.0
        (h0, e0), (h1, e1), (h2, e2) = self.marks[0], self.marks[1], self.marks[-1]
        wall = h2 - h0
        if not self.cuda:
            return h1 - h0, h2 - h1
        e2.synchronize()
        device_fb = e0.elapsed_time(e1) / 1000.0
        # The events time the GPU; the host waited at least as long as the GPU worked.
        forward_backward = min(device_fb, wall)
        return forward_backward, wall - forward_backward


def train_step(
    chunks: List[torch.nn.Module],
    optimizer,
    micro_batches: Sequence[Dict[str, torch.Tensor]],
    device: Optional[torch.device] = None,
    timing: bool = True,
) -> StepResult:
    """Forward/backward over ``micro_batches`` (this DP rank's share of one global batch) and one
    optimizer step; the same :class:`StepResult` on every rank. ``timing``: measure the split of
    the step (:class:`StepTimer`: CUDA events on a GPU, no extra host sync)."""
    device = device or next(chunks[0].parameters()).device
    for chunk in chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    timer = StepTimer(device, timing)
    timer.mark()
    outputs = run_schedule(chunks, mlm_forward_step(device), micro_batches, forward_only=False)
    timer.mark()
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok and not grad_norm:
        # Without clipping megatron skips the norm (None, or 0.0 under mixed precision); the main
        # grads are still in place, so measure it for the logs.
        grad_norm = optimizer.get_grad_norm()
    totals = reduce_mlm_reports(outputs, device)  # its host read also waits for the GPU's work
    timer.mark()
    time_forward_backward, time_rest = timer.split()
    return StepResult(
        loss=totals[0] / max(totals[1], 1.0),
        accuracy=totals[2] / max(totals[1], 1.0),
        tokens=totals[1],
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_ok=bool(update_ok),
        time_forward_backward_s=time_forward_backward,
        time_optimizer_s=time_rest,
    )


def eval_step(
    chunks: List[torch.nn.Module],
    micro_batches: Sequence[Dict[str, torch.Tensor]],
    device: Optional[torch.device] = None,
) -> StepResult:
    """Forward-only MLM loss and accuracy over ``micro_batches`` (this DP rank's share), global."""
    device = device or next(chunks[0].parameters()).device
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = run_schedule(chunks, mlm_forward_step(device), micro_batches, forward_only=True)
    for chunk in chunks:
        chunk.train()
    totals = reduce_mlm_reports(outputs, device)
    return StepResult(loss=totals[0] / max(totals[1], 1.0), accuracy=totals[2] / max(totals[1], 1.0),
                      tokens=totals[1])


def reduce_mlm_reports(outputs, device) -> List[float]:
    """[loss sum, labelled tokens, correct] over the whole global batch, on every rank.

    Only the last pipeline stage has reports; its TP ranks hold identical copies, so TP rank 0
    contributes and one all-reduce over the world gives every rank the totals.
    """
    from megatron.core import parallel_state

    local = torch.zeros(3, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        for report in outputs:
            local += report["mlm"].to(local)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(local)
    return local.tolist()
