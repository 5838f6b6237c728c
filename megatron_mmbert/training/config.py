"""The run configuration of ``pretrain_mmbert.py``: one YAML file, ``--section.key value`` overrides.

A run YAML has the sections below (every field has a docstring; ``pretrain_mmbert.py --help-config``
prints them). Loading goes YAML -> (optional ``inherit:`` base file, deep-merged) -> command-line
overrides -> typed dataclasses (unknown keys and wrong types refused by ``config_base``). This
module is the schema, each section's own rules (its ``validate()``, called as the section is built
by ``config_base.from_dict``) and the loading. The start-up checks across sections and against the
world size and the disk (layout, precision, phase budgets against LR segments and batches, the
manifest and shards) are :func:`megatron_mmbert.training.preflight.validate`. Each failure is one
``ConfigError`` naming the key, the values and the fix.

Units. Token budgets count packed row capacity (steps x rows x seq_len), as ``PhaseConfig.tokens``
does. Batch sizes count rows of the phase's ``seq_len``.

One subject, the run config's schema and its loading, hence the length (the schema's docstrings).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from megatron_mmbert.config import (
    ModelConfig,
    ParallelConfig,
    PhaseConfig,
    load_model_config,
)
from megatron_mmbert.config_base import ConfigError, apply_overrides, from_dict, safe_load_yaml, to_dict


@dataclass
class DataSection:
    """Where the training data is and how the sample stream is built."""

    manifest: str = ""
    """``manifest.json`` written by ``tools/preprocess_data.py`` (or the folder holding it)."""
    cache_dir: Optional[str] = None
    """Folder for the blended/packed index arrays, shared by all ranks (None: ``{run_dir}/index-cache``).
    Prebuild it with ``tools/build_data_index.py`` for big schedules."""
    seed: Optional[int] = None
    """Data seed (shuffles and masks); None: the run's ``seed``."""
    anneal_segments: int = 64
    """Piecewise-constant segments of a temperature-annealed phase."""
    mask_special_tokens: bool = False
    """Let <bos>/<eos> be selected for masking (mmBERT's code did: its masking skips only padding;
    HF's collator does not). The shipped mmBERT configs set it."""
    packing: Literal["concat", "best_fit"] = "concat"
    """How documents become rows (docs/data.md "Packing"). ``concat``: each language's token stream
    cut every ``seq_len`` tokens (Megatron-style; segments may start mid-document, no padding).
    ``best_fit``: mmBERT's packing (ModernBERT's ``GreedyBestFitSequencePacker``): pieces framed
    ``<bos> ... <eos>`` of at most ``seq_len`` tokens best-fit packed whole into packed rows
    (``packed_row``), padding (excluded from the loss) where none fits. Part of the index cache key;
    a branch must keep its parent's mode."""
    packed_row: Literal["micro_batch", "seq_len"] = "micro_batch"
    """best_fit's packed row (docs/data.md "Packing"). ``micro_batch``: ``micro_batch_size x seq_len``
    tokens, the reference's geometry (padding under 0.1%): a micro-batch is one packed row and a piece may
    run on from one ``seq_len`` row into the next, one ``cu_seqlens`` segment over the flattened
    micro-batch; the SDPA kernel then attends over the whole micro-batch (its mask is quadratic in
    ``micro_batch_size x seq_len``). ``seq_len``: rows of ``seq_len`` tokens, pieces never cross rows
    (padding a few %), for SDPA at scale. The micro-batch size becomes part of the data: changing it
    (or this) changes the rows. Ignored by concat."""
    language_list: str = "mmbert-1833"
    """At start-up, report which languages of this list the manifest lacks and which keys it has beyond
    it (``data/languages.py``): ``mmbert-1833`` (mmBERT's released 1,833), a file of codes, or ``none``."""
    without_sources: List[str] = field(default_factory=list)
    """Named sources (``dclm``, ``starcoder``, ...: ``data/mixture.py``) to train without, on purpose:
    their ``fixed_shares`` are removed from every phase and the other languages share that mass by
    temperature. Without this, a run whose manifest lacks a source a phase names stops at start-up."""
    index_timeout_s: float = 3600.0
    """How long non-building ranks wait for the index cache before giving up."""
    eval_manifest: Optional[str] = None
    """Held-out data (a manifest of the same tokenizer) for the evaluation during training. None: the
    held-out manifest preprocessing wrote beside the training one (``heldout/manifest.json``,
    ``--holdout_docs``) when there is one, else rows of the training manifest (not held out; logged
    as such)."""

    def validate(self) -> None:
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2^32), got {self.seed}", field="seed")
        if self.anneal_segments < 1:
            raise ConfigError(f"anneal_segments must be >= 1, got {self.anneal_segments}", field="anneal_segments")
        if not (math.isfinite(self.index_timeout_s) and self.index_timeout_s > 0):
            raise ConfigError(f"index_timeout_s must be a positive number of seconds, got {self.index_timeout_s}",
                              field="index_timeout_s")


