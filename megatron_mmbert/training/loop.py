"""The training run: phases pretrain -> mid -> decay in one process group, resumable at any step.

Read top to bottom, :func:`train` is the whole program after the config, and :meth:`Trainer.run`
the loop of a training run. The parts it drives, one job each: ``preflight`` (start-up checks),
``batch_plan`` (rows per step, batch-size warmup, steps per phase), ``state`` (the typed
``TrainState`` a checkpoint records), ``step`` (one optimizer step, a ``StepResult``), ``optim``
(optimizer and token-counted LR schedule), ``evaluation`` (loss per language and resource group at
the phase's row length and mask rate), ``logging`` (log line, metric windows and timings: ``StepMeter``;
TensorBoard and W&B: ``RunLogger``), ``stopping`` (signals, time limit), ``data_position`` (the
data position a checkpoint records, the branch check) and ``checkpoint``. This module holds one
subject, the :class:`Trainer` (start-up, restore or branch, the loop), which is why it is longer
than the parts.

1. validate the config against the world size (before any process group), initialise the runtime,
   write the resolved config into the run directory;
2. build the MLM stream (the data position of a phase is one integer, ``consumed_samples``; a
   sample is a pure function of (data seed, global sample index)), the model chunks (DDP-wrapped)
   and the megatron-core optimizer;
3. resume from ``checkpoint_dir/latest``, or start from ``init.checkpoint`` at ``init.start_phase``,
   or from scratch;
4. for each remaining phase: set its RoPE thetas, make its token-counted LR scheduler, then step
   through its samples (global batch = ``rows`` consecutive samples; data-parallel rank ``r`` takes
   the ``r``-th slice, cut into micro-batches); per step: re-seed dropout from (seed, step), one
   ``train_step``, advance the scheduler by the step's tokens, handle a non-finite step, log, save
   every N steps, and honour SIGTERM / the time limit (save, exit 0);
5. at each phase end: evaluate, save ``phase_end_{name}`` (kept), log the transition.

Exactness: data, masks and dropout depend only on (seed, step, sample index), and the LR only on
the phase's consumed tokens, so a run resumed from a checkpoint takes the same steps as an
uninterrupted one (bitwise on CPU at the same layout; see tests/test_training_resume.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Dict, List, Optional

import torch

from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.checkpoints.async_save import AsyncSaver
from megatron_mmbert.checkpoints.layout import data_tokenizer_dir, iter_name, phase_end_name, resolved_config_path
from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.fileio import DirectoryLock, DirectoryLocked
from megatron_mmbert.model.pipeline import _unwrap
from megatron_mmbert.training import optim
from megatron_mmbert.training.batch_plan import BatchPlan
from megatron_mmbert.training.config import RunConfig, resolved_dict, write_resolved
from megatron_mmbert.training.data_position import DataPosition, check_branch, position_in_plan
from megatron_mmbert.training.evaluation import Evaluator
from megatron_mmbert.training.logging import RunLogger, StepMeter, memory_gib
from megatron_mmbert.training.prefetch import BatchPrefetcher, prepare
from megatron_mmbert.training.profiling import StepProfiler
from megatron_mmbert.training.preflight import check_checkpoint_tokenizer, check_packed_row_backend, validate
from megatron_mmbert.training.resume_check import check_resume
from megatron_mmbert.training.state import TrainState, phase_complete, run_complete
from megatron_mmbert.training.step import finish_param_sync
from megatron_mmbert.training.stopping import StopFlag, any_rank


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under ``train.nan_policy: stop`` (or too many skips)."""


def save_due(cfg: RunConfig, step: int, tokens: int, step_tokens: int) -> bool:
    """Whether the step that ended at ``step`` / ``tokens`` (after ``step_tokens``) saves a checkpoint."""
    c = cfg.checkpoint
    by_steps = c.every_steps > 0 and step % c.every_steps == 0
    by_tokens = c.every_tokens > 0 and tokens // c.every_tokens > (tokens - step_tokens) // c.every_tokens
    return by_steps or by_tokens


# -- helpers -------------------------------------------------------------------------------------

