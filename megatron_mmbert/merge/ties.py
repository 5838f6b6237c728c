"""Model-merging math on tensors: TIES, task arithmetic, linear averaging and EMA.

Everything here works on one *chunk* at a time (a tensor or a block of its rows) and never needs
the whole model: :mod:`megatron_mmbert.merge.stream` feeds the chunks and keeps the memory bound.

TIES (Yadav et al., NeurIPS 2023, arXiv 2306.01708), for a base ``theta_0`` and models
``theta_t`` with weights ``w_t``:

0. task vectors   ``tau_t = theta_t - theta_0``
1. trim           keep the entries of ``tau_t`` whose magnitude is among the top ``density``
                  fraction, zero the rest (``tau^_t``). The fraction is taken per tensor
                  (mergekit) or over all merged tensors of the model at once (the paper's own code);
                  the threshold is computed by :class:`KthLargest`.
2. elect sign     ``gamma = sgn(sum_t w_t tau^_t)`` (the sign carrying the larger total mass; an
                  exact zero sum elects ``+``, as mergekit does).
3. disjoint mean  ``tau_m = sum_{t in A} w_t tau^_t / D`` over the agreeing *non-zero* entries
                  ``A = {t : sgn(tau^_t) == gamma}``; ``D = |A|`` (the paper's mean; with unit
                  weights this is exactly the published algorithm) or, with ``normalize``,
                  ``D = sum_{t in A} w_t`` (weighted mean; mergekit's ``ties`` with
                  ``normalize: true``). ``D = 0`` (no agreeing entry) is read as 1, giving 0.
4. scale, add     ``theta = theta_0 + lambda * tau_m``

Differences from the official code, on purpose (docs/merging.md): we keep exactly ``k =
max(1, floor(density * n))`` entries (the official ``topk_values_mask`` keeps ``floor(d*K) + 1``);
magnitudes tied at the threshold are all kept (as the official code does); a zero sign-sum elects
``+`` instead of a global majority sign.

Arithmetic is in float64 (``COMPUTE``) whatever the checkpoint dtype, and the result is cast back to
the base's dtype by the caller: then ``base + (model - base)`` gives back ``model`` bit for bit, so
a one-model, density-1, lambda-1 merge (or a merge of identical models) returns the model exactly,
which float32 arithmetic would not. Magnitudes for the trim are compared as float32 (see
:func:`magnitude`) so that the threshold search and the mask see the very same values.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from megatron_mmbert.config_base import ConfigError

COMPUTE = torch.float64
METHODS = ("ties", "task_arithmetic", "linear", "ema")
TRIM_MODES = ("per-tensor", "global")


@dataclass
class MergeSpec:
    """What to compute. Its own rules are :meth:`validate`; against the models merged,
    :meth:`check_models`."""

    method: str = "ties"
    """One of ``ties``, ``task_arithmetic``, ``linear``, ``ema``."""
    weights: Optional[List[float]] = None
    """One weight per model (``None``: all 1). For ``ema`` they are derived from ``ema_decay``."""
    density: float = 1.0
    """TIES: fraction of each task vector's entries kept by magnitude, in (0, 1]."""
    lam: float = 1.0
    """``lambda``: scale of the merged task vector added back to the base (ties, task_arithmetic)."""
    trim: str = "per-tensor"
    """TIES: ``per-tensor`` (top-``density`` of each tensor, like mergekit) or ``global`` (top of
    all merged entries of a model at once, like the paper's code)."""
    normalize: bool = False
    """TIES: divide by the agreeing weights' sum instead of their count. task_arithmetic: divide
    the weighted sum of task vectors by the sum of the weights."""
    ema_decay: Optional[float] = None
    """EMA: decay factor ``D`` in (0, 1); models are the checkpoints of one run, oldest first."""

    @property
    def needs_base(self) -> bool:
        """Whether the method adds task vectors to a base (ties, task_arithmetic)."""
        return self.method in ("ties", "task_arithmetic")

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the offending field."""
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r}: choose one of {', '.join(METHODS)}", field="method")
        # NaN fails every comparison below, so finiteness is checked first, by name.
        for name, value in (("lam", self.lam), ("density", self.density), ("ema_decay", self.ema_decay)):
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}", field=name)
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise ConfigError(f"weights must be finite numbers, got {self.weights}", field="weights")
        if self.method == "ema":
            if self.weights is not None:
                raise ConfigError("weights cannot be combined with method ema (the decay sets them)", field="weights")
            if self.ema_decay is None or not 0.0 < self.ema_decay < 1.0:
                raise ConfigError(f"method ema needs ema_decay in (0, 1), got {self.ema_decay}", field="ema_decay")
        elif self.ema_decay is not None:
            raise ConfigError("ema_decay only applies to method ema", field="ema_decay")
        if self.weights is not None:
            if self.method == "ties" and any(w <= 0 for w in self.weights):
                raise ConfigError(f"method ties needs positive weights, got {self.weights}", field="weights")
            if self.method == "linear" and sum(self.weights) == 0:
                raise ConfigError("method linear: the weights sum to 0", field="weights")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}", field="density")
        if self.method != "ties" and self.density != 1.0:
            raise ConfigError(f"density applies to method ties only (got method {self.method})", field="density")
        if self.trim not in TRIM_MODES:
            raise ConfigError(f"trim {self.trim!r}: choose one of {', '.join(TRIM_MODES)}", field="trim")
        if self.normalize and self.method not in ("ties", "task_arithmetic"):
            raise ConfigError(f"normalize applies to ties and task_arithmetic, not {self.method}", field="normalize")
        if self.lam != 1.0 and not self.needs_base:
            raise ConfigError(f"lam (lambda) applies to ties and task_arithmetic, not {self.method}", field="lam")

    def check_models(self, n_models: int, where: str = "") -> None:
        """The spec against the ``n_models`` models it merges (the merge entry points call it):
        at least one, and one weight per model. ``field`` names ``models``, or the spec's field
        under ``where`` (the spec's path in the config: ``spec``)."""
        if n_models < 1:
            raise ConfigError("models: give at least one model to merge", field="models")
        if self.weights is not None and len(self.weights) != n_models:
            name = f"{where}.weights" if where else "weights"
            raise ConfigError(f"{name} has {len(self.weights)} values for {n_models} models; give one per model",
                              field=name)

    def model_weights(self, n_models: int) -> List[float]:
        """The weight of each model, in order (EMA weights from the decay)."""
        if self.method == "ema":
            return ema_weights(n_models, self.ema_decay)
        return list(self.weights) if self.weights is not None else [1.0] * n_models

    @property
    def trims(self) -> bool:
        """Whether a trim threshold must be found (TIES with density < 1)."""
        return self.method == "ties" and self.density < 1.0


def ema_weights(n: int, decay: float) -> List[float]:
    """Weights of ``n`` checkpoints (oldest first) in ``e_1 = c_1; e_i = D e_{i-1} + (1-D) c_i``.

    Closed form: ``c_1`` gets ``D^(n-1)``, ``c_i`` (i >= 2) gets ``(1-D) D^(n-i)``; they sum to 1.
    """
    return [decay ** (n - 1)] + [(1.0 - decay) * decay ** (n - i) for i in range(2, n + 1)]


def keep_count(density: float, numel: int) -> int:
    """How many entries the trim keeps out of ``numel``: ``max(1, floor(density * numel))``."""
    if density >= 1.0:
        return numel
    return min(numel, max(1, int(density * numel)))


class KthLargest:
    """Exact k-th largest value of a stream of non-negative float32 chunks, in O(65536) memory.

    A non-negative float32's bit pattern, read as an int32, orders exactly like its value. Pass 1
    histograms the high 16 bits (sign + exponent + 7 mantissa bits) of every value; that locates
    the bucket holding the k-th largest. Pass 2 histograms the low 16 bits of the values inside
    that one bucket, which pins the exact bit pattern. So two passes over the data give the exact
    threshold with no sorting and a fixed 2 x 65536 counter memory, however large the model.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.count = 0
        self._hi = torch.zeros(65536, dtype=torch.int64)
        self._lo = torch.zeros(65536, dtype=torch.int64)
        self._bucket: Optional[int] = None
        self._rank_in_bucket = 0

    @staticmethod
    def _bits(values: torch.Tensor) -> torch.Tensor:
        if values.dtype != torch.float32:
            raise TypeError("KthLargest takes float32 magnitudes")
        return values.contiguous().view(-1).view(torch.int32)

    @staticmethod
    def _count_into(hist: torch.Tensor, buckets: torch.Tensor) -> None:
        # bincount allocates a fresh 65536-bucket result: cheaper to scatter for small chunks.
        if buckets.numel() >= 65536:
            hist += torch.bincount(buckets, minlength=65536)
        elif buckets.numel():
            hist.index_add_(0, buckets.long(), torch.ones(buckets.numel(), dtype=torch.int64))

    def add_first(self, values: torch.Tensor) -> None:
        """Pass 1: feed every chunk once."""
        bits = self._bits(values)
        self.count += bits.numel()
        self._count_into(self._hi, bits >> 16)

    def finish_first(self) -> None:
        if self.k > self.count:
            raise ValueError(f"k={self.k} exceeds the {self.count} values seen")
        above = torch.flip(torch.cumsum(torch.flip(self._hi, [0]), 0), [0])  # above[b] = #(hi >= b)
        self._bucket = int(torch.nonzero(above >= self.k).max())
        n_higher = int(above[self._bucket + 1]) if self._bucket < 65535 else 0
        self._rank_in_bucket = self.k - n_higher

    def add_second(self, values: torch.Tensor) -> None:
        """Pass 2: feed the same chunks again (any order)."""
        bits = self._bits(values)
        inside = bits[(bits >> 16) == self._bucket]
        self._count_into(self._lo, inside & 0xFFFF)

    def result(self) -> float:
        above = torch.flip(torch.cumsum(torch.flip(self._lo, [0]), 0), [0])
        low = int(torch.nonzero(above >= self._rank_in_bucket).max())
        bits = torch.tensor([(self._bucket << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32)[0])


@dataclass
class ChunkStats:
    """Running statistics of one tensor, summed over its chunks (see :func:`report_entry`)."""

    numel: int = 0
    kept: List[int] = field(default_factory=list)
    conflicts: int = 0
    tv_sq: List[float] = field(default_factory=list)
    trimmed_sq: List[float] = field(default_factory=list)
    merged_sq: float = 0.0

    def ensure(self, n: int) -> None:
        if not self.kept:
            self.kept = [0] * n
            self.tv_sq = [0.0] * n
            self.trimmed_sq = [0.0] * n


def task_vector(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """``model - base`` in ``COMPUTE`` precision (a new tensor; the inputs are not modified)."""
    return model.to(COMPUTE) - base.to(COMPUTE)


def magnitude(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """``|model - base|`` as float32: what the trim ranks (:class:`KthLargest` works on float32 bits).

    The threshold passes and the merge's mask both call this one function on the same inputs, so
    they rank identical values. For inputs of float32 or narrower it subtracts in float32 (the
    correctly rounded difference, and half the cost of going through float64).
    """
    if base.dtype == torch.float64 or model.dtype == torch.float64:
        return (model.to(COMPUTE) - base.to(COMPUTE)).abs_().to(torch.float32)
    return (model.to(torch.float32) - base.to(torch.float32)).abs_()


def ties_chunk(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    thresholds: Optional[Sequence[float]],
    lam: float,
    normalize: bool,
    stats: Optional[ChunkStats] = None,
) -> torch.Tensor:
    """TIES on one chunk; ``thresholds[t]`` is model t's trim magnitude (``None``: no trim).

    Returns the merged chunk in ``COMPUTE`` precision.
    """
    base_c = base.to(COMPUTE)
    trimmed: List[torch.Tensor] = []
    for t, model in enumerate(models):
        tau = task_vector(base_c, model)
        if stats is not None:
            stats.ensure(len(models))
            stats.tv_sq[t] += float(torch.dot(tau.view(-1), tau.view(-1)))
        if thresholds is not None:
            keep = magnitude(base, model) >= thresholds[t]
            tau.mul_(keep)
            if stats is not None:
                stats.kept[t] += int(keep.sum())
        elif stats is not None:
            stats.kept[t] += tau.numel()
        if stats is not None:
            stats.trimmed_sq[t] += float(torch.dot(tau.view(-1), tau.view(-1)))
        trimmed.append(tau)

    # Elect: sign of the total weighted mass; an exact 0 sum elects +.
    mass = torch.zeros_like(base_c)
    for w, tau in zip(weights, trimmed):
        mass.add_(tau, alpha=w)
    positive = mass >= 0
    del mass

    # Disjoint mean over agreeing, non-zero entries (zeros have no sign, so never agree).
    numer = torch.zeros_like(base_c)
    denom = torch.zeros_like(base_c)
    any_pos = torch.zeros_like(positive) if stats is not None else None
    any_neg = torch.zeros_like(positive) if stats is not None else None
    for w, tau in zip(weights, trimmed):
        agree = torch.where(positive, tau > 0, tau < 0)
        numer.add_(tau * agree, alpha=w)
        denom.add_(agree.to(COMPUTE), alpha=w if normalize else 1.0)
        if stats is not None:
            any_pos |= tau > 0
            any_neg |= tau < 0
    denom.masked_fill_(denom == 0, 1.0)
    merged = numer.div_(denom)
    if stats is not None:
        stats.conflicts += int((any_pos & any_neg).sum())
        stats.merged_sq += float(torch.dot(merged.view(-1), merged.view(-1))) * lam * lam
        stats.numel += merged.numel()
    # In place into ``merged``: ``base_c`` is the caller's own tensor when the base is float64.
    return merged.mul_(lam).add_(base_c)


def task_arithmetic_chunk(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    lam: float,
    normalize: bool,
    stats: Optional[ChunkStats] = None,
) -> torch.Tensor:
    """``base + lambda * sum_t w_t tau_t`` (divided by ``sum_t w_t`` with ``normalize``)."""
    base_c = base.to(COMPUTE)
    total = torch.zeros_like(base_c)
    for t, (w, model) in enumerate(zip(weights, models)):
        tau = task_vector(base_c, model)
        if stats is not None:
            stats.ensure(len(models))
            sq = float(torch.dot(tau.view(-1), tau.view(-1)))
            stats.tv_sq[t] += sq
            stats.trimmed_sq[t] += sq
            stats.kept[t] += tau.numel()
        total.add_(tau, alpha=w)
    if normalize:
        total.div_(sum(weights))
    if stats is not None:
        stats.merged_sq += float(torch.dot(total.view(-1), total.view(-1))) * lam * lam
        stats.numel += total.numel()
    return total.mul_(lam).add_(base_c)


def linear_chunk(
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    stats: Optional[ChunkStats] = None,
) -> torch.Tensor:
    """Weighted mean ``sum_t w_t theta_t / sum_t w_t`` (EMA passes its decay weights here)."""
    total = torch.zeros(models[0].shape, dtype=COMPUTE)
    for w, model in zip(weights, models):
        total.add_(model.to(COMPUTE), alpha=w)
    total.div_(sum(weights))
    if stats is not None:
        # Here the "task vector" of a model is its distance from the average.
        stats.ensure(len(models))
        for t, model in enumerate(models):
            d = model.to(COMPUTE) - total
            sq = float(torch.dot(d.view(-1), d.view(-1)))
            stats.tv_sq[t] += sq
            stats.trimmed_sq[t] += sq
            stats.kept[t] += d.numel()
        stats.numel += total.numel()
    return total


def merge_chunk(
    spec: MergeSpec,
    base: Optional[torch.Tensor],
    models: Sequence[torch.Tensor],
    thresholds: Optional[Sequence[float]] = None,
    stats: Optional[ChunkStats] = None,
) -> torch.Tensor:
    """Dispatch one chunk to the method in ``spec`` (``COMPUTE``-precision result)."""
    weights = spec.model_weights(len(models))
    if spec.method == "ties":
        return ties_chunk(base, models, weights, thresholds, spec.lam, spec.normalize, stats)
    if spec.method == "task_arithmetic":
        return task_arithmetic_chunk(base, models, weights, spec.lam, spec.normalize, stats)
    return linear_chunk(models, weights, stats)


def report_entry(stats: ChunkStats, thresholds: Optional[Sequence[float]]) -> Dict[str, object]:
    """The per-tensor JSON record: fraction kept, sign-conflict rate, task-vector norms."""
    n = max(stats.numel, 1)
    entry: Dict[str, object] = {
        "numel": stats.numel,
        "fraction_kept": [k / n for k in stats.kept],
        "sign_conflict_rate": stats.conflicts / n,
        "task_vector_norm": [s ** 0.5 for s in stats.tv_sq],
        "trimmed_norm": [s ** 0.5 for s in stats.trimmed_sq],
        "merged_update_norm": stats.merged_sq ** 0.5,
    }
    if thresholds is not None:
        entry["threshold"] = list(thresholds)
    return entry