@dataclass
class OptimizerSection:
    """The optimizer inside megatron-core's wrappers (fp32 master weights under bf16, optionally
    sharded by the distributed optimizer)."""

    name: Literal["adamw", "stable_adamw"] = "adamw"
    """``stable_adamw``: mmBERT's optimizer (optimi's StableAdamW: per-tensor update clipping
    ``lr / max(1, RMS(g / sqrt(v)))``, bias correction folded into the betas; use with
    ``clip_grad: 0``). ``adamw``: megatron-core's Adam in AdamW mode."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2 (mmBERT 0.95; ModernBERT 0.98)."""
    adam_eps: float = 1e-8
    """Adam epsilon (mmBERT 1e-8)."""
    decoupled_weight_decay: float = 8e-5
    """Fraction of each weight removed per step at the phase's peak LR (the optimi/mmBERT
    "fully decoupled" convention, 8e-5). Megatron's AdamW applies ``p -= lr * wd * p``, so it gets
    ``wd = decoupled_weight_decay / peak_lr`` (0.1 at 8e-4) and the decay follows the LR schedule.
    Norms and biases are never decayed. A phase's LR segment may override it."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0: off). mmBERT used none: StableAdamW clips each tensor's update."""
    use_distributed_optimizer: Optional[bool] = None
    """Shard optimizer state over data-parallel ranks (ZeRO-1); None: ``parallel.use_distributed_optimizer``."""

    def validate(self) -> None:
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:  # NaN fails too
                raise ConfigError(f"optimizer.{name} must be in [0, 1), got {value}", field=name)
        if not (self.adam_eps > 0 and math.isfinite(self.adam_eps)):
            raise ConfigError(f"optimizer.adam_eps must be a positive finite number, got {self.adam_eps}",
                              field="adam_eps")
        for name in ("clip_grad", "decoupled_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optimizer.{name} must be a finite number >= 0, got {value}", field=name)


@dataclass
class LRSegment:
    """The learning-rate schedule of one phase, counted in the phase's tokens (warmup-stable-decay)."""

    lr: float = 8e-4
    """Peak (stable) learning rate of the phase."""
    warmup_tokens: int = 0
    """Linear warmup from 0 over the phase's first tokens (mmBERT base: 3B in pre-training)."""
    decay_tokens: int = 0
    """Decay over the phase's last tokens (0: constant after warmup)."""
    decay_style: Literal["1-sqrt", "linear"] = "1-sqrt"
    """Decay shape: ``1-sqrt`` (lr = lr_f + (lr - lr_f)(1 - sqrt(frac)), mmBERT base) or ``linear``."""
    final_lr_ratio: float = 0.02
    """LR at the end of the decay, as a fraction of ``lr`` (mmBERT: 0.02)."""
    decoupled_weight_decay: Optional[float] = None
    """Override of ``optimizer.decoupled_weight_decay`` in this phase (mmBERT-small ext/decay: 4e-5)."""

    def validate(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):  # NaN and inf compare false: test the good case
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}", field="lr")
        if self.warmup_tokens < 0 or self.decay_tokens < 0:
            raise ConfigError("warmup_tokens and decay_tokens must be >= 0",
                              field="warmup_tokens" if self.warmup_tokens < 0 else "decay_tokens")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ConfigError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}", field="final_lr_ratio")
        wd = self.decoupled_weight_decay
        if wd is not None and not (math.isfinite(wd) and wd >= 0):
            raise ConfigError(f"decoupled_weight_decay: weight decay must be a finite number >= 0, got {wd}",
                              field="decoupled_weight_decay")


@dataclass
class ScheduleSection:
    """Per-phase LR segments."""

    phases: Dict[str, LRSegment] = field(default_factory=dict)
    """LR segment per phase name; every phase of the run needs one."""
    total_tokens: Optional[int] = None
    """If set, the phases' token budgets must add up to exactly this (guards edits of one phase)."""

    def validate(self) -> None:
        if self.total_tokens is not None and self.total_tokens < 1:
            raise ConfigError(f"total_tokens must be positive (or null), got {self.total_tokens}", field="total_tokens")


