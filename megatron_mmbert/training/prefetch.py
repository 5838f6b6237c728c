"""Batches built ahead: the next step's micro-batches are assembled in a background thread while
this step trains, so the step never waits for the data (``data_wait_s`` near zero).

A step's micro-batches are a pure function of (phase, first row, rows): the rows come from the
phase's index, the masks from a generator seeded by each row's global index (``data/mlm.py``). So
building them early changes nothing a step sees, and a stop, a crash or a resume simply drops
the one step built ahead -- the exact-resume guarantee is untouched. One worker thread, one step
ahead; the main thread never builds while the worker does (a stale build is waited for and
discarded), so the stream is never used from two threads at once.

Each batch is also prepared for the device here (:func:`prepare`): the labelled tokens' indices
and count come from the CPU labels (on the device finding them is a host sync in every
micro-batch), and on CUDA the tensors are pinned so that ``to_device``'s non-blocking copies are
truly asynchronous.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch

from megatron_mmbert.model.encoder import labelled_token_index


def prepare(batch: Dict, pin: bool = False) -> Dict:
    """``batch`` plus ``label_index`` (the labelled tokens in the model's order) and ``label_count``
    (int32 scalar), computed on the CPU; with ``pin`` every tensor in pinned memory."""
    if "label_index" not in batch:
        index = labelled_token_index(batch["labels"])
        batch = dict(batch, label_index=index, label_count=torch.tensor(index.numel(), dtype=torch.int32))
    if pin:
        batch = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in batch.items()}
    return batch


class BatchPrefetcher:
    """Builds ``build(key)`` one step ahead on a worker thread; ``get(key)`` returns it (or builds
    it here when nothing, or something else, was built ahead)."""

    def __init__(self, build: Callable[[Hashable], List[Dict]]):
        self.build = build
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._pending: Optional[Tuple[Hashable, Future]] = None
        self.hits = 0
        """Steps whose batches were ready (or being built) when asked for."""

    def ahead(self, key: Hashable) -> None:
        """Start building ``key``'s batches (the next step's)."""
        self._drop()
        self._pending = (key, self._pool.submit(self.build, key))

    def get(self, key: Hashable) -> List[Dict]:
        if self._pending is not None and self._pending[0] == key:
            future = self._pending[1]
            self._pending = None
            self.hits += 1
            return future.result()  # a build error surfaces here, on the main thread
        self._drop()
        return self.build(key)

    def _drop(self) -> None:
        if self._pending is not None:
            future = self._pending[1]
            self._pending = None
            try:
                future.result()  # never two builds at once
            except Exception:  # noqa: BLE001 -- a build nobody asked for; the real one will raise
                pass

    def close(self) -> None:
        self._drop()
        self._pool.shutdown(wait=True)


__all__ = ["BatchPrefetcher", "prepare"]
