"""Worker processes: a function over items, in this process or in a pool of spawned workers that die
with their parent.

Used by both passes of a run (the held-out scan and the units themselves). ``spawn``: a worker never
inherits a tokenizer whose thread pool was already used (fork-unsafe). Each worker is single-threaded;
the parallelism is across workers.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Iterator, Optional, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def die_with_parent() -> None:
    """Linux: a worker whose parent was killed dies too, instead of finishing its unit while a rerun
    is already rewriting the same files."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_worker(init: Callable[..., None], initargs: tuple) -> None:
    die_with_parent()
    init(*initargs)


def map_unordered(fn: Callable[[T], R], items: Sequence[T], workers: int, init: Callable[..., None],
                  initargs: tuple = (), on_wait: Optional[Callable[[], None]] = None, wait_s: float = 1.0
                  ) -> Iterator[R]:
    """``fn(item)`` for every item, results as they finish. ``workers <= 1``: in this process, in order,
    after ``init(*initargs)`` here; else a spawned pool of ``min(workers, len(items))`` processes, each
    started with ``init(*initargs)``, one item at a time (biggest first is the caller's order), calling
    ``on_wait`` every ``wait_s`` seconds while no result arrives. ``fn`` and ``init`` must be module-level
    functions (the workers import them)."""
    if not items:
        return
    if workers <= 1:
        init(*initargs)
        for item in items:
            yield fn(item)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(items)), initializer=_start_worker, initargs=(init, initargs)) as pool:
        results = pool.imap_unordered(fn, items, chunksize=1)
        for _ in range(len(items)):
            while True:
                try:
                    result = results.next(timeout=wait_s)
                    break
                except mp.TimeoutError:
                    if on_wait is not None:
                        on_wait()
            yield result
        pool.close()
        pool.join()