@dataclass
class BatchSection:
    """Rows per optimizer step and per forward pass, and the batch-size warmup."""

    global_batch_size: int = 4608
    """Rows per optimizer step (a phase's ``global_batch_size`` overrides it)."""
    micro_batch_size: int = 48
    """Rows per forward/backward pass on one data-parallel rank."""
    micro_batch_size_per_phase: Dict[str, int] = field(default_factory=dict)
    """Micro-batch rows by phase name (mmBERT: 48 x 1024 in pre-training, 6 x 8192 later)."""
    rampup_start_rows: Optional[int] = None
    """Batch-size warmup: rows per step at the start of ``rampup_phase`` (None: no warmup)."""
    rampup_increment_rows: Optional[int] = None
    """Batch-size warmup: rows added at each increment (None: ``rampup_start_rows``)."""
    rampup_tokens: int = 0
    """Batch-size warmup: tokens of ``rampup_phase`` over which the rows rise to the full batch, every
    size for the same number of steps (mmBERT's scheduler; ``batch_plan.rampup_token_thresholds``)."""
    rampup_phase: Optional[str] = None
    """Phase whose start is ramped (None: the first phase)."""

    def validate(self) -> None:
        for name in ("global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        bad = {k: v for k, v in self.micro_batch_size_per_phase.items() if v < 1}
        if bad:
            raise ConfigError(f"micro_batch_size_per_phase: rows must be >= 1, got {bad}",
                              field="micro_batch_size_per_phase")
        for name in ("rampup_start_rows", "rampup_increment_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or null), got {value}", field=name)
        if self.rampup_tokens < 0:
            raise ConfigError(f"rampup_tokens must be >= 0, got {self.rampup_tokens}", field="rampup_tokens")


@dataclass
class CheckpointSection:
    """Saving and resuming (megatron-core dist_checkpointing)."""

    dir: Optional[str] = None
    """Checkpoint folder (None: ``{run_dir}/checkpoints``). Holds ``iter_NNNNNNN/``,
    ``phase_end_{name}/`` and the ``latest`` pointer."""
    every_steps: int = 1000
    """Save every this many optimizer steps (0: off)."""
    every_tokens: int = 0
    """Save whenever the run's tokens (row capacity, all phases) pass a multiple of this (0: off).
    mmBERT saved every 10B tokens; a step interval would be 8x longer at 8192 than at 1024 rows.
    With both intervals 0, checkpoints are written only at phase ends and on exit."""
    keep_last: int = 3
    """Periodic checkpoints kept (older ones deleted once a newer one is complete)."""
    keep_phase_ends: bool = True
    """Keep the checkpoint at the end of every phase forever (decay variants branch from them)."""
    exit_after_minutes: Optional[float] = None
    """Save and exit cleanly once the run has been going this long (Slurm time limits). None inside
    a Slurm job with a time limit (``SLURM_JOB_END_TIME``): the time left minus
    ``job_end_margin_minutes``, derived when the config is loaded (:mod:`megatron_mmbert.slurm`)."""
    job_end_margin_minutes: float = 10.0
    """Inside a Slurm job: stop this long before its time limit (the last step and the save must fit)."""
    save_on_signal: bool = True
    """On SIGTERM/SIGUSR1 (Slurm preemption, ``--signal``): save at the end of the step and exit 0."""
    async_save: bool = False
    """Write checkpoints in the background, as Megatron-LM's ``--async-save`` (megatron-core's
    asynchronous ``dist_checkpointing.save``, https://docs.nvidia.com/megatron-core/developer-guide/latest/
    apidocs/core/core.dist_checkpointing.strategies.async_utils.html): the step waits only while the
    state is copied to host memory, a thread of the trainer writes the files while training goes on,
    and the checkpoint is published (renamed into place, ``latest``) at the first step boundary after
    every rank finished. Waited for before the next save, at a phase end, on a stop signal or time
    limit and at the end of the run. Needs host memory for one copy of this rank's checkpoint shard.
    docs/training.md "Asynchronous checkpoint saves"."""
    resume: bool = True
    """Resume from ``latest`` when the checkpoint folder has one."""
    verify_on_load: bool = True
    """Check every file of the checkpoint resumed from (or ``init.checkpoint``) against the sizes
    and SHA-256 recorded at save time before loading it (False: skip, for huge checkpoints)."""
    allow_other_tokenizer: bool = False
    """Load a checkpoint (resumed from, or ``init.checkpoint``) whose recorded tokenizer is not
    ``data.manifest``'s. Off: such a start stops naming both tokenizers (ids of two tokenizers of one
    vocabulary size fit the same embedding but mean different things). On purpose only, e.g. a
    vocabulary transplant."""

    def validate(self) -> None:
        if self.every_steps < 0 or self.every_tokens < 0 or self.keep_last < 1:
            raise ConfigError(
                f"checkpoint.every_steps and every_tokens must be >= 0 and keep_last >= 1, got "
                f"{self.every_steps}, {self.every_tokens}, {self.keep_last}",
                field="every_steps" if self.every_steps < 0 else "every_tokens" if self.every_tokens < 0 else "keep_last",
            )
        if not (math.isfinite(self.job_end_margin_minutes) and self.job_end_margin_minutes >= 0):
            raise ConfigError(
                f"checkpoint.job_end_margin_minutes must be a finite number >= 0 (minutes before the Slurm "
                f"time limit at which the run saves and stops), got {self.job_end_margin_minutes}",
                field="job_end_margin_minutes",
            )
        m = self.exit_after_minutes
        if m is not None and not (math.isfinite(m) and m >= 0):
            raise ConfigError(
                f"checkpoint.exit_after_minutes must be a finite number >= 0 or null (no time limit), got {m}",
                field="exit_after_minutes",
            )


@dataclass
class InitSection:
    """Starting a run from another run's checkpoint (decay variants, continued pre-training)."""

    checkpoint: Optional[str] = None
    """Checkpoint to start from (ignored when this run's own checkpoint folder has a ``latest``)."""
    load_optimizer: bool = True
    """Also load the optimizer state of ``checkpoint`` (when it has one)."""
    start_phase: Optional[str] = None
    """Phase to start at (None: the first phase); earlier phases are skipped. Their data is not:
    every language's stream starts where the full schedule would be at this phase, so a branch that
    keeps its parent's phase list reads exactly what the parent would have read. When
    ``checkpoint`` records its data position, the run refuses to start unless they agree."""
    restart_data: bool = False
    """Start the data streams from this run's own plan even where it does not continue
    ``checkpoint``'s (e.g. continued pre-training on new data). Off: such a run is refused."""
    strided_from: Optional[str] = None
    """A larger model's checkpoint (e.g. mmBERT-base's) to take this run's model from by strided
    sampling of its weights (mmBERT-small's init; the rule, this project's own, is in
    ``convert/strided.py`` and docs/training.md). Weights only: the optimizer and the data start
    fresh. Written once to ``{run_dir}/strided_init``; not with ``checkpoint``."""

    def validate(self) -> None:
        if self.strided_from is not None and self.checkpoint is not None:
            raise ConfigError("init.strided_from and init.checkpoint both set: give one (strided_from takes a "
                              "larger model's weights; checkpoint continues a run)", field="strided_from")


@dataclass
class WandbSection:
    """Weights & Biases (optional, ``pip install megatron-mmbert[wandb]``): rank 0 logs the scalars
    TensorBoard gets and the resolved config. The run id is kept in ``{run_dir}/wandb_run_id``, so a
    resumed run continues the same W&B run."""

    project: Optional[str] = None
    """W&B project; None: W&B off."""
    entity: Optional[str] = None
    """W&B user or team (None: the account's default)."""
    name: Optional[str] = None
    """Display name of the run (None: the run folder's name)."""
    tags: List[str] = field(default_factory=list)
    """Tags of the run."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """``online``; ``offline`` (files under ``{run_dir}/wandb``, upload later with ``wandb sync``);
    ``disabled`` (no W&B at all)."""

    @property
    def enabled(self) -> bool:
        return bool(self.project) and self.mode != "disabled"


@dataclass
class LoggingSection:
    """Console line, metrics file, TensorBoard, W&B and the evaluation during training."""

    interval: int = 10
    """Log every this many steps (and at phase ends)."""
    tensorboard: bool = True
    """Write TensorBoard events to ``tensorboard_dir``."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard folder (None: ``{run_dir}/tensorboard``)."""
    wandb: WandbSection = field(default_factory=WandbSection)
    """Weights & Biases (off unless ``wandb.project`` is set)."""
    eval_interval: int = 0
    """Evaluate every this many steps (0: only at phase ends). The evaluation manifest is
    ``data.eval_manifest``, else the held-out one beside the training manifest, else the training
    manifest itself (not held out; logged as such)."""
    eval_rows_per_language: int = 4
    """Rows evaluated per language (fewer where the evaluation manifest holds fewer)."""
    eval_languages_per_group: int = 20
    """Languages evaluated per resource group: the phase's languages in high/mid/low terciles by
    training-manifest tokens, each cut to this many -- the largest of high, the middle of mid, the
    smallest of low (20: the 20 largest and the 20 smallest languages, and 20 around the median).
    0: every language of the phase."""
    eval_seq_len: Optional[int] = None
    """Row length of the evaluation rows (None: the current phase's ``seq_len``)."""
    eval_mask_rate: Optional[float] = None
    """Mask rate of the evaluation rows (None: the current phase's ``mask_rate``, its starting rate
    when it has ``mask_rate_end``, so the evaluations within a phase compare)."""

    def validate(self) -> None:
        if self.interval < 1 or self.eval_interval < 0:
            raise ConfigError("logging.interval must be >= 1 and logging.eval_interval >= 0",
                              field="interval" if self.interval < 1 else "eval_interval")
        if self.eval_rows_per_language < 1 or self.eval_languages_per_group < 0:
            raise ConfigError(
                "logging.eval_rows_per_language must be >= 1 and logging.eval_languages_per_group >= 0 "
                f"(0: all), got {self.eval_rows_per_language}, {self.eval_languages_per_group}",
                field="eval_rows_per_language" if self.eval_rows_per_language < 1 else "eval_languages_per_group")
        if self.eval_seq_len is not None and self.eval_seq_len < 2:
            raise ConfigError(f"logging.eval_seq_len must be >= 2 or null (the phase's), got {self.eval_seq_len}",
                              field="eval_seq_len")
        if self.eval_mask_rate is not None and not 0.0 < self.eval_mask_rate < 1.0:
            raise ConfigError(f"logging.eval_mask_rate must be in (0, 1) or null (the phase's), got "
                              f"{self.eval_mask_rate}", field="eval_mask_rate")


@dataclass
class TrainSection:
    """What to do when things go wrong."""

    nan_policy: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: ``stop`` (exit with an error naming the step) or ``skip``
    (drop the update, keep the weights, go on). The optimizer never steps on non-finite gradients."""
    max_consecutive_skips: int = 10
    """With ``skip``: stop after this many non-finite steps in a row."""

    def validate(self) -> None:
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}",
                              field="max_consecutive_skips")


@dataclass
class ProfilingSection:
    """The PyTorch profiler for chosen steps and a CUDA memory snapshot, written under
    ``{run_dir}/profile/`` (``training/profiling.py``; docs/training.md "Profiling")."""

    steps: List[int] = field(default_factory=list)
    """Optimizer steps (1-based, as the log counts them) traced with ``torch.profiler`` (CPU and CUDA
    activities, shapes, memory): one Chrome/Perfetto trace per step and rank,
    ``profile/step_{N}-rank{R}.json``."""
    memory_snapshot: bool = False
    """CUDA only: record the allocator's history from the first of ``steps`` (the run's first step if
    none) and dump it after the last, ``profile/memory_snapshot-rank{R}.pickle``, for
    https://pytorch.org/memory_viz. Ignored, with a log line, without a GPU."""

    def validate(self) -> None:
        if any(step < 1 for step in self.steps):
            raise ConfigError(f"steps are 1-based optimizer steps (>= 1), got {self.steps}", field="steps")


