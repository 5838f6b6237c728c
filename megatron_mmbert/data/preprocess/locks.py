"""Who may write an output at once: one run (or ``finalize``) alone, or the shard tasks of one Slurm array
side by side.

A one-process run or ``finalize`` holds ``OUT/.preprocess/lock`` exclusively; a shard task holds it
shared plus its own ``lock.shard-{i}-of-{n}`` exclusively, and touches only its own units' files. Tasks of
arrays with different shard counts are refused (the two deals would give one unit to two tasks). Lock
files are never opened through a link, never truncated (``fileio.open_lock_file``).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
from typing import Iterator, List, Optional

from megatron_mmbert.data.preprocess import layout
from megatron_mmbert.data.preprocess.errors import PreprocessError
from megatron_mmbert.fileio import LockFileRefused, open_lock_file


def open_lock(path: str) -> int:
    """A lock file of the output (never through a link, never truncated; see ``fileio.open_lock_file``)."""
    try:
        return open_lock_file(path)
    except LockFileRefused as exc:
        raise PreprocessError(str(exc), field="output") from None


@contextlib.contextmanager
def hold_output(output: str, num_shards: int, shard_index: Optional[int]) -> Iterator[None]:
    """Hold ``output`` for this run (alone, or as shard ``shard_index`` of ``num_shards`` beside the
    array's other tasks) until the block ends; refuse when another run holds it."""
    sharded = num_shards > 1
    fds: List[int] = []
    try:
        fds.append(open_lock(layout.state_path(output, "lock")))
        try:
            fcntl.flock(fds[0], (fcntl.LOCK_SH if sharded else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            if sharded:
                fds.append(open_lock(layout.state_path(output, layout.shard_lock_name(shard_index, num_shards))))
                fcntl.flock(fds[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = f"shard {shard_index} of {num_shards} of " if len(fds) > 1 else ""
            raise PreprocessError(f"another preprocess is writing {what}{output} (a one-process run or finalize "
                                  "excludes shard tasks); wait for it to finish") from None
        if sharded:
            _refuse_other_shard_counts(output, num_shards)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)


def _refuse_other_shard_counts(output: str, num_shards: int) -> None:
    """Tasks of arrays with different shard counts would deal the same unit to two tasks at once."""
    pattern = os.path.join(glob.escape(output), layout.STATE_DIR, "lock.shard-*-of-*")
    for path in sorted(glob.glob(pattern)):
        if path.endswith(f"-of-{num_shards}"):
            continue
        fd = open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PreprocessError(
                f"shard tasks with num_shards={path.rsplit('-of-', 1)[1]} are writing {output}; every task of "
                f"one output must use the same num_shards (this one has {num_shards})", field="num_shards"
            ) from None
        finally:
            os.close(fd)
