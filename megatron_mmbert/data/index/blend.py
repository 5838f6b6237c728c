"""Blending, phase by phase: which language each sample of a phase comes from (``dataset_index``,
the C++ ``PhaseBlender``'s greedy largest-deficit interleave, resumable block by block) and which row
of that language it is (``dataset_sample_index``, derived block by block), both streamed into their
``.npy`` files (:func:`blend_phase`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from megatron_mmbert.data.index.npy import NpyAppender
from megatron_mmbert.data.schedule import PhasePlan
from megatron_mmbert.progress import Progress

BLEND_CHUNK = 1 << 18
"""Samples of ``dataset_index`` turned into ``dataset_sample_index`` and written at a time."""


def _occurrence_numbers(chunk: np.ndarray, seen: np.ndarray, dtype) -> np.ndarray:
    """``dataset_sample_index`` of a chunk of ``dataset_index``: for each sample, how many earlier
    samples of the phase came from its language (``seen``: those before the chunk, updated)."""
    order = np.argsort(chunk, kind="stable")  # each language's samples, in order
    lang = chunk[order].astype(np.int64)
    n = np.bincount(lang, minlength=len(seen))
    first = np.concatenate([[0], np.cumsum(n)[:-1]])  # where each language's run starts in `order`
    out = np.empty(len(chunk), dtype=dtype)
    out[order] = seen[lang] + np.arange(len(chunk)) - first[lang]
    seen += n
    return out


def blend_phase(ext, plan: PhasePlan, k: int, g: int, keep: bool, path,
                progress: Optional[Progress] = None) -> np.ndarray:
    """Blend phase ``k`` block by block (``_index_builder.PhaseBlender``: :data:`BLEND_CHUNK` samples at
    a time, the same values as one call over the phase), writing ``dataset_index`` and
    ``dataset_sample_index`` as they come when ``keep``; returns the counts per language (int64 [L]).
    ``progress`` (samples) advances by every block."""
    weights = np.ascontiguousarray(plan.segment_weights, dtype=np.float64)
    sizes = np.asarray(plan.segment_sizes, dtype=np.int64)
    if g > 1:  # blend packed rows of g rows: the segment boundaries in whole groups
        ends = np.cumsum(sizes) // g
        sizes = np.diff(np.concatenate([[0], ends])).astype(np.int64)
    if not hasattr(ext, "PhaseBlender"):  # an extension built from older csrc/
        raise ImportError(f"the C++ index builder {ext.__file__} is older than csrc/ (no PhaseBlender); rebuild "
                          "it: `python setup.py build_ext --inplace` in the repository root")
    # Samples per language are known only at the end: dataset_sample_index starts int32 and widens
    # (rewriting what was written) only if a language passes 2^31 rows in the phase.
    d_out = s_out = None
    blender = ext.PhaseBlender(weights, sizes)
    seen = np.zeros(weights.shape[1], dtype=np.int64)  # samples of each language before the block
    while blender.remaining:
        di = blender.next(max(BLEND_CHUNK // g, 1))
        if g > 1:  # every group is g consecutive rows of its language
            di = np.repeat(di, g)
        if d_out is None:
            d_out = NpyAppender(path(f"phase{k}_dataset_index"), di.dtype)
            s_out = NpyAppender(path(f"phase{k}_dataset_sample_index"), np.int32, wide=np.int64)
        if keep:
            d_out.append(di)
            s_out.append(_occurrence_numbers(di, seen, np.int64))
        if progress is not None:
            progress.advance(len(di), f"blending phase {k}")
    if d_out is None:  # an empty phase
        dtype = np.int16 if weights.shape[1] <= np.iinfo(np.int16).max else np.int32
        d_out = NpyAppender(path(f"phase{k}_dataset_index"), dtype)
        s_out = NpyAppender(path(f"phase{k}_dataset_sample_index"), np.int32, wide=np.int64)
    d_out.close()
    s_out.close()
    counts = blender.counts() * g
    if progress is not None and progress.done < progress.total:  # (the last block's line says 100%)
        progress.advance(0, f"blended phase {k} over {weights.shape[1]} languages", force=True)
    return counts


__all__ = ["BLEND_CHUNK", "blend_phase"]