@dataclass
class DebugSection:
    """Fault injection for the resilience tests (real signals and real non-finite gradients)."""

    sigkill_at_step: Optional[int] = None
    """SIGKILL this process right after optimizer step N (before any save of that step)."""
    sigkill_during_save_at_step: Optional[int] = None
    """SIGKILL this process while the checkpoint of step N is being written (files on disk, not published)."""
    nan_grad_at_steps: List[int] = field(default_factory=list)
    """Put a NaN into a gradient at these steps (after backward, before the optimizer)."""


@dataclass
class RunConfig:
    """One training run: model, layout, data and phases, optimizer, schedule, checkpoints, logs."""

    run_dir: str
    """Output folder: resolved config, checkpoints, TensorBoard, ``metrics.jsonl``."""
    model: ModelConfig
    """The model: a preset name or ``{preset: NAME, <ModelConfig field>: value}``."""
    phases: List[PhaseConfig]
    """The phases, in order (pretrain -> mid -> decay). A file that ``inherit``s another may give a
    mapping by phase name instead, which edits those inherited phases (decay variants do)."""
    language_sets: Dict[str, List[str]] = field(default_factory=dict)
    """Named language lists; a phase's ``languages: NAME`` means ``language_sets.NAME``, so one
    definition serves every phase and every config that inherits it (mmBERT's mid-training 110)."""
    seed: int = 21
    """Seed of the model init, dropout (re-seeded from (seed, step) each step) and, by default, the data."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline/context parallel sizes, sequence parallelism, distributed optimizer."""
    precision: Literal["fp32", "bf16", "amp_bf16", "fp8"] = "bf16"
    """fp32; bf16 (megatron's ``Float16Module``: bf16 parameters and residual stream, fp32 master
    weights in the optimizer); amp_bf16 (mmBERT's Composer ``amp_bf16``: fp32 parameters, the forward
    under ``torch.autocast(bfloat16)``, so GEMMs and attention run in bf16 and the residual stream
    stays fp32); fp8 (bf16 + TransformerEngine FP8 GEMMs; needs TE)."""
    data: DataSection = field(default_factory=DataSection)
    """Manifest, index cache and data seed."""
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    """Adam hyper-parameters, weight decay, clipping."""
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """LR segment per phase."""
    batch: BatchSection = field(default_factory=BatchSection)
    """Global and micro batch rows, batch-size warmup."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Save interval, retention, time limit, resume."""
    init: InitSection = field(default_factory=InitSection)
    """Start from another checkpoint / at a named phase."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Log interval, TensorBoard, evaluation."""
    train: TrainSection = field(default_factory=TrainSection)
    """NaN handling."""
    profiling: ProfilingSection = field(default_factory=ProfilingSection)
    """Profiler traces and a CUDA memory snapshot of chosen steps."""
    debug: DebugSection = field(default_factory=DebugSection)
    """Fault injection (tests)."""

    def validate(self) -> None:
        """The run's own fields; its sections validate themselves (``config_base.check``), and the
        rules across sections, the world size and the disk are ``training/preflight.py``'s."""
        if not self.run_dir:
            raise ConfigError("run_dir must be set (output folder of the run)", field="run_dir")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2^32), got {self.seed}", field="seed")
        if not self.phases:
            raise ConfigError("phases: the run needs at least one phase", field="phases")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"phases: names must be unique, got {names}", field="phases")
        for name, langs in self.language_sets.items():
            if name == "all" or name.startswith("top:"):
                raise ConfigError(f"language_sets.{name}: 'all' and 'top:N' are reserved; choose another name",
                                  field=f"language_sets.{name}")
            if len(set(langs)) != len(langs):
                raise ConfigError(f"language_sets.{name} lists a language twice", field=f"language_sets.{name}")

    # -- derived ------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    @property
    def tensorboard_dir(self) -> str:
        return self.logging.tensorboard_dir or os.path.join(self.run_dir, "tensorboard")

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    @property
    def index_cache_dir(self) -> str:
        return self.data.cache_dir or os.path.join(self.run_dir, "index-cache")

    @property
    def manifest_path(self) -> str:
        path = self.data.manifest
        return os.path.join(path, "manifest.json") if os.path.isdir(path) else path

    @property
    def start_phase_index(self) -> int:
        """Index of the phase this run starts at (``init.start_phase``; 0 without)."""
        names = [p.name for p in self.phases]
        return names.index(self.init.start_phase) if self.init.start_phase in names else 0

    def phase(self, name: str) -> PhaseConfig:
        for p in self.phases:
            if p.name == name:
                return p
        raise ConfigError(f"unknown phase {name!r}; phases are {[p.name for p in self.phases]}")

    def phase_global_batch(self, phase: PhaseConfig) -> int:
        return phase.global_batch_size or self.batch.global_batch_size

    def phase_micro_batch(self, phase: PhaseConfig) -> int:
        return self.batch.micro_batch_size_per_phase.get(phase.name, self.batch.micro_batch_size)

    def packing_bin_rows(self) -> Optional[List[int]]:
        """``seq_len`` rows per best_fit packed row, one per phase (the index's ``bin_rows``): the
        phases' micro-batch sizes under ``data.packed_row: micro_batch``, else None (one row)."""
        if self.data.packing != "best_fit" or self.data.packed_row != "micro_batch":
            return None
        return [self.phase_micro_batch(p) for p in self.phases]

    def index_config(self):
        """This run's data index as ``mmbert-build-index`` builds it ahead (a
        ``data.index.prebuild.BuildIndexConfig``): every value that keys the index cache is the run's."""
        from megatron_mmbert.data.index.prebuild import BuildIndexConfig

        return BuildIndexConfig(
            phases=list(self.phases), manifest=self.manifest_path, cache_dir=self.index_cache_dir, seed=self.data_seed,
            global_batch_size=self.batch.global_batch_size, anneal_segments=self.data.anneal_segments,
            start_phase=self.init.start_phase, packing=self.data.packing, bin_rows=self.packing_bin_rows(),
            language_list=self.data.language_list)

    def model_for_phase(self, phase: PhaseConfig) -> ModelConfig:
        """The model config with the phase's RoPE thetas (what a checkpoint of this phase records)."""
        return dataclasses.replace(
            self.model,
            global_rope_theta=phase.global_rope_theta or self.model.global_rope_theta,
            local_rope_theta=phase.local_rope_theta or self.model.local_rope_theta,
        )

    @property
    def effective_model(self) -> ModelConfig:
        """The model with ``fp8`` set when ``precision: fp8``."""
        if self.precision == "fp8" and self.model.fp8 is None:
            return dataclasses.replace(self.model, fp8="hybrid")
        return self.model

    @property
    def compute_precision(self) -> str:
        """The model's precision mode outside FP8 GEMMs: fp32, bf16 or amp_bf16 (``model.build``)."""
        return self.precision if self.precision in ("fp32", "amp_bf16") else "bf16"

    @property
    def use_distributed_optimizer(self) -> bool:
        v = self.optimizer.use_distributed_optimizer
        return self.parallel.use_distributed_optimizer if v is None else v


