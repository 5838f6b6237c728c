"""The training run: phases pretrain -> mid -> decay in one process group, resumable at any step.

Read top to bottom, :func:`train` is the whole program after the config:

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

import bisect
import dataclasses
import math
import os
import signal
import sys
import time
from typing import Dict, List, Optional

import torch

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.fileio import DirectoryLock, DirectoryLocked
from megatron_mmbert.training import checkpoint as ckpt
from megatron_mmbert.training import optim
from megatron_mmbert.training.config import (
    RunConfig,
    rampup_rows,
    rampup_token_thresholds,
    validate,
    write_resolved,
)
from megatron_mmbert.training.logging import RunLogger, memory_gib


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under ``train.nan_policy: stop`` (or too many skips)."""


# -- batch plan ----------------------------------------------------------------------------------

def step_rows(cfg: RunConfig, phase: PhaseConfig, consumed: int, num_samples: int) -> int:
    """Rows of the step that starts at ``consumed`` samples into ``phase`` (batch-size warmup aware)."""
    rows = cfg.phase_global_batch(phase)
    ramp_phase = cfg.batch.rampup_phase or cfg.phases[0].name
    tokens = consumed * phase.seq_len
    if phase.name == ramp_phase and tokens < cfg.batch.rampup_tokens and (sizes := rampup_rows(cfg)):
        k = bisect.bisect_right(rampup_token_thresholds(cfg), tokens)
        if k < len(sizes):
            rows = sizes[k]
    return min(rows, num_samples - consumed)


def phase_steps(cfg: RunConfig, phase: PhaseConfig, num_samples: int, consumed: int = 0) -> int:
    """Optimizer steps from ``consumed`` to the end of the phase."""
    steps = 0
    while consumed < num_samples:
        consumed += step_rows(cfg, phase, consumed, num_samples)
        steps += 1
    return steps


def save_due(cfg: RunConfig, step: int, tokens: int, step_tokens: int) -> bool:
    """Whether the step that ended at ``step`` / ``tokens`` (after ``step_tokens``) saves a checkpoint."""
    c = cfg.checkpoint
    by_steps = c.every_steps > 0 and step % c.every_steps == 0
    by_tokens = c.every_tokens > 0 and tokens // c.every_tokens > (tokens - step_tokens) // c.every_tokens
    return by_steps or by_tokens


# -- helpers -------------------------------------------------------------------------------------

def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def reseed(seed: int, step: int) -> None:
    """Dropout RNG as a function of (seed, step, pipeline rank), the same recipe Megatron-LM uses
    at start-up applied every step: layout-independent and nothing to restore on resume."""
    from megatron.core import parallel_state, tensor_parallel

    s = (seed * 1_000_003 + step) % (2**31 - 1) + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)


