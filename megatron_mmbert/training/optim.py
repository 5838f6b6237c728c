"""The optimizer and the learning-rate schedule of a run, counted in tokens.

* :func:`build` makes megatron-core's optimizer through ``training.step.build_optimizer``
  (``get_megatron_optimizer``: AdamW with decoupled weight decay, or mmBERT's StableAdamW inside the
  same wrappers; the standard Megatron param groups put norms and biases -- every 1-D parameter and
  every ``*.bias`` -- at ``wd_mult = 0``) and wraps it in :class:`GuardedOptimizer`, which refuses
  to step on non-finite gradients.
* :func:`phase_scheduler` makes megatron-core's ``OptimizerParamScheduler`` for one phase, with
  *tokens* as its step unit (Megatron-LM counts samples the same way): linear warmup over
  ``warmup_tokens``, constant, then ``WSD`` decay over the phase's last ``decay_tokens`` with
  ``minus_sqrt`` (mmBERT's ``1-sqrt``: ``lr_f + (lr - lr_f)(1 - sqrt(frac))``) or ``linear`` to
  ``final_lr_ratio * lr``. Each step calls ``scheduler.step(tokens_of_the_step)``.
* mmBERT's weight decay is "fully decoupled" (optimi: ``p *= 1 - (lr_t / lr_max) * wd``); Megatron's
  AdamW does ``p -= lr_t * wd' * p``. They agree with ``wd' = wd / lr_max`` per phase
  (:func:`megatron_weight_decay`).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.training.config import LRSegment, RunConfig


def megatron_weight_decay(cfg: RunConfig, phase: PhaseConfig) -> float:
    """AdamW ``weight_decay`` equal to the phase's fully decoupled decay at its peak LR."""
    seg = cfg.schedule.phases[phase.name]
    wd = seg.decoupled_weight_decay
    if wd is None:
        wd = cfg.optimizer.decoupled_weight_decay
    return wd / seg.lr


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for apex's ``amp_C.multi_tensor_l2norm`` (what megatron-core's grad norm calls):
    ``torch._foreach_norm`` over the tensors and one norm of the norms, on their device.

    megatron-core's own fallback without TE or apex (``local_multi_tensor_l2_norm``) builds
    ``torch.tensor([torch.norm(g) for g in grads])``: one host read per gradient tensor, every step
    (StableAdamW runs without clipping, so the logged norm is computed separately each step)."""
    tensors = [t for tensors in tensor_lists for t in tensors]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms)).reshape(1)
    return total, (torch.stack(norms) if per_tensor else None)


def use_foreach_grad_norm() -> None:
    """Make megatron-core's grad norm use :func:`foreach_l2_norm` where it would use its per-tensor
    fallback (no TE, no apex); a real fused kernel, when installed, is left in place."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm


class GuardedOptimizer:
    """A megatron optimizer that never steps on non-finite gradients.

    Megatron only checks for inf/NaN under fp16 loss scaling; under fp32 and bf16 a NaN gradient
    would be applied and poison the weights. Before delegating ``step()``, every rank checks its
    gradient buffers (``param.main_grad``, after the data-parallel reduction) and the result is
    all-reduced, so all ranks skip together. Everything else is delegated.
    """

    def __init__(self, optimizer, chunks: List[torch.nn.Module]):
        self._optimizer = optimizer
        self._chunks = chunks
        use_foreach_grad_norm()
        self.inject_nan = False
        """Test hook: put a NaN into one gradient before the next check."""
        self.last_skip_reason: Optional[str] = None

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def _grads(self):
        """The gradient storage: megatron DDP's contiguous grad buffers (every ``main_grad`` is a
        view into one), else each parameter's ``.grad``."""
        for chunk in self._chunks:
            buffers = getattr(chunk, "buffers", None)
            if isinstance(buffers, list):  # megatron DDP (nn.Module.buffers is a method otherwise)
                for buffer in buffers + list(getattr(chunk, "expert_parallel_buffers", [])):
                    yield buffer.grad_data
                continue
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                if g is None:
                    g = p.grad
                if g is not None:
                    yield g

    def grads_finite(self) -> bool:
        """All gradients finite on every rank, with one host read per step.

        The check is the fused kernel megatron-core's fp16 optimizer uses for the same question
        (``torch._amp_foreach_non_finite_check_and_unscale_``, here with scale 1: the gradients are
        unchanged) over DDP's contiguous grad buffers: no per-parameter ``bool()`` (a GPU sync each)
        and no boolean copy of the buffers.
        """
        grads = list(self._grads())
        if self.inject_nan and grads:
            grads[0].view(-1)[0] = float("nan")
            self.inject_nan = False
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros(1, dtype=torch.float32, device=device)
        for dtype in {g.dtype for g in grads}:  # the kernel takes one dtype per call
            same = [g for g in grads if g.dtype == dtype]
            torch._amp_foreach_non_finite_check_and_unscale_(same, bad, torch.ones(1, device=device))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad.item() == 0.0)

    def step(self):
        if not self.grads_finite():
            self.last_skip_reason = "non-finite gradient"
            return False, float("nan"), None
        self.last_skip_reason = None
        return self._optimizer.step()