# -- loading -----------------------------------------------------------------------------------

def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, everything else (lists too) is replaced,
    except that a mapping over a list of named entries (``phases``) edits those entries by name:
    ``phases: {decay: {fixed_shares: ...}}`` changes the inherited ``decay`` phase and keeps the rest
    of the schedule (and so the data position of every phase) as the base file declares it.
    ``fixed_shares`` is one mixture and is replaced whole (a decay branch names its own sources)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "fixed_shares":
            out[key] = _deep_merge(out[key], value)
        elif isinstance(value, dict) and _is_named_list(out.get(key)):
            names = [item["name"] for item in out[key]]
            unknown = [n for n in value if n not in names]
            if unknown:
                raise ConfigError(f"{key}: {unknown} are not among the inherited {key} {names}")
            for name, edit in value.items():
                if not isinstance(edit, dict):
                    raise ConfigError(f"{key}.{name}: expected a mapping of fields to change, got {edit!r}")
                i = names.index(name)
                out[key][i] = _deep_merge(out[key][i], edit)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "name" in v for v in value)


SHIPPED_CONFIGS_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
"""Where an installed package keeps the shipped configs (``setup.py`` copies examples/configs/*.yaml)."""
SHIPPED_CONFIGS_SOURCE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "configs")
"""The same files in a source checkout or an editable install."""


