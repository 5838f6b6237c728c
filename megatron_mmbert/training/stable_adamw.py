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
        self._count_cache: Dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every group with ``torch._foreach_*`` kernels (a few kernels per slice of
        tensors, not ~10 per tensor), and one device read per step: the clipping statistics.

        The tensors go through in slices of at most :meth:`slice_elements` elements (large tensors
        as flat views of their blocks): on a GPU that bounds the temporaries; on a CPU the slice
        stays in cache through all the element-wise passes, which makes the step memory-bound once
        instead of ten times. Element counts are built on the CPU once per parameter set; the step
        count is the group's (a CPU read per group, no device sync).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, params, the group's slices)
        params_all: List[torch.Tensor] = []
        partial: List[torch.Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            t = self._next_step(group, states)
            b1, b2 = debias_beta(beta1, t), debias_beta(beta2, t)
            eps_sq = group["eps"] ** 2
            tensors = [params, [p.grad for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states]]
            slices = list(_slices(tensors, self.slice_elements(params[0].device), len(params_all)))
            for _, grads, exp_avgs, exp_avg_sqs, _ in slices:
                torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
                torch._foreach_mul_(exp_avg_sqs, b2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - b2)
                ratio = torch._foreach_mul(grads, grads)
                torch._foreach_div_(ratio, torch._foreach_clamp_min(exp_avg_sqs, eps_sq))
                # sum(g^2 / max(v, eps^2)) of each piece: the ratio is >= 0, so its 1-norm
                partial.extend(torch._foreach_norm(ratio, 1, dtype=torch.float64))
                del ratio
            work.append((group, params, slices))
            params_all.extend(params)
        if params_all:
            owners, counts = self._layout(params_all, work)
            sums = torch.zeros(len(params_all), dtype=torch.float64, device=counts.device)
            sums.index_add_(0, owners, torch.stack(partial))
            stats = torch.stack([sums, counts], dim=1)
        else:
            stats = torch.zeros((0, 2), dtype=torch.float64, device=self._any_device())
        if self.rms_reducer is not None:  # collective: every rank calls it, with or without params
            stats = self.rms_reducer(params_all, stats)
        rms = (stats[:, 0] / stats[:, 1].clamp(min=1.0)).sqrt().tolist()  # the one device read per step
        self.last_clipped = sum(r > 1.0 for r in rms)
        lrs = []
        for group, params, _ in work:
            lrs += [group["lr"] / max(1.0, r) for r in rms[len(lrs):len(lrs) + len(params)]]
        for group, _, slices in work:
            for pieces, _, exp_avgs, exp_avg_sqs, owner in slices:
                lr = [lrs[i] for i in owner]
                if group["weight_decay"] != 0:
                    torch._foreach_mul_(pieces, [1 - x * group["weight_decay"] for x in lr])
                denom = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_add_(denom, group["eps"])
                torch._foreach_addcdiv_(pieces, exp_avgs, denom, [-x for x in lr])
                del denom
        return loss

    @staticmethod
    def slice_elements(device: torch.device) -> int:
        """Elements per slice: about 1 Mi on a CPU (the slice's few arrays stay in cache), 64 Mi on
        an accelerator (enough for few, large kernels; bounds the temporaries)."""
        return 1 << 20 if device.type == "cpu" else 1 << 26

    def _layout(self, params: List[torch.Tensor], work) -> Tuple[torch.Tensor, torch.Tensor]:
        """(owning tensor of each slice piece, elements per tensor) on the parameters' device,
        built on the CPU once per parameter set and copied once."""
        key = tuple(id(p) for p in params)
        cached = self._count_cache.get(key)
        if cached is None:
            device = params[0].device
            owners = [i for _, _, slices in work for s in slices for i in s[4]]
            cached = (torch.tensor(owners, dtype=torch.long).to(device),
                      torch.tensor([float(p.numel()) for p in params], dtype=torch.float64).to(device))
            self._count_cache = {key: cached}  # the set only changes if grads appear or vanish
        return cached

    @staticmethod
    def _next_step(group: dict, states: List[dict]) -> int:
        """Advance the group's step and give every state of it the new count (torch Adam's per-state
        ``step``, one CPU tensor shared by the group's states). The count is the larger of the
        group's and its states' (a loaded state may carry either: megatron's TE/Apex path keeps only
        the group's, and a fresh placeholder state may say 0); read with one CPU ``max``."""
        t = int(group.get("step", 0))
        steps = [s["step"] for s in states if "step" in s]
        if steps:
            t = max(t, int(torch.stack([x.reshape(()).float().cpu() for x in steps]).max()))
        t += 1
        step = torch.tensor(float(t), dtype=torch.float32)
        for s in states:
            s["step"] = step  # replaced, never in place: a loaded state may share one step tensor
        group["step"] = t  # mirrored where megatron looks for it with TE/Apex FusedAdam
        return t

    def _any_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")


def _slices(tensors: List[List[torch.Tensor]], budget: int, first: int):
    """Parallel lists (params, grads, exp_avg, exp_avg_sq) cut into slices of about ``budget``
    elements: ``(params, grads, exp_avgs, exp_avg_sqs, owners)`` per slice, a tensor larger than the
    budget as flat views of its blocks (contiguous tensors only), ``owners`` the index (from
    ``first``) of the tensor each piece belongs to."""
    cur: List[List[torch.Tensor]] = [[], [], [], []]
    owners: List[int] = []
    size = 0
    for i in range(len(tensors[0])):
        group = [t[i] for t in tensors]
        n = group[0].numel()
        splittable = n > budget and all(t.is_contiguous() for t in group)
        step = budget if splittable else max(n, 1)
        flats = [t.view(-1) for t in group] if splittable else group
        for start in range(0, max(n, 1), step):
            pieces = [f[start:start + step] for f in flats] if splittable else flats
            if size and size + pieces[0].numel() > budget:
                yield (*cur, owners)
                cur, owners, size = [[], [], [], []], [], 0
            for lst, piece in zip(cur, pieces):
                lst.append(piece)
            owners.append(first + i)
            size += pieces[0].numel()
    if owners:
        yield (*cur, owners)


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
        self._cached: Optional[Tuple[tuple, Tuple[torch.Tensor, torch.Tensor]]] = None
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
        slots, valid = self._layout(params, stats.device)
        vec = torch.zeros((self.slots, 2), dtype=torch.float64, device=stats.device)
        vec[:, 0].index_add_(0, slots, stats[:, 0])
        vec[:, 1].index_add_(0, slots, valid)
        if self.dp_group is not None and torch.distributed.get_world_size(self.dp_group) > 1:
            torch.distributed.all_reduce(vec, group=self.dp_group)
        if self.tp_size > 1:
            split = self.tp_split.to(vec.device).unsqueeze(1)
            summed = torch.where(split, vec, torch.zeros_like(vec))
            torch.distributed.all_reduce(summed, group=self.tp_group)
            vec = torch.where(split, summed, vec)
        return vec.index_select(0, slots)

    def _layout(self, params: Sequence[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(slot of each param, its real element count) on ``device``: built on the CPU once per
        parameter set, copied once."""
        key = tuple(id(p) for p in params)
        if self._cached is None or self._cached[0] != key:
            where = [self.where[id(p)] for p in params]
            slots = torch.tensor([w[0] for w in where], dtype=torch.long).to(device)
            valid = torch.tensor([float(w[1]) for w in where], dtype=torch.float64).to(device)
            self._cached = (key, (slots, valid))
        return self._cached[1]


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