def build(cfg: RunConfig, chunks: List[torch.nn.Module], first_phase: PhaseConfig) -> GuardedOptimizer:
    """megatron-core optimizer over DDP-wrapped ``chunks``, guarded against non-finite gradients."""
    import dataclasses

    from megatron_mmbert.training.step import build_optimizer

    parallel = dataclasses.replace(cfg.parallel, use_distributed_optimizer=cfg.use_distributed_optimizer)
    optimizer = build_optimizer(chunks, cfg.optimizer, parallel, lr=cfg.schedule.phases[first_phase.name].lr,
                                weight_decay=megatron_weight_decay(cfg, first_phase), precision=cfg.compute_precision)
    return GuardedOptimizer(optimizer, chunks)


def phase_scheduler(cfg: RunConfig, optimizer, phase: PhaseConfig, tokens_done: int = 0):
    """megatron-core ``OptimizerParamScheduler`` of ``phase``, positioned at ``tokens_done`` tokens.

    The scheduler's position is a function of the data position, so resuming restores it exactly
    (its ``state_dict`` is also stored in checkpoints and checked on resume).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    seg: LRSegment = cfg.schedule.phases[phase.name]
    min_lr = seg.lr * seg.final_lr_ratio if seg.decay_tokens > 0 else seg.lr
    wd = megatron_weight_decay(cfg, phase)
    # Megatron's param groups carry their own max/min LR (set at build time): move them to this phase.
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = seg.lr, min_lr
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=seg.lr,
        min_lr=min_lr,
        lr_warmup_steps=seg.warmup_tokens,
        lr_decay_steps=phase.tokens,
        lr_decay_style="WSD",
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=phase.tokens,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=seg.decay_tokens,
        lr_wsd_decay_style="minus_sqrt" if seg.decay_style == "1-sqrt" else "linear",
    )
    if tokens_done:
        scheduler.step(tokens_done)
    return scheduler


def current_lr(optimizer) -> float:
    """The LR of the decayed (default) param group, as Megatron-LM logs it."""
    for group in optimizer.param_groups:
        if group.get("default_config", True) and group.get("wd_mult", 1.0) > 0:
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def reference_lr(seg: LRSegment, phase_tokens: int, t: int) -> float:
    """The mmBERT formula (bert24 ``warmup_stable_decay`` / ``one_minus_sqrt``) at phase token ``t``;
    the tests hold the megatron scheduler to it."""
    import math

    if seg.warmup_tokens and t <= seg.warmup_tokens:
        return seg.lr * t / seg.warmup_tokens
    start = phase_tokens - seg.decay_tokens
    if seg.decay_tokens == 0 or t <= start:
        return seg.lr
    frac = min((t - start) / seg.decay_tokens, 1.0)
    f = seg.final_lr_ratio
    shape = 1.0 - math.sqrt(frac) if seg.decay_style == "1-sqrt" else 1.0 - frac
    return seg.lr * (f + (1.0 - f) * shape)