def shipped_configs() -> Dict[str, str]:
    """Shipped config name -> file: ``examples/configs/mmbert_base.yaml`` is ``mmbert-base`` (the
    file name without ``.yaml``, ``_`` written ``-``; the underscore form is accepted too)."""
    folder = SHIPPED_CONFIGS_PACKAGE_DIR if os.path.isdir(SHIPPED_CONFIGS_PACKAGE_DIR) else SHIPPED_CONFIGS_SOURCE_DIR
    if not os.path.isdir(folder):
        return {}
    return {f[: -len(".yaml")].replace("_", "-"): os.path.join(folder, f)
            for f in sorted(os.listdir(folder)) if f.endswith(".yaml")}


def config_path(path_or_name: str) -> str:
    """``--config`` as a file: an existing path as it is, else the shipped config of that name."""
    if os.path.exists(path_or_name) or os.sep in path_or_name:
        return path_or_name
    shipped = shipped_configs()
    name = path_or_name[: -len(".yaml")] if path_or_name.endswith(".yaml") else path_or_name
    name = name.replace("_", "-")
    if name in shipped:
        return shipped[name]
    raise ConfigError(
        f"--config {path_or_name!r} is neither a file nor a shipped config; shipped: "
        f"{', '.join(shipped) or 'none found'} (mmbert-pretrain --list-configs)"
    )


