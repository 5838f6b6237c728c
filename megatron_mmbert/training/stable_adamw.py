"""StableAdamW, the optimizer mmBERT was trained with, under megatron-core's optimizer wrappers.

The algorithm is optimi's ``StableAdamW`` (Warner, torch-optimi; Wortsman et al. 2023, "Stable and
low-precision training for large-scale vision-language models"), as mmBERT's released configs use
it (``decoupled_stableadamw``, betas 0.9/0.95, eps 1e-8, no gradient clipping). Per tensor, at step t:

* Adam bias correction folded into the EMA coefficients:
  ``beta_hat = (beta^t - beta) / (beta^t - 1)``; ``m = lerp(m, g, 1 - beta1_hat)``,
  ``v = beta2_hat * v + (1 - beta2_hat) * g^2``;
* update clipping instead of gradient clipping: ``lr_t = lr / max(1, sqrt(mean(g^2 / max(v, eps^2))))``,
  the mean taken over the **whole** tensor;
* decoupled weight decay with the clipped LR: ``p *= 1 - lr_t * weight_decay``. The run gives
  ``weight_decay = decoupled_weight_decay / peak_lr`` (``training.optim.megatron_weight_decay``),
  which is optimi's fully decoupled ``1 - (lr_t / max_lr) * wd``;
* ``p -= lr_t * m / (sqrt(v) + eps)``.

State keys are torch Adam's (``exp_avg``, ``exp_avg_sq``, a per-parameter ``step`` tensor, the step
also mirrored in each param group as TE/Apex FusedAdam keep it), so megatron-core's optimizer
wrappers, its ``init_state_fn`` and the sharded checkpoint formats handle it exactly as they handle
Adam.

"Whole tensor" under parallelism. Megatron's distributed optimizer hands each data-parallel rank a
contiguous range of the flattened parameters, so a tensor may be split over DP ranks; tensor
parallelism splits tensors over TP ranks. :class:`TensorRMSReducer` sums each tensor's partial
``sum(g^2 / max(v, eps^2))`` and element count over the DP group (distributed optimizer) and, for
TP-split tensors, over the TP group, so every layout clips exactly as one process does. Padded
vocabulary rows (``unpadded_numel`` on the vocab-parallel parameters) are left out of the count:
their gradient is always zero, and the HF model optimi would see has no such rows.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

RMSReducer = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]
"""``(params, stats [P, 2] float64: (partial sum, partial count) per param) -> whole-tensor stats``."""


def debias_beta(beta: float, step: int) -> float:
    """``beta_hat_t = (beta^t - beta) / (beta^t - 1)``: EMA with this coefficient equals Adam's
    bias-corrected average (beta_hat_1 = 0, so the first average is the gradient itself)."""
    return (beta**step - beta) / (beta**step - 1)


class StableAdamW(torch.optim.Optimizer):
    """StableAdamW (see the module docstring). ``rms_reducer`` completes each tensor's update-RMS
    statistic across ranks; None computes it over the local tensor (one process, or replicas)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rms_reducer: Optional[RMSReducer] = None,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"StableAdamW betas must be in [0, 1), got {betas}")
        if eps < 0.0 or lr < 0.0 or weight_decay < 0.0:
            raise ValueError(f"StableAdamW lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.rms_reducer = rms_reducer
        self.last_clipped = 0
        """Tensors whose update was clipped (whole-tensor RMS > 1) in the last step."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries: List[Tuple[dict, torch.Tensor, dict]] = []
        partial: List[torch.Tensor] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps_sq = group["eps"] ** 2
            group_step = group.get("step", 0)  # what a loaded TE-style state dict restored
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in state or state["step"].item() < group_step:
                    # Fresh, or loaded where only the param group kept the step (megatron's TE/Apex
                    # path; a placeholder state may say 0): the group's count is the step taken.
                    state["step"] = torch.tensor(float(group_step), dtype=torch.float32)
                state["step"] = state["step"] + 1  # not in place: a loaded state may share one step tensor
                t = int(state["step"].item())  # a CPU tensor: no device sync
                group["step"] = t  # mirrored where megatron looks for it with TE/Apex FusedAdam
                b1, b2 = debias_beta(beta1, t), debias_beta(beta2, t)
                state["exp_avg"].lerp_(grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                ratio = grad.pow(2).div_(state["exp_avg_sq"].clamp(min=eps_sq))
                partial.append(torch.stack([ratio.sum(dtype=torch.float64),
                                            torch.tensor(float(p.numel()), dtype=torch.float64, device=p.device)]))
                entries.append((group, p, state))
        device = entries[0][1].device if entries else self._any_device()
        stats = torch.stack(partial) if partial else torch.zeros((0, 2), dtype=torch.float64, device=device)
        if self.rms_reducer is not None:  # collective: every rank calls it, with or without params
            stats = self.rms_reducer([p for _, p, _ in entries], stats)
        rms = (stats[:, 0] / stats[:, 1].clamp(min=1.0)).sqrt().tolist()  # one device sync per step
        self.last_clipped = sum(r > 1.0 for r in rms)
        for (group, p, state), r in zip(entries, rms):
            lr = group["lr"] / max(1.0, r)
            if group["weight_decay"] != 0:
                p.mul_(1 - lr * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-lr)
        return loss

    def _any_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")


class TensorRMSReducer:
    """Whole-tensor StableAdamW statistics for the inner optimizer of one megatron optimizer.

    Every parameter of the model chunks gets a slot (same order on every rank of a DP or TP group:
    they hold the same modules). A step scatters the local partial (sum, count) of each optimizer
    parameter -- a shard of a model parameter under the distributed optimizer, else its fp32 copy
    or the parameter itself -- into a [slots, 2] vector, all-reduces it over the DP group when
    parameters are sharded, then over the TP group for the tensor-parallel slots only.
    """

    def __init__(self, megatron_optimizer, chunks: Sequence[torch.nn.Module]):
        from megatron.core import parallel_state
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        model_params = [p for chunk in chunks for p in chunk.parameters()]
        index = {id(p): i for i, p in enumerate(model_params)}
        self.slots = len(model_params)
        self.tp_split = torch.tensor([bool(getattr(p, "tensor_model_parallel", False)) for p in model_params])
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() else None
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size() if self.tp_group is not None else 1
        self.dp_group = None
        # id(optimizer param) -> (slot, elements of the real tensor it holds)
        self.where: Dict[int, Tuple[int, int]] = {}
        opt = megatron_optimizer
        if isinstance(opt, DistributedOptimizer):
            self.dp_group = opt.data_parallel_group
            pairs = []
            for g in range(len(opt.model_float16_groups)):
                pairs += list(zip(opt.model_float16_groups[g], opt.shard_fp32_from_float16_groups[g]))
                pairs += list(zip(opt.model_fp32_groups[g], opt.shard_fp32_groups[g]))
            for model_param, shard in pairs:
                rng = opt._get_model_param_range_map(model_param)["param"]
                valid = max(0, min(rng.end, _unpadded_numel(model_param)) - rng.start)
                self.where[id(shard)] = (index[id(model_param)], valid)
        elif hasattr(opt, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
            for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for model_param, main in zip(model_group, main_group):
                    self.where[id(main)] = (index[id(model_param)], _unpadded_numel(model_param))
            for group in opt.fp32_from_fp32_groups:
                for p in group:
                    self.where[id(p)] = (index[id(p)], _unpadded_numel(p))
        else:  # FP32Optimizer: the model parameters themselves
            for p in model_params:
                self.where[id(p)] = (index[id(p)], _unpadded_numel(p))

    def __call__(self, params: Sequence[torch.Tensor], stats: torch.Tensor) -> torch.Tensor:
        vec = torch.zeros((self.slots, 2), dtype=torch.float64, device=stats.device)
        rows = []
        for k, p in enumerate(params):
            slot, valid = self.where[id(p)]
            vec[slot, 0] += stats[k, 0]
            vec[slot, 1] += valid
            rows.append(slot)
        if self.dp_group is not None and torch.distributed.get_world_size(self.dp_group) > 1:
            torch.distributed.all_reduce(vec, group=self.dp_group)
        if self.tp_size > 1:
            split = self.tp_split.to(vec.device).unsqueeze(1)
            summed = torch.where(split, vec, torch.zeros_like(vec))
            torch.distributed.all_reduce(summed, group=self.tp_group)
            vec = torch.where(split, summed, vec)
        return vec[torch.tensor(rows, dtype=torch.long, device=vec.device)] if rows else vec[:0]


def _unpadded_numel(param: torch.Tensor) -> int:
    """Elements of ``param`` that are real (vocab-parallel tensors mark their padded rows)."""
    return int(getattr(param, "unpadded_numel", param.numel()))


def install(megatron_optimizer, chunks: Sequence[torch.nn.Module], lr: float, betas, eps: float, weight_decay: float):
    """Replace the torch optimizer inside ``megatron_optimizer`` (each one of a ChainedOptimizer) by
    :class:`StableAdamW` over the same param groups (megatron's keys: ``wd_mult``, ``max_lr``, ...
    stay), with whole-tensor statistics. The wrappers keep doing everything else: grads to fp32
    main params, DP reduce-scatter and param all-gather, checkpoint formats."""
    inner = getattr(megatron_optimizer, "chained_optimizers", None) or [megatron_optimizer]
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        if torch_opt.state:
            raise RuntimeError("StableAdamW must replace the inner optimizer before its first step")
        groups = torch_opt.param_groups
        for group in groups:  # torch AdamW's own defaults do not apply to StableAdamW
            for key in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                        "decoupled_weight_decay"):
                group.pop(key, None)
        stable = StableAdamW([torch.zeros(1, requires_grad=True)], lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, rms_reducer=TensorRMSReducer(opt, chunks))
        # Adopt megatron's groups as its DistributedOptimizer does (their fp32 shards of fp32
        # parameters are views, which torch's constructor would refuse as non-leaf tensors).
        for group in groups:
            for key, value in stable.defaults.items():
                group.setdefault(key, value)
        stable.param_groups = groups
        opt.optimizer = stable
    return megatron_optimizer


__all__ = ["StableAdamW", "TensorRMSReducer", "debias_beta", "install"]