class _StopFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop checks it (all-reduced) at the end of every step.

    Under torchrun the worker also asks the kernel for SIGTERM when the agent dies
    (``PR_SET_PDEATHSIG``): a SIGKILLed torchrun leaves no orphaned trainers, and they save first."""

    def __init__(self, enabled: bool):
        self.signal: Optional[int] = None
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)
        if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux"):
            import ctypes

            agent = os.getppid()
            try:  # PR_SET_PDEATHSIG
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM if enabled else signal.SIGKILL)
            except (OSError, AttributeError):
                return
            if os.getppid() != agent:  # the agent died before the request took effect
                self._handle(signal.SIGTERM, None) if enabled else os._exit(1)

    def _handle(self, signum, frame):  # noqa: ARG002
        self.signal = signum


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


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
        self.log = RunLogger(cfg.run_dir, cfg.tensorboard_dir if cfg.logging.tensorboard else None, self.rt.is_main)
        if self.rt.is_main:
            write_resolved(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            os.makedirs(cfg.checkpoint_dir, exist_ok=True)
            # Safe: the lock above means no other process can be saving here now.
            removed = ckpt.clean_incomplete(cfg.checkpoint_dir)
            if removed:
                self.log.info(f"removed leftovers of interrupted saves: {removed}")

        self.stream = MLMStream(
            cfg.manifest_path, cfg.phases, cfg.data_seed, cache_dir=cfg.index_cache_dir,
            default_global_batch_size=cfg.batch.global_batch_size, anneal_segments=cfg.data.anneal_segments,
            mask_special_tokens=cfg.data.mask_special_tokens, timeout=cfg.data.index_timeout_s,
            start_phase=cfg.start_phase_index, packing=cfg.data.packing,
        )
        if self.rt.is_main:
            from megatron_mmbert.data.index import format_index_plan

            names = [p.name for p in cfg.phases[cfg.start_phase_index:]]
            self.log.info(f"data index {self.stream.index.path} (plan: index_plan.json there)\n"
                          + format_index_plan(self.stream.index.plan, head=10, tail=3, phases=names))
        parallel = dataclasses.replace(cfg.parallel, use_distributed_optimizer=cfg.use_distributed_optimizer)
        chunks = build_model(cfg.effective_model, parallel, cfg.compute_precision, self.rt.device)
        self.chunks = wrap_ddp(chunks, parallel, cfg.compute_precision)
        self.optimizer = optim.build(cfg, self.chunks, cfg.phases[0])
        self.n_params = sum(p.numel() for c in self.chunks for p in c.parameters())
        self.stop = _StopFlag(cfg.checkpoint.save_on_signal)
        self.state = self._restore()
        self.eval_stream = None

    # -- start-up -----------------------------------------------------------------------------
    def _lock_run_folders(self) -> List[DirectoryLock]:
        """Rank 0 locks ``run_dir`` (and a ``checkpoint.dir`` outside it) for the run's life: one
        writer per run folder. Every rank learns the outcome, so a refused run exits at once."""
        cfg = self.cfg
        folders = [cfg.run_dir]
        if not os.path.realpath(cfg.checkpoint_dir).startswith(os.path.realpath(cfg.run_dir) + os.sep):
            folders.append(cfg.checkpoint_dir)
        locks: List[DirectoryLock] = []
        error = None
        if self.rt.is_main:
            try:
                for folder in folders:
                    locks.append(DirectoryLock(folder).acquire())
            except (DirectoryLocked, OSError) as exc:
                error = str(exc)
                for lock in locks:
                    lock.release()
        if _any_rank(error is not None, self.rt.device):
            raise ConfigError(error or "rank 0 could not lock the run folder (see its message)")
        return locks

    def _fresh_state(self, phase_index: int) -> Dict:
        return {"phase_index": phase_index, "consumed_samples": 0, "consumed_samples_per_phase": {},
                "step": 0, "tokens": 0, "skipped_steps": 0}

    def _restore(self) -> Dict:
        cfg = self.cfg
        latest = ckpt.read_latest(cfg.checkpoint_dir, warn=self.log.info) if cfg.checkpoint.resume else None
        names = [p.name for p in cfg.phases]
        if latest is not None:
            if cfg.checkpoint.verify_on_load:
                ckpt.verify_checkpoint(latest)
            meta = ckpt.load_training(latest, self.chunks, self.optimizer)
            state = meta["train_state"]
            if state["phase"] not in names:
                raise ConfigError(f"{latest} was saved in phase {state['phase']!r}, which this config lacks ({names})")
            state["phase_index"] = names.index(state["phase"])
            optimizer = "restored" if meta["loaded_optimizer"] else "fresh"
            if state["consumed_samples"] >= self.stream.phase_num_samples(state["phase"]):
                # Only a phase-end checkpoint holds a finished phase (periodic saves skip the last step).
                if state["phase_index"] == len(names) - 1:
                    state["run_complete"] = latest
                    return state
                state.update(phase_index=state["phase_index"] + 1, consumed_samples=0)
                self.log.info(f"resumed from {latest}: step {state['step']}, phase {state['phase']!r} complete, "
                              f"continuing with {names[state['phase_index']]!r}, optimizer {optimizer}")
                return state
            self.log.info(
                f"resumed from {latest}: step {state['step']}, phase {state['phase']!r}, "
                f"{state['consumed_samples']} samples into it, optimizer {optimizer}"
            )
            return state
        start = cfg.start_phase_index
        if cfg.init.checkpoint:
            if cfg.checkpoint.verify_on_load:
                ckpt.verify_checkpoint(cfg.init.checkpoint)
            self._check_branch_data(ckpt.read_config(cfg.init.checkpoint).get("train_state"))
            meta = ckpt.load_training(cfg.init.checkpoint, self.chunks, self.optimizer if cfg.init.load_optimizer else None)
            self.log.info(
                f"initialised from {cfg.init.checkpoint} (model{' + optimizer' if meta['loaded_optimizer'] else ''}), "
                f"starting at phase {names[start]!r}"
            )
        elif start:
            self.log.info(f"starting at phase {names[start]!r} from a fresh model (no init.checkpoint)")
        return self._fresh_state(start)

    def _check_branch_data(self, parent: Optional[Dict]) -> None:
        """Refuse a run from ``init.checkpoint`` whose data would not continue the checkpoint's.

        The checkpoint records each language's stream position at the end of its phase
        (``data_position``); this run's start phase must begin exactly there, with the same data
        seed and manifest. A checkpoint without the record (imported, or not at a phase end) can only
        start this run's first phase. ``init.restart_data`` accepts the mismatch on purpose."""
        cfg = self.cfg
        plan = self.stream.index.plan
        start = plan["phases"][cfg.start_phase_index]
        fix = ("declare the parent's phase list (inherit the parent's config, editing phases by name) and "
               f"set init.start_phase to the phase after the checkpoint's; or set init.restart_data: true "
               "to start from this run's own plan on purpose")
        record = (parent or {}).get("data_position")
        if cfg.init.restart_data:
            self.log.info("init.restart_data: the data starts from this run's own plan, not checked against "
                          f"{cfg.init.checkpoint}")
            return
        if record is None:
            if cfg.start_phase_index > 0:
                raise ConfigError(
                    f"init.checkpoint={cfg.init.checkpoint!r} records no data position (imported, or saved by an "
                    f"older version), so starting at phase {start['name']!r} cannot be checked to continue its "
                    f"data; branch from a phase_end_* checkpoint of a training run, or {fix}"
                )
            return
        if not record.get("at_phase_end"):
            raise ConfigError(
                f"init.checkpoint={cfg.init.checkpoint!r} was saved {record['consumed_samples']} of "
                f"{record['phase_samples']} samples into phase {record['phase']!r}; branch from a phase end "
                f"(RUN/checkpoints/phase_end_{record['phase']}), or resume that run instead"
            )
        problems = []
        if record["data_seed"] != plan["seed"]:
            problems.append(f"data seed {plan['seed']} vs the checkpoint's {record['data_seed']}")
        if record["manifest_sha256"] != plan["manifest_sha256"]:
            problems.append("the manifest differs from the checkpoint's (other shards or token counts)")
        # Phase manifests the parent's streams used: their content is part of the stream names too.
        for sid, digest in (record.get("sources_sha256") or {}).items():
            if plan.get("sources_sha256", {}).get(sid) not in (None, digest):
                problems.append(f"phase manifest source {sid!r} differs from the checkpoint's")
        mine = {lang: r["first_token"] for lang, r in start["languages"].items()}
        theirs = record["stream_positions"]
        differ = sorted(lang for lang in set(mine) | set(theirs) if mine.get(lang, 0) != theirs.get(lang, 0))
        if differ:
            shown = ", ".join(f"{lang} {mine.get(lang, 0):,} vs {theirs.get(lang, 0):,}" for lang in differ[:3])
            problems.append(f"{len(differ)} language stream(s) would start elsewhere than the checkpoint's "
                            f"phase {record['phase']!r} ended (this run vs checkpoint, tokens: {shown})")
        if problems:
            raise ConfigError(
                f"this run's phase {start['name']!r} does not continue the data of init.checkpoint="
                f"{cfg.init.checkpoint!r}: " + "; ".join(problems) + f". To branch, {fix}"
            )
        self.log.info(f"branch check: phase {start['name']!r} continues {cfg.init.checkpoint}'s data "
                      f"(phase {record['phase']!r} end, {len(mine)} language streams)")

    def data_position(self, phase_index: int, consumed: int) -> Dict:
        """What a checkpoint records of the data (see :meth:`_check_branch_data`)."""
        from megatron_mmbert.data.index import phase_end_positions

        plan = self.stream.index.plan
        phase = plan["phases"][phase_index]
        ends = phase_end_positions(plan, phase["name"])
        return {
            "phase": phase["name"], "consumed_samples": int(consumed), "phase_samples": phase["samples"],
            "at_phase_end": consumed >= phase["samples"], "data_seed": plan["seed"],
            "manifest_sha256": plan["manifest_sha256"],
            "sources_sha256": plan.get("sources_sha256", {}),  # phase manifests (per-source streams)
            "stream_positions": {lang: t for lang, t in ends.items() if t},  # at the end of the phase
        }

    # -- accounting ----------------------------------------------------------------------------
    def _plan(self):
        """(total steps, total tokens) of the run from its first phase, for progress and ETA."""
        first = self.state.get("first_phase_index", self.state["phase_index"])
        steps = tokens = 0
        for p in self.cfg.phases[first:]:
            n = self.stream.phase_num_samples(p.name)
            steps += phase_steps(self.cfg, p, n)
            tokens += n * p.seq_len
        return steps, tokens

    def train_state(self, phase: PhaseConfig, scheduler) -> Dict:
        s = dict(self.state)
        s.update(phase=phase.name, scheduler=scheduler.state_dict(), data_seed=self.cfg.data_seed,
                 seed=self.cfg.seed, rng="re-seeded from (seed, step) every step; nothing else to restore",
                 data_position=self.data_position(s["phase_index"], s["consumed_samples"]))
        return s

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, name: str, phase: PhaseConfig, scheduler, kill_during_save: bool = False) -> None:
        cfg = self.cfg
        t0 = time.time()

        def before_publish():
            if kill_during_save:
                os.kill(os.getpid(), signal.SIGKILL)

        path = ckpt.save_training(
            cfg.checkpoint_dir, name, self.chunks, self.optimizer, cfg.model_for_phase(phase),
            self.train_state(phase, scheduler), before_publish=before_publish,
        )
        if self.rt.is_main:
            deleted = ckpt.apply_retention(cfg.checkpoint_dir, cfg.checkpoint.keep_last)
            self.log.info(f"saved {path} in {time.time() - t0:.1f}s" + (f" (deleted {deleted})" if deleted else ""))

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_groups(self) -> Dict[str, List[str]]:
        if self.cfg.logging.eval_groups:
            return dict(self.cfg.logging.eval_groups)
        from megatron_mmbert.data.shards import load_manifest

        manifest = load_manifest(self.cfg.data.eval_manifest or self.cfg.manifest_path)
        langs = sorted((lang for lang, e in manifest.languages.items() if e.tokens > 0),
                       key=lambda lang: (-manifest.languages[lang].tokens, lang))
        k = max(1, math.ceil(len(langs) / 3))
        groups = {"high": langs[:k], "mid": langs[k:2 * k], "low": langs[2 * k:]}
        return {g: v for g, v in groups.items() if v}

    def _build_eval(self):
        from megatron_mmbert.data.mlm import MLMStream

        cfg = self.cfg
        seq = cfg.logging.eval_seq_len or cfg.phases[0].seq_len
        dp = self.rt.data_parallel_size
        rows = max(dp, cfg.logging.eval_rows_per_group // dp * dp)
        phases = [
            PhaseConfig(name=f"eval_{g}", tokens=rows * seq, seq_len=seq, mask_rate=cfg.logging.eval_mask_rate,
                        languages=langs, temperature=1.0, global_batch_size=rows)
            for g, langs in self._eval_groups().items()
        ]
        stream = MLMStream(cfg.data.eval_manifest or cfg.manifest_path, phases, cfg.data_seed + 1,
                           cache_dir=None, mask_special_tokens=cfg.data.mask_special_tokens,
                           packing=cfg.data.packing)
        return stream, rows

    def evaluate(self) -> Dict[str, float]:
        """MLM loss per language group (forward only, every layout computes the same numbers)."""
        from megatron_mmbert.training.step import eval_step

        if self.eval_stream is None:
            self.eval_stream = self._build_eval()
        stream, rows = self.eval_stream
        per_rank = rows // self.rt.data_parallel_size
        first = self.rt.data_parallel_rank * per_rank
        losses = {}
        for name in stream.phase_names:
            batches = [stream.batch(name, [i]) for i in range(first, first + per_rank)]
            losses[name[len("eval_"):]] = eval_step(self.chunks, batches, self.rt.device)["loss"]
        return losses

    # -- the loop --------------------------------------------------------------------------------
    def micro_batches(self, phase: PhaseConfig, consumed: int, rows: int) -> List[Dict]:
        dp, r = self.rt.data_parallel_size, self.rt.data_parallel_rank
        mbs = min(self.cfg.phase_micro_batch(phase), rows // dp)
        per_rank = rows // dp
        start = consumed + r * per_rank
        return [self.stream.batch(phase.name, range(start + m, start + m + mbs)) for m in range(0, per_rank, mbs)]

    def run(self) -> int:
        """Train through the remaining phases; returns the process exit code (0 also on a clean stop)."""
        from megatron_mmbert.flops import flops_per_token, peak_tflops
        from megatron_mmbert.training.step import train_step

        cfg, st = self.cfg, self.state
        finished = st.pop("run_complete", None)
        if finished:
            self.log.info(f"run already complete: {finished} ends the last phase {st['phase']!r} "
                          f"(step {st['step']}, {st['tokens']:,} tokens); nothing to do, checkpoints untouched")
            return 0
        st.setdefault("first_phase_index", st["phase_index"])
        total_steps, total_tokens = self._plan()
        peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        world = self.rt.world_size
        self.log.info(
            f"run {cfg.run_dir}: {self.n_params:,} parameters on rank 0, {world} process(es), "
            f"{total_steps} steps, {total_tokens:,} tokens over phases "
            f"{[p.name for p in cfg.phases[st['first_phase_index']:]]}"
        )
        window_t, window_tokens = time.time(), 0
        window_loss = window_correct = window_labelled = 0.0
        rate_t, rate_tokens = None, 0  # throughput since the first step of this process (ETA)
        timings = {"data": 0.0, "step": 0.0, "other": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
        consecutive_skips = 0

        for k in range(st["phase_index"], len(cfg.phases)):
            phase = cfg.phases[k]
            n = self.stream.phase_num_samples(phase.name)
            if k != st["phase_index"]:
                st.update(phase_index=k, consumed_samples=0)
            consumed = st["consumed_samples"]
            model_cfg = cfg.model_for_phase(phase)
            for chunk in self.chunks:
                _unwrap(chunk).set_rope_theta(model_cfg.global_rope_theta, model_cfg.local_rope_theta)
            scheduler = optim.phase_scheduler(cfg, self.optimizer, phase, tokens_done=consumed * phase.seq_len)
            self.log.text(
                "phase", f"== phase {k + 1}/{len(cfg.phases)} {phase.name!r} at step {st['step']}: "
                f"{n} rows x {phase.seq_len} tokens, mask {phase.mask_rate}"
                f"{'->' + str(phase.mask_rate_end) if phase.mask_rate_end else ''}, tau {phase.temperature}"
                f"{'->' + str(phase.temperature_end) if phase.temperature_end is not None else ''}, "
                f"RoPE theta {model_cfg.global_rope_theta:g}/{model_cfg.local_rope_theta:g}, lr "
                f"{cfg.schedule.phases[phase.name].lr:g}" + (f", resuming at row {consumed}" if consumed else ""),
                st["step"],
            )
            if self.rt.is_main:  # repetition of every language in this phase, from the index plan
                from megatron_mmbert.data.index import format_index_plan, phase_epochs

                plan = self.stream.index.plan
                self.log.text("data", format_index_plan(plan, head=10, tail=3, phases=[phase.name]), st["step"])
                self.log.log_phase_data(st["step"], phase.name, phase_epochs(plan, phase.name))
            while consumed < n:
                t0 = time.time()
                rows = step_rows(cfg, phase, consumed, n)
                batches = self.micro_batches(phase, consumed, rows)
                t1 = time.time()
                reseed(cfg.seed, st["step"])
                if st["step"] + 1 in cfg.debug.nan_grad_at_steps:
                    self.optimizer.inject_nan = True
                result = train_step(self.chunks, self.optimizer, batches, self.rt.device)
                t2 = time.time()
                timings["forward_backward"] += result["time_forward_backward_s"]
                timings["optimizer"] += result["time_optimizer_s"]
                step_tokens = rows * phase.seq_len
                scheduler.step(step_tokens)
                consumed += rows
                st["step"] += 1
                st["tokens"] += step_tokens
                st["consumed_samples"] = consumed
                st["consumed_samples_per_phase"][phase.name] = consumed
                window_tokens += step_tokens
                if rate_t is None:
                    rate_t = time.time()  # the first step of a process pays start-up costs
                else:
                    rate_tokens += step_tokens

                skipped = None
                if not result["update_ok"] or not math.isfinite(result["loss"]):
                    what = self.optimizer.last_skip_reason or "non-finite loss"
                    skipped = f"{what} at step {st['step']} (phase {phase.name!r}, loss {result['loss']})"
                    st["skipped_steps"] += 1
                    consecutive_skips += 1
                    if cfg.train.nan_policy == "stop" or consecutive_skips > cfg.train.max_consecutive_skips:
                        self.log.info(f"ERROR: {skipped}; the update was not applied. Stopping "
                                      f"(train.nan_policy={cfg.train.nan_policy}); resume from the last checkpoint.")
                        raise NonFiniteError(skipped)
                    self.log.info(f"WARNING: {skipped}; update skipped (train.nan_policy=skip)")
                else:
                    consecutive_skips = 0
                    # The logged loss/accuracy average the window's steps, weighted by labelled tokens.
                    window_loss += result["loss"] * result["tokens"]
                    window_correct += result["accuracy"] * result["tokens"]
                    window_labelled += result["tokens"]

                phase_done = consumed >= n
                if st["step"] % cfg.logging.interval == 0 or phase_done or skipped:
                    now = time.time()
                    elapsed = max(now - window_t, 1e-9)
                    tps = window_tokens / elapsed
                    doc_lengths = [int(x) for b in batches for x in torch.diff(b["cu_seqlens"]).tolist()]
                    labelled = result["tokens"] / max(step_tokens, 1)
                    fpt = flops_per_token(cfg.model, doc_lengths=doc_lengths, mask_rate=labelled)
                    tflops = fpt * tps / world / 1e12
                    rate = rate_tokens / max(now - rate_t, 1e-9) if rate_tokens else tps
                    remaining = total_tokens - st["tokens"]
                    self.log.log_step({
                        "step": st["step"], "total_steps": total_steps, "phase": phase.name, "phase_index": k,
                        "consumed_tokens": st["tokens"], "total_tokens": total_tokens,
                        "consumed_pct": 100.0 * st["tokens"] / max(total_tokens, 1),
                        "loss": window_loss / window_labelled if window_labelled else result["loss"],
                        "accuracy": window_correct / window_labelled if window_labelled else result["accuracy"],
                        "lr": optim.current_lr(self.optimizer),
                        "grad_norm": result["grad_norm"], "tokens_per_s": tps, "tflops": tflops,
                        "mfu": (tflops / peak) if peak else None, "memory_gib": memory_gib(self.rt.device),
                        "eta_s": remaining / rate if rate > 0 else None, "global_batch_rows": rows,
                        "skipped": skipped, "time_data_s": timings["data"] + (t1 - t0),
                        "time_step_s": timings["step"] + (t2 - t1), "time_other_s": timings["other"],
                        "time_forward_backward_s": timings["forward_backward"],
                        "time_optimizer_s": timings["optimizer"],
                    })
                    window_t, window_tokens = time.time(), 0
                    window_loss = window_correct = window_labelled = 0.0
                    timings = {"data": 0.0, "step": 0.0, "other": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
                    t_logged = True
                else:
                    timings["data"] += t1 - t0
                    timings["step"] += t2 - t1
                    t_logged = False

                if cfg.logging.eval_interval and st["step"] % cfg.logging.eval_interval == 0 and not phase_done:
                    self.log.log_eval(st["step"], phase.name, self.evaluate(), bool(cfg.data.eval_manifest))
                if cfg.debug.sigkill_at_step == st["step"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                kill_in_save = cfg.debug.sigkill_during_save_at_step == st["step"]
                if phase_done:
                    break
                saved_now = save_due(cfg, st["step"], st["tokens"], step_tokens)
                if saved_now:
                    self.save(f"iter_{st['step']:07d}", phase, scheduler, kill_in_save)
                stop_signal = self.stop.signal is not None
                over_time = (cfg.checkpoint.exit_after_minutes is not None
                             and time.time() - self.t_start > 60 * cfg.checkpoint.exit_after_minutes)
                if _any_rank(stop_signal or over_time, self.rt.device):
                    if not saved_now:  # this step's periodic save is already complete
                        self.save(f"iter_{st['step']:07d}", phase, scheduler)
                    why = f"signal {self.stop.signal}" if stop_signal else f"time limit {cfg.checkpoint.exit_after_minutes} min"
                    self.log.info(f"stopping cleanly at step {st['step']} ({why}); rerun the same command to resume")
                    return 0
                if not t_logged:
                    timings["other"] += time.time() - t2

            # Phase end: evaluate, keep a checkpoint the decay variants can branch from.
            losses = self.evaluate()
            self.log.log_eval(st["step"], phase.name, losses, bool(cfg.data.eval_manifest))
            name = f"phase_end_{phase.name}" if cfg.checkpoint.keep_phase_ends else f"iter_{st['step']:07d}"
            self.save(name, phase, scheduler, cfg.debug.sigkill_during_save_at_step == st["step"])
            self.log.text("phase", f"== phase {phase.name!r} done at step {st['step']} "
                          f"({st['tokens']:,} tokens so far)", st["step"])
        self.log.info(f"training complete: {st['step']} steps, {st['tokens']:,} tokens, "
                      f"{st['skipped_steps']} skipped, checkpoints in {cfg.checkpoint_dir}")
        return 0

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


__all__ = ["train", "Trainer", "NonFiniteError", "step_rows", "phase_steps", "save_due", "reseed"]