def describe_shipped_configs() -> str:
    """One line per shipped config: its name, its first comment line and its file (``--list-configs``)."""
    lines = []
    for name, path in shipped_configs().items():
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
        summary = first.lstrip("#").strip() if first.startswith("#") else ""
        lines.append(f"{name:24s} {summary}\n{'':24s} {path}")
    return "\n".join(lines) if lines else "no shipped configs found (reinstall megatron-mmbert)"


def read_yaml(path: str, _seen: Optional[List[str]] = None) -> Dict[str, Any]:
    """A run YAML as a dict, with ``inherit: other.yaml`` (relative to the file, or a shipped config
    name) merged underneath. ``model: NAME`` is read as ``model: {preset: NAME}`` so that a file or
    an override can change single fields of a preset (``--model.num_layers 12``)."""
    import yaml

    path = os.path.abspath(path)
    seen = (_seen or []) + [path]
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = safe_load_yaml(f, path) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a mapping of sections, got {type(data).__name__}")
    parent = data.pop("inherit", None)
    if parent is not None:
        parent_path = os.path.join(os.path.dirname(path), parent)
        if not os.path.exists(parent_path):
            parent_path = config_path(parent)
        if os.path.abspath(parent_path) in seen:
            raise ConfigError(f"{path}: inherit cycle through {parent_path}")
        data = _deep_merge(read_yaml(parent_path, seen), data)  # a preset name replaces the parent's model
    if isinstance(data.get("model"), str):
        data["model"] = {"preset": data["model"]}
    return data


