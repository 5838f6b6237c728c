"""Asynchronous training checkpoints (``checkpoint.async_save``): the step loop waits only while the
state is planned and copied to host memory; the files are written by a background thread while
training goes on, and the checkpoint is published -- renamed into place, ``latest`` rewritten --
only once every rank's write finished.

megatron-core's asynchronous save (``dist_checkpointing.save(..., async_sharded_save=True)``, what
Megatron-LM's ``--async-save`` runs; https://docs.nvidia.com/megatron-core/developer-guide/latest/
api-guide/dist_checkpointing.html) splits a save in three: planning (collective; ``common.pt`` is
written then), the write of this rank's shard files (the returned ``AsyncRequest``'s ``async_fn``)
and finalization (its ``finalize_fns``: ``.metadata`` from every rank's write results, then
``metadata.json``; collective). This module uses that split as it is and runs the middle part
differently:

* **Where the write runs.** Megatron-LM hands the request to ``AsyncCallsQueue``, which forks a
  process per save (or keeps a spawned worker), and the request's ``async_fn``
  (``FileSystemWriterAsync.write_preloaded_data_multiproc``) forks one more process per file.
  Helper processes are what Slurm's SIGTERM (sent to every process of the job step) kills
  mid-write, and what a SIGKILLed trainer orphans (see :mod:`.dcp_io`). Here one thread of the
  trainer writes the request's files, one after another, each with megatron-core's own
  ``FileSystemWriterAsync.write_preloaded_data`` (the bytes of a synchronous save, fsynced), so
  there is no helper process: a stop signal reaches only the trainer, which finishes the write and
  publishes before it exits.
* **What the write reads.** ``preload_fn`` (``preload_tensors``) stages tensors with
  ``Tensor.to("cpu")``, which returns a CPU tensor itself: written while training goes on, it
  would change under the writer. :func:`_stage` copies every tensor to host memory (a device copy
  on a GPU, a clone on the CPU) before the step loop continues; that copy is the time a step
  waits.
* **Digests.** The writer hashes the files it wrote (SHA-256, as :func:`.dcp_io.write_config`
  records them) in the background too; rank 0 hashes only the small files at publication.

Finalization is collective, so it runs on the main thread, at step boundaries: :meth:`AsyncSaver.poll`
all-reduces one "still writing" flag (as megatron-core's ``maybe_finalize_async_calls`` does) and
publishes once no rank is writing; :meth:`AsyncSaver.wait` blocks until then. The trainer waits
before the next save (one save in flight at a time), at a phase end, at a stop signal or time limit
(the run ends with its last checkpoint published), and at the end of the run. A process that dies
mid-write leaves its ``.tmp-`` folder (removed by the next run's start-up, as a synchronous save's)
and ``latest`` naming the previous complete checkpoint. docs/safety.md, docs/training.md.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_mmbert.checkpoints import dcp_io
from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class PendingSave:
    """One asynchronous save: scheduled, being written, or published."""

    root: str
    name: str
    tmp: str
    model_config: ModelConfig
    extra: Dict[str, Any]
    tokenizer: Optional[str]
    finalize_fns: List[Callable[[], None]]
    blocked_s: float = 0.0
    """Seconds the caller waited to schedule the save (planning, ``common.pt``, the host copy)."""
    bytes: int = 0
    """Bytes of tensor data this rank copied to host memory and writes."""
    state_s: float = 0.0
    """Of ``blocked_s``: building the sharded state dict (model and optimizer)."""
    plan_s: float = 0.0
    """Of ``blocked_s``: megatron-core's planning (collective; ``common.pt`` written)."""
    copy_s: float = 0.0
    """Of ``blocked_s``: the copy to host memory."""
    write_s: float = 0.0
    """Seconds this rank's background write took (files written, fsynced and hashed)."""
    waited_s: float = 0.0
    """Seconds the caller waited for the write at a forced :meth:`AsyncSaver.wait`."""
    finalize_s: float = 0.0
    """Seconds of the collective finalization and the publication."""
    digests: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def directory(self) -> str:
        return os.path.join(self.root, self.name)


