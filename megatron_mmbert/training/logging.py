"""What a run reports: the console line, ``metrics.jsonl`` and TensorBoard (rank 0 only).

The log line, every ``logging.interval`` steps::

    step 120/1000 | pretrain | tok 3.9M/32.8M (12.0%) | loss 6.1234 | acc 0.121 | lr 7.60e-04 |
    gnorm 1.23 | 15.2k tok/s | 0.01 TFLOP/s | MFU n/a | mem 0.9 GiB | eta 0:03:12

Loss and accuracy average the steps since the previous line: ``logging.interval`` of them, or
fewer where a line says which (``loss 6.1234 (steps 121-122)``: the first line after a resume, a
phase's last line); ``metrics.jsonl`` records the count as ``window_steps``.
Tokens are packed-row capacity (steps x rows x seq_len), the unit of the phase budgets; tok/s is
the whole job's rate; TFLOP/s is model FLOPs per device from ``megatron_mmbert.flops`` (the A3
convention: bidirectional attention over each document, sparse MLM head); MFU divides it by the
device's dense bf16 peak and is ``n/a`` where no peak is known (CPU). ETA is tokens remaining over
the recent token rate (ETA from tokens, not steps: batch-size warmup changes the step size).
Memory is the peak allocated CUDA memory, or the process's peak RSS on CPU.

TensorBoard gets the same values as scalars under ``train/`` with the global step as x axis, the
evaluations (``training.evaluation``) under ``eval/``: ``eval/{mean,macro,high,mid,low}/{loss,
accuracy}`` and ``eval/lang/{language}/{loss,accuracy}``, and the phase transitions as text;
``metrics.jsonl`` gets one JSON object per logged step and per evaluation (tests and plots read it).
Weights & Biases (``logging.wandb``, optional) gets the same scalars, against ``step``, and the
resolved config; its run id is kept in ``{run_dir}/wandb_run_id`` so a resumed run continues it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Dict, Optional

import torch

from megatron_mmbert.progress import format_eta, human

TB_FIELDS = (
    "loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "tflops", "consumed_tokens",
    "consumed_pct", "phase_index", "memory_gib", "eta_s", "global_batch_rows",
)
"""Scalars written to TensorBoard every logged step (``train/<name>``; ``train/mfu`` too where known)."""


TIMINGS = ("data", "step", "other", "forward_backward", "optimizer")
"""Where the seconds of a log window went (``time_<name>_s`` in the metrics): building batches, the
step (``forward_backward`` + ``optimizer`` inside it), and everything else between steps."""


class StepMeter:
    """Metric windows and timings between two log lines, and the token rate for the ETA.

    Per step: :meth:`start`, :meth:`data_ready` (batches built), :meth:`stepped` (the step's
    result), then :meth:`end` once the step's saves and checks are done. :meth:`window` gives the
    window's averages and times; :meth:`reset` starts the next window. The logged loss/accuracy
    average the window's applied steps, weighted by labelled tokens. The ETA rate counts from the
    first step of the process (which pays start-up costs, so its tokens are not counted)."""

    def __init__(self):
        self.rate_t: Optional[float] = None
        self.rate_tokens = 0
        self._t0 = self._t1 = self._t2 = 0.0
        self._logged = False
        self.reset()

    def reset(self) -> None:
        self.window_t, self.window_tokens, self.window_steps = time.time(), 0, 0
        self.loss_sum = self.correct_sum = self.labelled = 0.0
        self.timings = dict.fromkeys(TIMINGS, 0.0)
        self._logged = True

    def start(self) -> None:
        self._t0 = time.time()

    def data_ready(self) -> None:
        self._t1 = time.time()
        self.timings["data"] += self._t1 - self._t0

    def stepped(self, result, step_tokens: int, applied: bool) -> None:
        """Account a step's :class:`~megatron_mmbert.training.step.StepResult` (``applied``: its
        update was applied, so its loss enters the window average)."""
        self._t2 = time.time()
        self._logged = False
        self.timings["step"] += self._t2 - self._t1
        self.timings["forward_backward"] += result.time_forward_backward_s
        self.timings["optimizer"] += result.time_optimizer_s
        self.window_tokens += step_tokens
        self.window_steps += 1
        if self.rate_t is None:
            self.rate_t = time.time()
        else:
            self.rate_tokens += step_tokens
        if applied:
            self.loss_sum += result.loss * result.tokens
            self.correct_sum += result.accuracy * result.tokens
            self.labelled += result.tokens

    def end(self) -> None:
        """The step's work after the optimizer (saves, checks) counts as ``other`` unless logged."""
        if not self._logged:
            self.timings["other"] += time.time() - self._t2

    def window(self, result) -> Dict[str, float]:
        """Loss, accuracy, tokens/s, the ETA's token rate and the times of the window ending now
        (``result``: the last step's, used when no step of the window was applied)."""
        now = time.time()
        tps = self.window_tokens / max(now - self.window_t, 1e-9)
        return {
            "loss": self.loss_sum / self.labelled if self.labelled else result.loss,
            "accuracy": self.correct_sum / self.labelled if self.labelled else result.accuracy,
            "tokens_per_s": tps,
            "window_steps": self.window_steps,
            "rate": self.rate_tokens / max(now - self.rate_t, 1e-9) if self.rate_tokens else tps,
            **{f"time_{k}_s": v for k, v in self.timings.items()},
        }


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux





WANDB_ID_FILE = "wandb_run_id"
"""File in the run folder holding the W&B run id, so a resumed run continues the same W&B run."""


def require_wandb():
    """The ``wandb`` module, or a clear error naming the extra that installs it."""
    try:
        import wandb
    except ImportError:
        from megatron_mmbert.config_base import ConfigError

        raise ConfigError("logging.wandb.project is set but wandb is not installed: "
                          "pip install 'megatron-mmbert[wandb]' (or unset logging.wandb.project)") from None
    return wandb


def start_wandb(section, run_dir: str, config: Dict):
    """A W&B run (``section``: ``training.config.WandbSection``) that continues the one whose id
    ``run_dir`` keeps, or a new one whose id it then keeps."""
    wandb = require_wandb()
    id_file = os.path.join(run_dir, WANDB_ID_FILE)
    run_id = None
    if os.path.isfile(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip() or None
    if run_id is None:
        import secrets

        from megatron_mmbert.fileio import atomic_write_text

        run_id = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
        atomic_write_text(id_file, run_id + "\n")
    run = wandb.init(project=section.project, entity=section.entity,
                     name=section.name or os.path.basename(os.path.normpath(run_dir)), tags=list(section.tags),
                     mode=section.mode, dir=run_dir, id=run_id, resume="allow", config=config)
    # Steps against our own step counter: a resumed run re-logs steps after its checkpoint, which
    # W&B's internal step would drop as going backwards.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


class RunLogger:
    """Console, metrics file, TensorBoard and W&B; every method is a no-op off rank 0."""

    def __init__(self, run_dir: str, tensorboard_dir: Optional[str], enabled: bool, wandb=None,
                 config: Optional[Dict] = None, interval: int = 1):
        """``wandb``: a ``WandbSection`` (None or not enabled: no W&B); ``config``: the resolved
        run config W&B records; ``interval``: ``logging.interval``, the steps a log line averages
        (a line over fewer, the first after a resume or a phase's last, says which steps)."""
        self.enabled = enabled
        # TensorBoard's writer opens at the first record, so that a relaunch of a finished run
        # (nothing to record) leaves no new events file
        self.tensorboard_dir = tensorboard_dir
        self.interval = interval
        self.writer = None
        self.metrics = None
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if wandb is not None and wandb.enabled:
            self.wandb = start_wandb(wandb, run_dir, config or {})
            self.info(f"W&B run {self.wandb.id} ({wandb.mode}, project {wandb.project}); "
                      f"id kept in {os.path.join(run_dir, WANDB_ID_FILE)}")

    def scalars(self, values: Dict[str, Optional[float]], step: int) -> None:
        """Scalars (tag -> value, None skipped) to TensorBoard and W&B at ``step``."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self._tensorboard() is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None and values:
            self.wandb.log({"step": step, **values})

    def _tensorboard(self):
        """The TensorBoard writer, opened on first use (None without TensorBoard or off rank 0)."""
        if self.writer is None and self.enabled and self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tensorboard_dir)
        return self.writer

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stdout, flush=True)

    def warning(self, message: str) -> None:
        """Something the user should act on, through :mod:`logging` (its level and handlers: the
        trainer's print ``<time> WARNING megatron_mmbert.training: message`` in order with the log)."""
        if self.enabled:
            logging.getLogger("megatron_mmbert.training").warning(message)

    def error(self, message: str) -> None:
        """Why the run stops, through :mod:`logging` (every rank: the one that found it says so)."""
        logging.getLogger("megatron_mmbert.training").error(message)

    def text(self, tag: str, message: str, step: int) -> None:
        self.info(message)
        if self._tensorboard() is not None:
            self.writer.add_text(tag, message, step)

    def log_step(self, m: Dict[str, float]) -> None:
        """One training log line from the metrics dict ``m`` (see the module docstring)."""
        if not self.enabled:
            return
        mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
        n = m.get("window_steps", self.interval)
        over = "" if n == self.interval else (f" (step {m['step']})" if n == 1 else
                                              f" (steps {m['step'] - n + 1}-{m['step']})")
        line = (
            f"step {m['step']}/{m['total_steps']} | {m['phase']} | tok {human(m['consumed_tokens'])}/"
            f"{human(m['total_tokens'])} ({m['consumed_pct']:.1f}%) | loss {m['loss']:.4f}{over} | "
            f"acc {m['accuracy']:.3f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f} | "
            f"{human(m['tokens_per_s'])} tok/s | {m['tflops']:.3g} TFLOP/s | MFU {mfu} | "
            f"mem {m['memory_gib']:.2f} GiB | eta {format_eta(m['eta_s'])}"
        )
        if m.get("skipped"):
            line += f" | SKIPPED ({m['skipped']})"
        print(line, flush=True)
        self.metrics.write(json.dumps({"kind": "train", **m}) + "\n")
        self.scalars({f"train/{name}": m.get(name) for name in TB_FIELDS + ("mfu",)}, m["step"])

    def log_eval(self, step: int, phase: str, result: Dict) -> None:
        """An evaluation (``training.evaluation.Evaluator.evaluate``): one console line with the
        means and groups; per language in ``metrics.jsonl``, TensorBoard and W&B. ``losses`` in the
        record holds the mean, macro and group losses by name (what plots draw)."""
        if not self.enabled:
            return
        groups = result.get("groups", {})
        mean = result["mean"]
        losses = {"mean": mean["loss"], "macro": mean["macro_loss"], **{g: r["loss"] for g, r in groups.items()}}
        where = ("held out" if result["held_out"] else "training manifest, not held out") + f": {result['manifest']}"
        parts = " | ".join(f"{g} {v:.4f}" for g, v in losses.items())
        print(f"eval at step {step} ({phase}; seq {result['seq_len']}, mask {result['mask_rate']:g}, "
              f"{len(result['languages'])} languages; {where}): {parts}", flush=True)
        if result.get("skipped"):
            print(f"eval: {len(result['skipped'])} language(s) of phase {phase!r} have no evaluation rows: "
                  f"{result['skipped'][:5]}", flush=True)
        languages = {lang: {k: r[k] for k in ("loss", "accuracy", "masked_tokens")}
                     for lang, r in result["languages"].items()}
        record = {"kind": "eval", "step": step, "phase": phase, "held_out": result["held_out"],
                  "manifest": result["manifest"], "seq_len": result["seq_len"], "mask_rate": result["mask_rate"],
                  "losses": losses, "mean": mean, "groups": groups, "languages": languages,
                  "skipped": list(result.get("skipped", []))}
        self.metrics.write(json.dumps(record) + "\n")
        values = {"eval/mean/loss": mean["loss"], "eval/mean/accuracy": mean["accuracy"],
                  "eval/macro/loss": mean["macro_loss"], "eval/macro/accuracy": mean["macro_accuracy"]}
        for g, r in groups.items():
            values.update({f"eval/{g}/loss": r["loss"], f"eval/{g}/accuracy": r["accuracy"]})
        for lang, r in languages.items():
            values.update({f"eval/lang/{lang}/loss": r["loss"], f"eval/lang/{lang}/accuracy": r["accuracy"]})
        self.scalars(values, step)

    def log_phase_data(self, step: int, phase: str, epochs: Dict[str, Dict[str, float]]) -> None:
        """Epochs per language of the phase that starts at ``step`` (``data.index.phase_epochs``)."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"kind": "phase_data", "step": step, "phase": phase, "epochs": epochs}) + "\n")
        self.scalars({f"data/{phase}/epochs_in_phase/{lang}": e["in_phase"] for lang, e in epochs.items()}, step)

    def log_checkpoint(self, record: Dict) -> None:
        """A published checkpoint (``Trainer.save``): ``metrics.jsonl`` (kind ``checkpoint``) and the
        seconds the step loop waited for it and the background write took, to TensorBoard and W&B."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"kind": "checkpoint", **record}) + "\n")
        self.scalars({f"checkpoint/{k}": record.get(k) for k in ("blocked_s", "write_s", "waited_s", "finalize_s")},
                     record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.metrics is not None:
            self.metrics.close()