def from_mapping(data: Dict[str, Any]) -> RunConfig:
    """Typed RunConfig from a (merged, overridden) dict; unknown keys and wrong types raise."""
    data = copy.deepcopy(data)
    if "model" not in data:
        raise ConfigError("the run config needs a 'model:' section (a preset name or {preset: ..., ...})")
    model = data.pop("model")
    if not isinstance(model, (str, dict)):
        raise ConfigError(f"model: expected a preset name or a mapping, got {model!r}")
    if "phases" in data and not isinstance(data["phases"], list):
        raise ConfigError(
            f"phases: expected a list of phases (a mapping by phase name only edits inherited "
            f"phases), got {data['phases']!r}"
        )
    _resolve_language_sets(data)
    errors = []
    try:
        data["model"] = load_model_config(model)
    except ConfigError as e:  # reported with the other sections' problems, all in one error
        errors.append(e)
        data["model"] = ModelConfig()
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        errors.append(e)
    if errors:
        raise ConfigError.combine(errors)
    if cfg.data.without_sources:
        from megatron_mmbert.data.mixture import drop_sources

        drop_sources(cfg.phases, cfg.data.without_sources)
    return cfg


def _resolve_language_sets(data: Dict[str, Any]) -> None:
    """Replace each phase's ``languages: NAME`` by the list ``language_sets.NAME`` (a copy), in the
    dict, before it is typed: the phases are validated as the run will use them. Values of the wrong
    type are left for :func:`from_dict` to name."""
    sets, phases = data.get("language_sets") or {}, data.get("phases") or []
    if not isinstance(sets, dict) or not isinstance(phases, list):
        return
    for p in phases:
        spec = p.get("languages") if isinstance(p, dict) else None
        if isinstance(spec, str) and spec != "all" and not spec.startswith("top:"):
            if spec not in sets:
                raise ConfigError(
                    f"phase {p.get('name')!r}: languages {spec!r} is not 'all', 'top:N' or a name in "
                    f"language_sets ({sorted(sets) or 'none defined'})", field="language_sets"
                )
            if isinstance(sets[spec], list):
                p["languages"] = list(sets[spec])


def load_config(path: str, overrides: Optional[List[str]] = None) -> RunConfig:
    """YAML file (or shipped config name) + ``--a.b value`` overrides -> RunConfig, every section
    validated (its ``validate()``); the checks across sections, the world size and the disk are
    :func:`megatron_mmbert.training.preflight.validate`'s."""
    data = read_yaml(config_path(path))
    apply_overrides(data, list(overrides or []))
    cfg = from_mapping(data)
    if cfg.checkpoint.exit_after_minutes is None:  # a Slurm job's time limit, when it has one
        from megatron_mmbert.slurm import exit_after_minutes_for_job

        cfg.checkpoint.exit_after_minutes = exit_after_minutes_for_job(cfg.checkpoint.job_end_margin_minutes)
    return cfg


def resolved_dict(cfg: RunConfig) -> Dict[str, Any]:
    """The fully resolved config as a plain dict (what is written to ``{run_dir}/resolved_config.yaml``)."""
    return to_dict(cfg)


def write_resolved(cfg: RunConfig, path: str) -> None:
    """Write the resolved config atomically as YAML (loadable again with ``load_config``)."""
    import yaml

    from megatron_mmbert.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(resolved_dict(cfg), sort_keys=False))


__all__ = [
    "RunConfig", "DataSection", "OptimizerSection", "LRSegment", "ScheduleSection", "BatchSection",
    "CheckpointSection", "InitSection", "LoggingSection", "WandbSection", "TrainSection", "DebugSection",
    "load_config", "read_yaml", "from_mapping", "write_resolved",
    "resolved_dict", "ConfigError", "shipped_configs",
    "config_path", "describe_shipped_configs",
]


def describe_all() -> str:
    """Every section and field with its type, default and docstring (``--help-config``)."""
    from megatron_mmbert.config_base import describe

    out = ["RunConfig:", describe(RunConfig, "  ")]
    sections = {
        "model": ModelConfig, "parallel": ParallelConfig, "phases[]": PhaseConfig, "data": DataSection,
        "optimizer": OptimizerSection, "schedule.phases.<name>": LRSegment, "schedule": ScheduleSection,
        "batch": BatchSection, "checkpoint": CheckpointSection, "init": InitSection,
        "logging": LoggingSection, "logging.wandb": WandbSection, "train": TrainSection,
        "profiling": ProfilingSection, "debug": DebugSection,
    }
    for name, cls in sections.items():
        out += ["", f"{name}:", describe(cls, "  ")]
    return "\n".join(out)
