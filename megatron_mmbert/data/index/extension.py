"""The compiled C++ index builder, ``megatron_mmbert.data._index_builder`` (built by ``setup.py`` from
``csrc/index_builder.cpp`` next to ``data/``): loading it with a message that says how to build it,
and the dtype-checked wrappers of its one-call functions (blending, concat packing, best-fit packing),
plus a language's shuffle stream id. The resumable block-by-block classes (``PhaseBlender``,
``RowPacker``, ``BestFitPacker``) are used straight from :func:`load_extension` by
:mod:`~megatron_mmbert.data.index.blend` and :mod:`~megatron_mmbert.data.index.pack`."""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from megatron_mmbert.data.index.packing import (
    BEST_FIT_BUFFER,
    BEST_FIT_LOOKAHEAD_ROWS,
    BEST_FIT_MIN_PIECE,
    BEST_FIT_WINDOW_ROWS,
)


def load_extension():
    """The ``_index_builder`` module, or an ImportError saying how to build it."""
    try:
        from megatron_mmbert.data import _index_builder
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(
            "the C++ index builder megatron_mmbert.data._index_builder is not built; run "
            "`python setup.py build_ext --inplace` (or `pip install --no-build-isolation -e .`) "
            f"in the repository root ({e})"
        ) from e
    return _index_builder


def _check(name: str, arr, dtype, ndim: int) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of {np.dtype(dtype).name}, got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {arr.dtype} (use .astype)")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def build_blending_indices(
    weights: np.ndarray,
    segment_sizes: np.ndarray,
    segment_phase: Optional[np.ndarray] = None,
    algorithm: str = "fast",
):
    """Blend by segments: ``weights`` float64 [K, L], ``segment_sizes`` int64 [K],
    ``segment_phase`` int64 [K] (default: one phase). Returns ``(dataset_index, dataset_sample_index,
    counts [phases, L])``. ``algorithm="scan"`` is the O(N x L) reference loop."""
    weights = _check("weights", weights, np.float64, 2)
    segment_sizes = _check("segment_sizes", segment_sizes, np.int64, 1)
    if segment_phase is None:
        segment_phase = np.zeros(len(segment_sizes), dtype=np.int64)
    segment_phase = _check("segment_phase", segment_phase, np.int64, 1)
    di, dsi, counts, _ = load_extension().build_blending_indices(weights, segment_sizes, segment_phase, algorithm)
    return di, dsi, counts


def language_stream(name: str) -> int:
    """The shuffle stream id of a language: stable across manifests (sha256 of its name)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def pack_rows(sizes: np.ndarray, seq_len: int, num_rows: int, start_token: int, seed: int, stream: int):
    """Packed rows of one language: ``(doc_index int32, sample_idx int64 [rows + 1, 2], first_epoch)``."""
    sizes = _check("sizes", sizes, np.int32, 1)
    return load_extension().pack_rows(sizes, int(seq_len), int(num_rows), int(start_token), int(seed), int(stream))


def pack_best_fit(sizes: np.ndarray, framing: np.ndarray, seq_len: int, num_rows: int, start_token: int,
                  seed: int, stream: int, bin_rows: int = 1, window: int = BEST_FIT_WINDOW_ROWS,
                  buffer: int = BEST_FIT_BUFFER, lookahead: int = BEST_FIT_LOOKAHEAD_ROWS,
                  min_piece: int = BEST_FIT_MIN_PIECE):
    """``num_rows`` best-fit packed rows of ``bin_rows x seq_len`` tokens of one language: ``(pieces
    int32 [P, 3], piece_flags int8 [P], row_ptr int64 [num_rows + 1], end_token, stats)``.
    ``framing`` (int8 [D], :func:`~megatron_mmbert.data.index.documents.framing_flags`): 1 where a
    stored document starts with ``<bos>``, 2 where it ends with ``<eos>``; ``start_token`` must be a
    document boundary of the stream."""
    sizes = _check("sizes", sizes, np.int32, 1)
    framing = _check("framing", framing, np.int8, 1)
    return load_extension().pack_best_fit(sizes, framing, int(seq_len), int(num_rows), int(start_token), int(seed),
                                          int(stream), int(bin_rows), int(window), int(buffer), int(lookahead),
                                          int(min_piece))


__all__ = ["load_extension", "build_blending_indices", "language_stream", "pack_rows", "pack_best_fit"]