def reseed(seed: int, step: int) -> None:
    """Dropout RNG as a function of (seed, step, pipeline rank), the same recipe Megatron-LM uses
    at start-up applied every step: layout-independent and nothing to restore on resume."""
    from megatron.core import parallel_state, tensor_parallel

    s = (seed * 1_000_003 + step) % (2**31 - 1) + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)


def lock_run_folders(cfg: RunConfig) -> List[DirectoryLock]:
    """Lock ``run_dir`` and ``checkpoint.dir`` (always, wherever it is: another run may name this
    run's ``RUN/checkpoints`` as its own): one writer per folder. All or none: on a refusal the locks
    taken are released and ``DirectoryLocked`` (or ``LockFileRefused``, a lock path that is a link or
    not our file) is raised."""
    locks: List[DirectoryLock] = []
    folders = [cfg.run_dir]
    if os.path.realpath(cfg.checkpoint_dir) != os.path.realpath(cfg.run_dir):  # one lock file, taken once
        folders.append(cfg.checkpoint_dir)
    try:
        for folder in folders:
            locks.append(DirectoryLock(folder).acquire())
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


# -- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """State of one run; :func:`train` drives it."""

    def __init__(self, cfg: RunConfig):
        from megatron_mmbert import runtime
        from megatron_mmbert.data.mlm import MLMStream
        from megatron_mmbert.model.build import build_model
        from megatron_mmbert.training.step import wrap_ddp

        self.cfg = cfg
        self.t_start = time.time()
        validate(cfg, runtime.world_size_from_env())
        self.rt = runtime.initialize(cfg.effective_model, cfg.parallel, cfg.seed)
        self.locks = self._lock_run_folders()
        self.log = RunLogger(cfg.run_dir, cfg.tensorboard_dir if cfg.logging.tensorboard else None, self.rt.is_main,
                             wandb=cfg.logging.wandb, config=resolved_dict(cfg), interval=cfg.logging.interval)
        check_resume(cfg, self.log.warning, self.rt.device)  # against the stored config, so before it is rewritten
        if self.rt.is_main:
            write_resolved(cfg, resolved_config_path(cfg.run_dir))  # its own name: never over the user's file
            os.makedirs(cfg.checkpoint_dir, exist_ok=True)
            # Safe: the lock above means no other process can be saving here now.
            removed = ckpt.clean_incomplete(cfg.checkpoint_dir)
            if removed:
                self.log.info(f"removed leftovers of interrupted saves: {removed}")

        self.stream = MLMStream(
            cfg.manifest_path, cfg.phases, cfg.data_seed, cache_dir=cfg.index_cache_dir,
            default_global_batch_size=cfg.batch.global_batch_size, anneal_segments=cfg.data.anneal_segments,
            mask_special_tokens=cfg.data.mask_special_tokens, timeout=cfg.data.index_timeout_s,
            start_phase=cfg.start_phase_index, packing=cfg.data.packing, bin_rows=cfg.packing_bin_rows(),
        )
        if self.rt.is_main:
            from megatron_mmbert.data.index import format_index_plan

            names = [p.name for p in cfg.phases[cfg.start_phase_index:]]
            self.log.info(f"data index {self.stream.index.path} (plan: index_plan.json there)\n"
                          + format_index_plan(self.stream.index.plan, head=10, tail=3, phases=names))
            from megatron_mmbert.data.languages import manifest_coverage
            from megatron_mmbert.data.shards import load_manifest

            coverage = manifest_coverage(load_manifest(cfg.manifest_path), cfg.data.language_list)
            if coverage is not None:
                self.log.info(coverage.format())
        parallel = dataclasses.replace(cfg.parallel, use_distributed_optimizer=cfg.use_distributed_optimizer)
        chunks = build_model(cfg.effective_model, parallel, cfg.compute_precision, self.rt.device)
        check_packed_row_backend(cfg, chunks[0].backend)
        self.chunks = wrap_ddp(chunks, parallel, cfg.compute_precision)
        self.optimizer = optim.build(cfg, self.chunks, cfg.phases[0])
        self.n_params = sum(p.numel() for c in self.chunks for p in c.parameters())
        self.stop = StopFlag(cfg.checkpoint.save_on_signal)
        self.async_saver = AsyncSaver(self.rt.device, enabled=cfg.checkpoint.async_save)
        self.plan = BatchPlan(cfg)
        self.evaluator = Evaluator(cfg, self.chunks, self.rt)
        self.complete: Optional[str] = None  # the checkpoint that already ends the last phase
        self.state = self._restore()

    # -- start-up -----------------------------------------------------------------------------
    def _lock_run_folders(self) -> List[DirectoryLock]:
        """Rank 0 locks the run's folders (:func:`lock_run_folders`) for the run's life. Every rank
        learns the outcome, so a refused run exits at once."""
        locks: List[DirectoryLock] = []
        error = None
        if self.rt.is_main:
            try:
                locks = lock_run_folders(self.cfg)
            except (DirectoryLocked, OSError) as exc:
                error = str(exc)
        if any_rank(error is not None, self.rt.device):
            raise ConfigError(error or "rank 0 could not lock the run folder (see its message)")
        return locks

    def _restore(self) -> TrainState:
        """Resume from ``latest``, or start (from ``init.checkpoint`` or fresh) at the start phase."""
        cfg = self.cfg
        latest = ckpt.read_latest(cfg.checkpoint_dir, warn=self.log.warning) if cfg.checkpoint.resume else None
        state = self._resume(latest) if latest is not None else self._start()
        if state.first_phase_index is None:
            state.first_phase_index = state.phase_index
        return state

    def _resume(self, latest: str) -> TrainState:
        cfg = self.cfg
        names = [p.name for p in cfg.phases]
        if cfg.checkpoint.verify_on_load:
            ckpt.verify_checkpoint(latest)
        self._check_tokenizer(latest, "the checkpoint resumed from")
        meta = ckpt.load_training(latest, self.chunks, self.optimizer)
        record = meta["train_state"]
        if record["phase"] not in names:
            raise ConfigError(f"{latest} was saved in phase {record['phase']!r}, which this config lacks ({names})")
        state = TrainState.from_checkpoint(record, names)
        optimizer = "restored" if meta["loaded_optimizer"] else "fresh"
        if phase_complete(record, self.stream.phase_num_samples(record["phase"])):
            # Only a phase-end checkpoint holds a finished phase (periodic saves skip the last step).
            if run_complete(record, names, self.stream.phase_num_samples(record["phase"])):
                self.complete = latest
                return state
            state.start_phase(state.phase_index + 1)
            self.log.info(f"resumed from {latest}: step {state.step}, phase {record['phase']!r} complete, "
                          f"continuing with {names[state.phase_index]!r}, optimizer {optimizer}")
            return state
        self.log.info(
            f"resumed from {latest}: step {state.step}, phase {record['phase']!r}, "
            f"{state.consumed_samples} samples into it, optimizer {optimizer}"
        )
        return state

    def _start(self) -> TrainState:
        cfg = self.cfg
        names = [p.name for p in cfg.phases]
        start = cfg.start_phase_index
        init = cfg.init.checkpoint or self._strided_init()
        if init:
            if cfg.checkpoint.verify_on_load:
                ckpt.verify_checkpoint(init)
            self._check_tokenizer(init, "init.strided_from" if init != cfg.init.checkpoint else "init.checkpoint")
            # init.restart_data accepts any data position: the parent's record is not even read.
            parent = None if cfg.init.restart_data else DataPosition.of_checkpoint(init)
            said = check_branch(parent, cfg, self.stream.index.typed_plan)
            if said:
                self.log.info(said)
            meta = ckpt.load_training(init, self.chunks, self.optimizer if cfg.init.load_optimizer else None)
            self.log.info(
                f"initialised from {init} (model{' + optimizer' if meta['loaded_optimizer'] else ''}), "
                f"starting at phase {names[start]!r}"
            )
        elif start:
            self.log.info(f"starting at phase {names[start]!r} from a fresh model (no init.checkpoint)")
        return TrainState(phase_index=start)

    def _check_tokenizer(self, checkpoint: str, what: str) -> None:
        check_checkpoint_tokenizer(self.cfg, checkpoint, what, self.stream.manifest.tokenizer.to_json(), self.log.warning)

    def _strided_init(self) -> Optional[str]:
        """With ``init.strided_from``: this run's model taken from that larger checkpoint by the
        strided rule (``convert/strided.py``), written once to ``{run_dir}/strided_init``."""
        cfg = self.cfg
        if not cfg.init.strided_from:
            return None
        from megatron_mmbert import runtime
        from megatron_mmbert.checkpoints.layout import config_path
        from megatron_mmbert.convert.strided import strided_checkpoint

        target = os.path.join(cfg.run_dir, "strided_init")
        if self.rt.is_main and not os.path.isfile(config_path(target)):  # one writer; the rest wait below
            info = strided_checkpoint(cfg.init.strided_from, target, cfg.model, overwrite=True)
            self.log.info(f"strided init: {cfg.model.hidden_size}-wide model from {cfg.init.strided_from} "
                          f"({info['rule']}: layers {info['layers']}, strides hidden {info['hidden_stride']}, "
                          f"heads {info['head_stride']}, FFN {info['ffn_stride']}) -> {target}")
        runtime.barrier()
        return target

    # -- accounting ----------------------------------------------------------------------------
    def _totals(self):
        """(total steps, total tokens) of the run from its first phase, for progress and ETA."""
        steps = tokens = 0
        for p in self.cfg.phases[self.state.first_phase_index:]:
            n = self.stream.phase_num_samples(p.name)
            steps += self.plan.phase_steps(p, n)
            tokens += n * p.seq_len
        return steps, tokens

    def train_state(self, phase: PhaseConfig, scheduler) -> Dict:
        """The ``train_state`` a checkpoint of this moment records (:class:`TrainState` plus the
        scheduler, seeds and data position)."""
        st = self.state
        position = position_in_plan(self.stream.index.typed_plan, st.phase_index, st.consumed_samples)
        return st.to_checkpoint(phase.name, scheduler.state_dict(), self.cfg.seed, self.cfg.data_seed,
                                position.to_dict(),
                                phase_samples=self.stream.phase_num_samples(phase.name))

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, name: str, phase: PhaseConfig, scheduler, kill_during_save: bool = False) -> None:
        """Save ``name`` (with ``checkpoint.async_save``: start saving it; published by a later
        :meth:`finish_saves`)."""
        cfg = self.cfg
        t0 = time.perf_counter()

        def before_publish():
            if kill_during_save:
                os.kill(os.getpid(), signal.SIGKILL)

        if cfg.checkpoint.async_save:
            self.finish_saves(wait=True)  # one save in flight
        finish_param_sync(self.chunks)
        args = (cfg.checkpoint_dir, name, self.chunks, self.optimizer, cfg.model_for_phase(phase),
                self.train_state(phase, scheduler))
        tokenizer = dict(tokenizer=data_tokenizer_dir(cfg.manifest_path),
                         tokenizer_identity=self.stream.manifest.tokenizer.to_json())
        if cfg.checkpoint.async_save:
            job = self.async_saver.save_training(*args, during_write=before_publish, started=t0, **tokenizer)
            self.log.info(f"saving {job.directory} in the background (the step waited {job.blocked_s:.2f}s: state "
                          f"{job.state_s:.2f}s, planning {job.plan_s:.2f}s, copy of {job.bytes / 2**20:.1f} MiB to "
                          f"host memory {job.copy_s:.2f}s)")
            return
        path = ckpt.save_training(*args, before_publish=before_publish, **tokenizer)
        self._saved(path, self.state.step, {"async": False, "blocked_s": time.perf_counter() - t0})

    def finish_saves(self, wait: bool) -> None:
        """With ``checkpoint.async_save``: publish the save in flight once every rank wrote it (at
        every step boundary; ``wait``: block until then -- before a save, at a phase end, on a stop)."""
        if not self.cfg.checkpoint.async_save:
            return
        job = self.async_saver.wait() if wait else self.async_saver.poll()
        if job is not None:
            self._saved(job.directory, job.extra["train_state"]["step"], {"async": True, "blocked_s": job.blocked_s, "write_s": job.write_s,
                                        "waited_s": job.waited_s, "finalize_s": job.finalize_s, "state_s": job.state_s,
                                        "plan_s": job.plan_s, "copy_s": job.copy_s,
                                        "published_at_step": self.state.step, "bytes": job.bytes})

    def _saved(self, path: str, step: int, timing: Dict) -> None:
        """A published checkpoint: retention, its log line and metrics record (rank 0)."""
        if not self.rt.is_main:
            return
        deleted = ckpt.apply_retention(self.cfg.checkpoint_dir, self.cfg.checkpoint.keep_last)
        if timing["async"]:
            how = (f"asynchronously: the step waited {timing['blocked_s']:.2f}s, written in the background in "
                   f"{timing['write_s']:.2f}s, published at step {timing['published_at_step']}"
                   + (f" after waiting {timing['waited_s']:.2f}s for the write" if timing["waited_s"] else "")
                   + f" ({timing['finalize_s']:.2f}s)")
        else:
            how = f"in {timing['blocked_s']:.1f}s"
        self.log.info(f"saved {path} {how}" + (f" (deleted {deleted})" if deleted else ""))
        self.log.log_checkpoint({"step": step, "name": os.path.basename(path), **timing})

    # -- the loop --------------------------------------------------------------------------------
    def micro_batches(self, phase: PhaseConfig, consumed: int, rows: int) -> List[Dict]:
        dp, r = self.rt.data_parallel_size, self.rt.data_parallel_rank
        mbs = min(self.cfg.phase_micro_batch(phase), rows // dp)
        per_rank = rows // dp
        start = consumed + r * per_rank
        return [self.stream.batch(phase.name, range(start + m, start + m + mbs)) for m in range(0, per_rank, mbs)]

    def run(self) -> int:
        """Train through the remaining phases; returns the process exit code (0 also on a clean stop)."""
        cfg, st = self.cfg, self.state
        if self.complete:
            self.log.info(f"run already complete: {self.complete} ends the last phase "
                          f"{cfg.phases[st.phase_index].name!r} (step {st.step}, {st.tokens:,} tokens); "
                          "nothing to do, checkpoints untouched")
            return 0
        self.totals = self._totals()
        self.log.info(
            f"run {cfg.run_dir}: {self.n_params:,} parameters on rank 0, {self.rt.world_size} process(es), "
            f"{self.totals[0]} steps, {self.totals[1]:,} tokens over phases "
            f"{[p.name for p in cfg.phases[st.first_phase_index:]]}"
        )
        meter, self.consecutive_skips = StepMeter(), 0
        self.profiler = StepProfiler(cfg.profiling, cfg.run_dir, self.rt.rank, self.rt.device, self.log.info)
        pin = self.rt.device.type == "cuda"
        prefetcher = BatchPrefetcher(
            lambda key: [prepare(b, pin) for b in self.micro_batches(cfg.phases[key[0]], key[1], key[2])]
        )
        try:
            return self._run_phases(meter, prefetcher)
        finally:
            prefetcher.close()
            self.async_saver.abandon()  # only after an error is a save still in flight (no collective then)

    def _run_phases(self, meter: StepMeter, prefetcher: BatchPrefetcher) -> int:
        cfg, st = self.cfg, self.state
        for k in range(st.phase_index, len(cfg.phases)):
            phase, n = cfg.phases[k], self.stream.phase_num_samples(cfg.phases[k].name)
            scheduler = self._start_phase(k, phase)
            while st.consumed_samples < n:
                meter.start()
                rows = self.plan.step_rows(phase, st.consumed_samples, n)
                batches = prefetcher.get((k, st.consumed_samples, rows))
                ahead = st.consumed_samples + rows
                if ahead < n:  # the next step's batches, built while this one trains
                    prefetcher.ahead((k, ahead, self.plan.step_rows(phase, ahead, n)))
                meter.data_ready()
                result = self._train_step(batches)
                step_tokens = rows * phase.seq_len
                scheduler.step(step_tokens)
                st.advance(phase.name, rows, step_tokens)
                skipped = self._check_finite(result, phase)
                meter.stepped(result, step_tokens, applied=skipped is None)
                phase_done = st.consumed_samples >= n
                if st.step % cfg.logging.interval == 0 or phase_done or skipped:
                    self._log_step(meter, result, phase, k, rows, batches, skipped)
                if cfg.logging.eval_interval and st.step % cfg.logging.eval_interval == 0 and not phase_done:
                    finish_param_sync(self.chunks)
                    self.log.log_eval(st.step, phase.name, self.evaluator.evaluate(phase))
                if cfg.debug.sigkill_at_step == st.step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if phase_done:
                    break
                if self._save_or_stop(phase, scheduler, step_tokens):
                    return 0
                meter.end()
            self._end_phase(phase, scheduler)
        self.log.info(f"training complete: {st.step} steps, {st.tokens:,} tokens, "
                      f"{st.skipped_steps} skipped, checkpoints in {cfg.checkpoint_dir}")
        return 0

    def _start_phase(self, k: int, phase: PhaseConfig):
        """Enter phase ``k``: its RoPE thetas, its LR scheduler at the resumed position, its log lines."""
        cfg, st = self.cfg, self.state
        st.start_phase(k)
        consumed, n = st.consumed_samples, self.stream.phase_num_samples(phase.name)
        model_cfg = cfg.model_for_phase(phase)
        for chunk in self.chunks:
            _unwrap(chunk).set_rope_theta(model_cfg.global_rope_theta, model_cfg.local_rope_theta)
            # FlexAttention pads evaluation and short micro-batches to the phase's training shape
            _unwrap(chunk).set_flex_tokens(cfg.phase_micro_batch(phase) * phase.seq_len)
        scheduler = optim.phase_scheduler(cfg, self.optimizer, phase, tokens_done=consumed * phase.seq_len)
        self.log.text(
            "phase", f"== phase {k + 1}/{len(cfg.phases)} {phase.name!r} at step {st.step}: "
            f"{n} rows x {phase.seq_len} tokens, mask {phase.mask_rate}"
            f"{'->' + str(phase.mask_rate_end) if phase.mask_rate_end else ''}, tau {phase.temperature}"
            f"{'->' + str(phase.temperature_end) if phase.temperature_end is not None else ''}, "
            f"RoPE theta {model_cfg.global_rope_theta:g}/{model_cfg.local_rope_theta:g}, lr "
            f"{cfg.schedule.phases[phase.name].lr:g}" + (f", resuming at row {consumed}" if consumed else ""),
            st.step,
        )
        if self.rt.is_main:  # repetition of every language in this phase, from the index plan
            from megatron_mmbert.data.index import format_index_plan, phase_epochs

            plan = self.stream.index.plan
            self.log.text("data", format_index_plan(plan, head=10, tail=3, phases=[phase.name]), st.step)
            self.log.log_phase_data(st.step, phase.name, phase_epochs(plan, phase.name))
        return scheduler

    def _train_step(self, batches):
        """One optimizer step on this step's batches, dropout re-seeded from (seed, step)."""
        from megatron_mmbert.training.step import train_step

        reseed(self.cfg.seed, self.state.step)
        if self.state.step + 1 in self.cfg.debug.nan_grad_at_steps:
            self.optimizer.inject_nan = True
        with self.profiler.step(self.state.step + 1):
            return train_step(self.chunks, self.optimizer, batches, self.rt.device)

    def _check_finite(self, result, phase: PhaseConfig) -> Optional[str]:
        """None for an applied step; for a skipped one, why (or raise under ``train.nan_policy: stop``)."""
        cfg, st = self.cfg, self.state
        if result.update_ok and math.isfinite(result.loss):
            self.consecutive_skips = 0
            return None
        what = self.optimizer.last_skip_reason or "non-finite loss"
        skipped = f"{what} at step {st.step} (phase {phase.name!r}, loss {result.loss})"
        st.skipped_steps += 1
        self.consecutive_skips += 1
        if cfg.train.nan_policy == "stop" or self.consecutive_skips > cfg.train.max_consecutive_skips:
            self.log.error(f"{skipped}; the update was not applied. Stopping "
                           f"(train.nan_policy={cfg.train.nan_policy}); resume from the last checkpoint.")
            raise NonFiniteError(skipped)
        self.log.warning(f"{skipped}; update skipped (train.nan_policy=skip)")
        return skipped

    def _log_step(self, meter: StepMeter, result, phase: PhaseConfig, k: int, rows: int, batches,
                  skipped: Optional[str]) -> None:
        """The log line of the window ending at this step, then a new window."""
        from megatron_mmbert.flops import flops_per_token, peak_tflops

        cfg, st = self.cfg, self.state
        total_steps, total_tokens = self.totals
        window = meter.window(result)
        rate = window.pop("rate")
        doc_lengths = [int(x) for b in batches for x in torch.diff(b["cu_seqlens"]).tolist()]
        labelled = result.tokens / max(rows * phase.seq_len, 1)
        fpt = flops_per_token(cfg.model, doc_lengths=doc_lengths, mask_rate=labelled)
        tflops = fpt * window["tokens_per_s"] / self.rt.world_size / 1e12
        peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        self.log.log_step({
            "step": st.step, "total_steps": total_steps, "phase": phase.name, "phase_index": k,
            "consumed_tokens": st.tokens, "total_tokens": total_tokens,
            "consumed_pct": 100.0 * st.tokens / max(total_tokens, 1),
            "loss": window.pop("loss"), "accuracy": window.pop("accuracy"), "lr": optim.current_lr(self.optimizer),
            "grad_norm": result.grad_norm, "tokens_per_s": window.pop("tokens_per_s"), "tflops": tflops,
            "mfu": (tflops / peak) if peak else None, "memory_gib": memory_gib(self.rt.device),
            "eta_s": (total_tokens - st.tokens) / rate if rate > 0 else None, "global_batch_rows": rows,
            "skipped": skipped, **window,
        })
        meter.reset()

    def _save_or_stop(self, phase: PhaseConfig, scheduler, step_tokens: int) -> bool:
        """Save when due; on a stop signal or the time limit (any rank) save and say stop (True)."""
        cfg, st = self.cfg, self.state
        self.finish_saves(wait=False)
        kill_in_save = cfg.debug.sigkill_during_save_at_step == st.step
        saved_now = save_due(cfg, st.step, st.tokens, step_tokens)
        if saved_now:
            self.save(iter_name(st.step), phase, scheduler, kill_in_save)
        stop_signal = self.stop.signal is not None
        over_time = (cfg.checkpoint.exit_after_minutes is not None
                     and time.time() - self.t_start > 60 * cfg.checkpoint.exit_after_minutes)
        if not any_rank(stop_signal or over_time, self.rt.device):
            return False
        if not saved_now:  # this step's periodic save is already complete
            self.save(iter_name(st.step), phase, scheduler)
        self.finish_saves(wait=True)  # the run ends with its checkpoint published
        why = f"signal {self.stop.signal}" if stop_signal else f"time limit {cfg.checkpoint.exit_after_minutes} min"
        self.log.info(f"stopping cleanly at step {st.step} ({why}); rerun the same command to resume")
        return True

    def _end_phase(self, phase: PhaseConfig, scheduler) -> None:
        """Phase end: evaluate, keep a checkpoint the decay variants can branch from."""
        cfg, st = self.cfg, self.state
        finish_param_sync(self.chunks)
        self.log.log_eval(st.step, phase.name, self.evaluator.evaluate(phase))
        name = phase_end_name(phase.name) if cfg.checkpoint.keep_phase_ends else iter_name(st.step)
        self.save(name, phase, scheduler, cfg.debug.sigkill_during_save_at_step == st.step)
        self.finish_saves(wait=True)  # branches start from phase ends: published before the next phase
        self.log.text("phase", f"== phase {phase.name!r} done at step {st.step} "
                      f"({st.tokens:,} tokens so far)", st.step)

    def close(self) -> None:
        self.log.close()
        for lock in self.locks:
            lock.release()


def train(cfg: RunConfig) -> int:
    """Run ``cfg`` to the end (or to a clean stop); the exit code of ``pretrain_mmbert.py``."""
    from megatron_mmbert import runtime

    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.close()
        runtime.shutdown()


__all__ = ["train", "Trainer", "NonFiniteError", "save_due", "reseed", "lock_run_folders"]