def _stage(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of ``tensor`` that training cannot change (see the module docstring)."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.clone()
    return tensor.to("cpu", non_blocking=True)  # into pinned memory; synchronized by the caller


def _write_bucket_fn():
    """megatron-core's per-file writer, without the process-wide GC switch it wears for forked
    writers (a thread must not turn the trainer's garbage collector off)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    fn = FileSystemWriterAsync.write_preloaded_data
    return getattr(fn, "__wrapped__", fn)


def _unpack_request(request) -> tuple:
    """(transform list, write buckets, results queue) of megatron-core 0.16's ``AsyncRequest`` from
    ``TorchDistSaveShardedStrategy.async_save``; a clear error for any other request."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    if request.async_fn is None:
        return [], [], None  # nothing to write on this rank
    fn = getattr(request.async_fn, "func", None)
    if fn is not FileSystemWriterAsync.write_preloaded_data_multiproc or len(request.async_fn_args) != 3:
        raise ConfigError(
            field="checkpoint.async_save",
            message="checkpoint.async_save: megatron-core's save strategy returned an asynchronous request this "
                    f"trainer does not know how to write ({request.async_fn!r}; it writes the one of megatron-core "
                    "0.16's torch_dist strategy, FileSystemWriterAsync). Set checkpoint.async_save: false",
        )
    transform_list = request.async_fn.args[0] if request.async_fn.args else []
    _, buckets, results_queue = request.async_fn_args
    return transform_list, buckets, results_queue


def require_support() -> None:
    """Refuse ``checkpoint.async_save`` at start-up, naming what is missing, where this module cannot
    write: a default save strategy that is not megatron-core's asynchronous torch_dist one, a
    megatron-core without ``FileSystemWriterAsync``'s per-file writer, the multi-storage client
    (object stores: this writer opens local files), or no psutil (megatron-core's writer needs it)."""
    def refuse(why: str):
        raise ConfigError(field="checkpoint.async_save",
                          message=f"checkpoint.async_save: {why}; set checkpoint.async_save: false")

    try:
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron.core.dist_checkpointing.strategies.base import AsyncSaveShardedStrategy
    except ImportError as exc:
        refuse(f"this megatron-core has no asynchronous dist_checkpointing save ({exc})")
    writer = filesystem_async.FileSystemWriterAsync
    if not all(hasattr(writer, n) for n in ("write_preloaded_data", "write_preloaded_data_multiproc")):
        refuse("this megatron-core's FileSystemWriterAsync lacks write_preloaded_data (0.16's per-file writer)")
    strategy = get_default_save_sharded_strategy()
    if not isinstance(strategy, AsyncSaveShardedStrategy):
        refuse(f"megatron-core's default save strategy {type(strategy).__name__} cannot save asynchronously")
    try:
        from megatron.core.msc_utils import MultiStorageClientFeature

        if MultiStorageClientFeature.is_enabled():
            refuse("megatron-core's multi-storage client is enabled; the background writer writes local files only")
    except ImportError:
        pass
    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        refuse("megatron-core's checkpoint writer needs psutil (pip install psutil)")


class AsyncSaver:
    """At most one asynchronous training checkpoint in flight; every method is collective (every
    rank calls it at the same step boundary). ``enabled``: :func:`require_support` at once."""

    def __init__(self, device: torch.device, enabled: bool = True):
        if enabled:
            require_support()
        self.device = device
        self.pending: Optional[PendingSave] = None
        self.thread: Optional[threading.Thread] = None

    # -- schedule ---------------------------------------------------------------------------------
    def save_training(
        self, root: str, name: str, chunks, optimizer, model_config: ModelConfig, train_state: Dict[str, Any],
        during_write: Optional[Callable[[], None]] = None, tokenizer: Optional[str] = None,
        tokenizer_identity: Optional[Dict[str, Any]] = None, started: Optional[float] = None,
    ) -> PendingSave:
        """Start saving ``root/name`` as :func:`.dist.save_training` does; returns once the state is
        in host memory (a save still in flight is published first). ``during_write`` runs in the
        writer thread after its first file is on disk (fault injection); ``started``: the
        ``time.perf_counter()`` at which the caller began waiting (the save's ``blocked_s`` counts from
        it; default: now)."""
        from megatron.core import dist_checkpointing

        self.wait()
        t0 = time.perf_counter() if started is None else started
        directory = os.path.join(root, name)
        tmp = ckpt.begin_save(directory)
        try:
            t1 = time.perf_counter()
            sharded = ckpt.training_sharded_state_dict(chunks, optimizer, is_loading=False)
            t2 = time.perf_counter()
            request = dist_checkpointing.save(sharded, tmp, async_sharded_save=True)
            t3 = time.perf_counter()
            transform_list, buckets, results_queue = _unpack_request(request)
            nbytes, on_device = 0, False
            for i, (path, storage_key, (bytes_data, tensor_data)) in enumerate(buckets):
                on_device = on_device or any(t.device.type != "cpu" for _, t in tensor_data)
                tensors = [(item, _stage(t)) for item, t in tensor_data]
                nbytes += sum(t.numel() * t.element_size() for _, t in tensors)
                # in place: megatron-core's writer object shares this list, which then holds no
                # device tensor (nor a view of a live one) until the finalization
                buckets[i] = (path, storage_key, (bytes_data, tensors))
            if on_device:
                torch.cuda.synchronize()
        except BaseException as exc:
            ckpt.abandon_save(tmp, exc, directory)
            raise
        job = PendingSave(root, name, tmp, model_config,
                          ckpt.training_extra(optimizer, train_state, tokenizer_identity), tokenizer,
                          list(request.finalize_fns), bytes=nbytes, state_s=t2 - t1, plan_s=t3 - t2,
                          copy_s=time.perf_counter() - t3)
        self.pending = job
        self.thread = threading.Thread(target=self._write, args=(job, transform_list, buckets, results_queue, during_write),
                                       name=f"checkpoint-writer-{name}", daemon=True)
        self.thread.start()
        job.blocked_s = time.perf_counter() - t0
        return job

    @staticmethod
    def _write(job: PendingSave, transform_list, buckets, results_queue, during_write) -> None:
        """The writer thread: each file with megatron-core's writer, then its digest; the results
        (or the error) go where megatron-core's finalization reads them."""
        t0 = time.perf_counter()
        write = _write_bucket_fn()
        outcome: Any = {}
        try:
            for i, bucket in enumerate(buckets):
                local: "queue.Queue" = queue.Queue()
                count: "queue.Queue" = queue.Queue()
                count.put(i)
                write(transform_list, i, bucket, local, count, use_fsync=True)
                _, result = local.get_nowait()
                if isinstance(result, BaseException):
                    raise result
                outcome[i] = result
                if i == 0 and during_write is not None:
                    during_write()
            names = [os.path.basename(path) for path, _, _ in buckets]
            job.digests = {n: {"size": os.path.getsize(os.path.join(job.tmp, n)),
                               "sha256": dcp_io.sha256_file(os.path.join(job.tmp, n))} for n in names}
        except BaseException as exc:  # reported on every rank by the collective finalization
            job.error, outcome = exc, exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
            logger.error("checkpoint writer for %s failed: %r", job.tmp, exc)
        finally:
            job.write_s = time.perf_counter() - t0
            if results_queue is not None:
                results_queue.put(outcome)
            job.done.set()

    # -- finish -----------------------------------------------------------------------------------
    def _all_done(self, done: bool) -> bool:
        """Whether no rank is still writing (one all-reduce)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return done
        flag = torch.tensor([0 if done else 1], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) == 0

    def poll(self) -> Optional[PendingSave]:
        """At a step boundary: publish the save in flight if every rank finished writing it; returns
        the published save (else None). No collective when nothing is in flight."""
        job = self.pending
        if job is None:
            return None
        if not self._all_done(job.done.is_set()):
            return None
        return self._finalize(job)

    def wait(self) -> Optional[PendingSave]:
        """Block until the save in flight is written on every rank, then publish it; returns it."""
        job = self.pending
        if job is None:
            return None
        t0 = time.perf_counter()
        job.done.wait()
        self._all_done(True)  # every rank reaches this point: the others' writes are done, too
        job.waited_s = time.perf_counter() - t0
        return self._finalize(job)

    def _finalize(self, job: PendingSave) -> PendingSave:
        """megatron-core's finalization (``.metadata``, ``metadata.json``; raises on every rank if a
        rank's write failed), then rank 0 publishes as a synchronous save does and points ``latest``
        at it."""
        self.pending = None
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        t0 = time.perf_counter()
        try:
            for fn in job.finalize_fns:
                fn()
            known = self._gather_digests(job.digests)
            if ckpt._rank() == 0:
                ckpt.publish(job.tmp, job.directory, job.model_config, job.extra, job.tokenizer, known_digests=known)
        except BaseException as exc:
            ckpt.abandon_save(job.tmp, job.error or exc, job.directory)
            raise
        ckpt.point_latest(job.root, job.name)
        ckpt._barrier()
        job.finalize_s = time.perf_counter() - t0
        return job

    @staticmethod
    def _gather_digests(digests: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        """Every rank's file digests on rank 0 (file names are unique across ranks)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return dict(digests)
        gathered: List[Any] = [None] * torch.distributed.get_world_size() if ckpt._rank() == 0 else None
        torch.distributed.gather_object(digests, gathered, dst=0)
        return {k: v for part in (gathered or []) for k, v in part.items()}

    def abandon(self) -> Optional[PendingSave]:
        """After an error (no collective is safe): leave the save in flight unpublished -- its
        ``.tmp-`` folder is removed by the next run's start-up; ``latest`` names the previous one."""
        job, self.pending = self.pending, None
        if job is not None:
            logger.warning("checkpoint %s was still being written when the run stopped with an error: not "
                           "published (latest stays at the previous checkpoint)", job.directory)
        return job


__all__ = ["AsyncSaver", "PendingSave", "require_support"]
