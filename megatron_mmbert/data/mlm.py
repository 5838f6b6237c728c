"""The MLM sample stream: packed rows of ``seq_len`` tokens, masked, as the Batch of
docs/interfaces.md.

Usage by a training loop::

    stream = MLMStream("data/manifest.json", phases, seed=21, cache_dir="data/index-cache",
                       default_global_batch_size=4608)
    n = stream.phase_num_samples("pretrain")               # rows in the phase
    for batch in stream.micro_batches("pretrain", consumed_samples, global_batch_size=4608,
                                      micro_batch_size=48, dp_rank=r, dp_size=world // mp):
        ...                                                # one micro-batch of this rank
    batch = stream.batch("pretrain", [0, 1, 2])           # any rows, by index in the phase

Rows. Sample ``i`` of a phase is packed row ``dataset_sample_index[i]`` of language
``dataset_index[i]`` (``megatron_mmbert.data.index``). With ``packing="concat"`` a row is
consecutive pieces of documents, a long document split across rows, and rows are always full. With
``packing="best_fit"`` whole pieces framed ``<bos> ... <eos>`` (the framing tokens the shards lack
are inserted here) are packed into *packed rows* of ``bin_rows x seq_len`` tokens followed by
padding where no piece fitted; sample rows are the packed row's ``seq_len`` slices, so with
``bin_rows`` = the micro-batch size (``data.packed_row: micro_batch``, the reference's geometry) a
micro-batch is one packed row and a piece may run on from one of its rows into the next, and with
``bin_rows = 1`` every row is whole pieces. Each piece is a segment of ``cu_seqlens`` (over the
micro-batch's flattened tokens: a piece that crosses rows is one segment) and its ``positions``
count from 0 at its ``<bos>`` (RoPE only sees differences inside a segment, so restarting at a split
changes nothing for attention and keeps positions below ``seq_len``). Padding is one more segment
of ``pad_id`` tokens (as the reference packer's last ``cu_seqlens`` entry): no real token attends
to it, it is never selected for masking and its labels are ignored, so it adds nothing to the loss.
A batch of rows that do not make up whole packed rows (any sample list) keeps each row's part of a
crossing piece as its own segment, positions continuing from where the piece's previous row ended.

Masking (mmBERT / BERT style). Every non-special token is selected with probability ``rate``
(special tokens are never selected unless ``mask_special_tokens``); of the selected, 80% become
``<mask>``, 10% a uniformly random id from the vocabulary minus every special id, 10% stay.
``labels`` hold the original id at selected positions and -100 elsewhere. The rate is the phase's
``mask_rate``, annealed linearly to ``mask_rate_end`` over the phase's samples when set.

Determinism. A row depends only on (seed, phase schedule, global sample index): its random numbers
come from a counter-based Philox generator keyed by the seed whose counter starts at
``global_index << 128``, so a resumed run, another process or another data-parallel layout sees
exactly the same tokens and masks. The global index is the sample's position in the whole
schedule (phase offsets added).

Data-parallel split. ``micro_batches`` walks global batches of ``global_batch_size`` consecutive
samples from ``consumed_samples`` (which must be a multiple of it); rank ``r`` of ``dp_size`` takes
the ``r``-th contiguous slice of each global batch and cuts it into micro-batches.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.data.index import DataIndex, PhaseIndex, build_data_index

IGNORE_INDEX = -100
"""Label of positions that are not predicted."""


def _load_manifest(manifest):
    if not isinstance(manifest, (str, os.PathLike)):
        return manifest
    from megatron_mmbert.data.shards import load_manifest

    return load_manifest(os.fspath(manifest))


class LanguageReader:
    """Token access to one language's documents over its shards (megatron-core ``IndexedDataset``)."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        self.prefixes = list(prefixes)
        self._datasets: List = [None] * len(self.prefixes)
        self._first_seq: List[Optional[np.ndarray]] = [None] * len(self.prefixes)
        counts = []
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        for k, prefix in enumerate(self.prefixes):
            ds = IndexedDataset(prefix)
            self._datasets[k] = ds
            self._first_seq[k] = np.asarray(ds.document_indices[:-1], dtype=np.int64)
            counts.append(len(ds.document_indices) - 1)
        self._doc_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def read(self, doc: int, offset: int, end: Optional[int]) -> np.ndarray:
        """Tokens ``[offset, end)`` of document ``doc`` (``end=None``: to the document's end)."""
        k = int(np.searchsorted(self._doc_start, doc, side="right") - 1)
        local = doc - int(self._doc_start[k])
        ds = self._datasets[k]
        first = int(self._first_seq[k][local])
        nxt = int(ds.document_indices[local + 1])
        doc_len = int(np.asarray(ds.sequence_lengths[first:nxt], dtype=np.int64).sum())
        stop = doc_len if end is None else end
        if stop <= offset:
            return np.zeros(0, dtype=np.int64)
        # A document's sequences are contiguous in the .bin: read across them from its first.
        return np.asarray(ds.get(first, offset=offset, length=stop - offset), dtype=np.int64)


class MLMStream:
    """Masked, packed rows for every phase of a schedule (see the module docstring)."""

    def __init__(
        self,
        manifest,
        phases: Sequence[PhaseConfig],
        seed: int,
        cache_dir: Optional[str] = None,
        default_global_batch_size: Optional[int] = None,
        anneal_segments: int = 64,
        mask_special_tokens: bool = False,
        replace_probs: Tuple[float, float, float] = (0.8, 0.1, 0.1),
        is_builder: Optional[bool] = None,
        timeout: float = 3600.0,
        index: Optional[DataIndex] = None,
        start_phase: int = 0,
        packing: str = "concat",
        bin_rows: Optional[Sequence[int]] = None,
    ) -> None:
        from megatron_mmbert.data.shards import phase_sources

        # Phases naming their own manifest: its languages become streams of the merged manifest.
        self.manifest, self.phases = phase_sources(_load_manifest(manifest), phases)
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if abs(sum(replace_probs) - 1.0) > 1e-9 or min(replace_probs) < 0:
            raise ValueError(f"replace_probs (mask, random, keep) must be >= 0 and sum to 1, got {replace_probs}")
        self.replace_probs = tuple(float(p) for p in replace_probs)
        self.mask_special_tokens = bool(mask_special_tokens)
        tok = self.manifest.tokenizer
        self.mask_id = tok.special_ids.get("mask")
        if self.mask_id is None:
            raise ValueError(f"tokenizer {tok.name!r} in the manifest has no mask token; MLM needs one")
        self.special_ids = np.array(sorted(set(int(i) for i in tok.all_special_ids) | {int(self.mask_id)}), dtype=np.int64)
        # Padding id (best_fit rows): never attended by real tokens nor predicted, so any id works;
        # the tokenizer's pad when it has one keeps dumps readable, else the mask id.
        pad = tok.special_ids.get("pad")
        self.pad_id = int(self.mask_id if pad is None else pad)
        self.bos_id = tok.special_ids.get("bos")
        self.eos_id = tok.special_ids.get("eos")
        self.random_ids = np.setdiff1d(np.arange(int(tok.vocab_size), dtype=np.int64), self.special_ids)
        if len(self.random_ids) == 0:
            raise ValueError("the vocabulary has no non-special id to use as a random replacement")
        self.index = index or build_data_index(
            self.manifest, self.phases, self.seed, cache_dir, default_global_batch_size, anneal_segments,
            is_builder=is_builder, timeout=timeout, start_phase=start_phase, packing=packing, bin_rows=bin_rows,
        )
        self._by_name: Dict[str, int] = {p.plan.phase.name: k for k, p in enumerate(self.index.phases)}
        self._offsets = np.concatenate([[0], np.cumsum([p.plan.num_samples for p in self.index.phases])])
        self._readers: Dict[int, LanguageReader] = {}

    # -- schedule ---------------------------------------------------------------------------------

    def _phase(self, phase: Union[str, int]) -> Tuple[int, PhaseIndex]:
        k = phase if isinstance(phase, int) else self._by_name.get(phase)
        if k is None or not 0 <= k < len(self.index.phases):
            raise KeyError(f"unknown phase {phase!r}; phases are {list(self._by_name)}")
        return k, self.index.phases[k]

    @property
    def phase_names(self) -> List[str]:
        return [p.plan.phase.name for p in self.index.phases]

    def phase_num_samples(self, phase: Union[str, int]) -> int:
        """Rows in ``phase``."""
        return self._phase(phase)[1].plan.num_samples

    def global_index(self, phase: Union[str, int], sample: int) -> int:
        """Position of a phase's sample in the whole schedule (the RNG counter)."""
        k, _ = self._phase(phase)
        return int(self._offsets[k]) + int(sample)

    def mask_rate(self, phase: Union[str, int], sample: int) -> float:
        """The phase's mask rate at ``sample``, linearly annealed when ``mask_rate_end`` is set."""
        _, p = self._phase(phase)
        cfg = p.plan.phase
        if cfg.mask_rate_end is None:
            return float(cfg.mask_rate)
        frac = sample / max(p.plan.num_samples - 1, 1)
        return float(cfg.mask_rate + (cfg.mask_rate_end - cfg.mask_rate) * frac)

    # -- rows ---------------------------------------------------------------------------------------

    def _reader(self, lang: int) -> LanguageReader:
        if lang not in self._readers:
            self._readers[lang] = LanguageReader(self.manifest.languages[self.index.languages[lang]].shards)
        return self._readers[lang]

    def row(self, phase: Union[str, int], sample: int) -> Tuple[np.ndarray, List[int], str]:
        """Unmasked row: (tokens int64 [seq_len], segment lengths, language). A best_fit row's
        padding is its last segment (:meth:`row_with_padding` says how long)."""
        tokens, segs, lang, _ = self.row_with_padding(phase, sample)
        return tokens, segs, lang

    def row_with_padding(self, phase: Union[str, int], sample: int) -> Tuple[np.ndarray, List[int], str, int]:
        """:meth:`row` and the number of padding tokens ending it (0 for concat rows)."""
        tokens, segs, lang, pad, _ = self._row(phase, sample)
        return tokens, segs, lang, pad

    def _row(self, phase: Union[str, int], sample: int) -> Tuple[np.ndarray, List[int], str, int, int]:
        """:meth:`row_with_padding` and the position of the row's first token in its piece (> 0 when
        a best_fit piece runs on from the previous row of its packed row)."""
        _, p = self._phase(phase)
        if not p.built:
            raise IndexError(
                f"phase {p.plan.phase.name!r} comes before this stream's start phase: it was planned "
                "(for the stream positions) but not built"
            )
        if not 0 <= sample < p.plan.num_samples:
            raise IndexError(f"sample {sample} outside phase {p.plan.phase.name!r} (0..{p.plan.num_samples - 1})")
        lang = int(p.dataset_index[sample])
        r = int(p.dataset_sample_index[sample])
        reader = self._reader(lang)
        parts, segs, start = [], [], 0
        if p.packing == "best_fit":
            for doc, off, end, flags, lo, hi in p.row_slices(lang, r):
                toks = reader.read(doc, off, end)
                framed = [[self.bos_id]] if flags & 1 else []
                framed.append(toks)
                if flags & 2:
                    framed.append([self.eos_id])
                toks = np.concatenate(framed).astype(np.int64)[lo:hi]
                if not parts:
                    start = lo
                parts.append(toks)
                segs.append(len(toks))
        else:
            for doc, off, end, _ in p.row_pieces(lang, r):
                toks = reader.read(doc, off, end)
                if len(toks):
                    parts.append(toks)
                    segs.append(len(toks))
        pad = p.plan.phase.seq_len - sum(segs)
        if p.packing == "best_fit" and pad > 0:
            parts.append(np.full(pad, self.pad_id, dtype=np.int64))
            segs.append(pad)
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if len(tokens) != p.plan.phase.seq_len:
            raise RuntimeError(
                f"row {sample} of phase {p.plan.phase.name!r} has {len(tokens)} tokens, expected "
                f"{p.plan.phase.seq_len}: the shards changed after the index was built; rebuild it"
            )
        return tokens, segs, self.index.languages[lang], max(pad, 0) if p.packing == "best_fit" else 0, start

    def _rng(self, global_index: int) -> np.random.Generator:
        return np.random.Generator(
            np.random.Philox(key=self.seed, counter=int(global_index) << 128)
        )

    def mask(self, tokens: np.ndarray, rate: float, global_index: int, padding: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """(masked tokens, labels) for one row; a pure function of its arguments and the stream's seed.
        The last ``padding`` tokens are never selected (mmBERT masks everything but padding)."""
        rng = self._rng(global_index)
        n = len(tokens)
        u = rng.random(n)
        if self.mask_special_tokens:
            candidate = np.ones(n, dtype=bool)
        else:
            candidate = ~np.isin(tokens, self.special_ids)
        if padding:
            candidate[n - padding:] = False
        selected = candidate & (u < rate)
        k = int(selected.sum())
        how = rng.random(k)
        replacement = self.random_ids[rng.integers(0, len(self.random_ids), size=k)]
        out = tokens.copy()
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        labels[selected] = tokens[selected]
        pm, pr, _ = self.replace_probs
        new = tokens[selected].copy()
        new[how < pm] = self.mask_id
        rand = (how >= pm) & (how < pm + pr)
        new[rand] = replacement[rand]
        out[selected] = new
        return out, labels

    def sample(self, phase: Union[str, int], sample: int) -> Dict[str, np.ndarray]:
        """One masked row as numpy arrays: tokens, labels, positions, segment lengths and ``start``
        (the first segment's first position: > 0 when it continues a piece of the previous row)."""
        tokens, segs, _, pad, start = self._row(phase, sample)
        g = self.global_index(phase, sample)
        masked, labels = self.mask(tokens, self.mask_rate(phase, sample), g, pad)
        positions = np.concatenate([np.arange(s, dtype=np.int64) + (start if j == 0 else 0)
                                    for j, s in enumerate(segs)])
        return {"tokens": masked, "labels": labels, "positions": positions, "segments": np.asarray(segs, np.int64),
                "start": start}

    def batch(self, phase: Union[str, int], sample_indices: Sequence[int]) -> Dict[str, object]:
        """The Batch dict of docs/interfaces.md for the given samples of ``phase``."""
        indices = [int(i) for i in sample_indices]
        rows = [self.sample(phase, i) for i in indices]
        if not rows:
            raise ValueError("batch needs at least one sample index")
        s = len(rows[0]["tokens"])
        bounds = [0]
        for r, row in enumerate(rows):
            if r and row["start"] > 0 and indices[r] == indices[r - 1] + 1:
                bounds.pop()  # the previous row's last piece runs on here: one segment
            ends = r * s + np.cumsum(row["segments"])
            bounds.extend(int(e) for e in ends)
        cu = np.asarray(bounds, dtype=np.int32)
        return {
            "tokens": torch.from_numpy(np.stack([r["tokens"] for r in rows])),
            "labels": torch.from_numpy(np.stack([r["labels"] for r in rows])),
            "positions": torch.from_numpy(np.stack([r["positions"] for r in rows])),
            "cu_seqlens": torch.from_numpy(cu),
            "max_seqlen": int(np.diff(cu).max()),
        }

    def micro_batches(
        self,
        phase: Union[str, int],
        consumed_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> Iterator[Dict[str, object]]:
        """This rank's micro-batches from ``consumed_samples`` (within the phase) to the phase's last
        whole global batch."""
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size "
                f"{micro_batch_size} x data-parallel size {dp_size}"
            )
        if consumed_samples % global_batch_size:
            raise ValueError(
                f"consumed_samples {consumed_samples} is not a multiple of global_batch_size {global_batch_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        n = self.phase_num_samples(phase)
        per_rank = global_batch_size // dp_size
        for start in range(consumed_samples, n - global_batch_size + 1, global_batch_size):
            mine = start + dp_rank * per_rank
            for m in range(0, per_rank, micro_batch_size):
                yield self.batch(phase, range(mine + m, mine + m + micro_batch_size))


__all__ = ["IGNORE_INDEX", "LanguageReader", "MLMStream"]
