"""What a shard's documents start and end with: the ``framing`` record of a manifest's language
(:class:`DocumentFraming`: how many documents start with ``<bos>`` / end with ``<eos>``) and its count
over documents as they are written (:func:`count_framed`, ``shards.ShardWriter.framing``). The index
build reads it instead of every document's first and last token (``data/index/framing_record.py``)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np


@dataclasses.dataclass
class DocumentFraming:
    """How many of a language's stored documents start with ``<bos>`` and end with ``<eos>``, counted by
    preprocessing as it wrote them (``ShardWriter.framing``), so the index build need not read every
    document's first and last token from the ``.bin`` (``data/index/documents.py: framing_flags``)."""

    bos: Optional[int]
    """The ``<bos>`` id counted (the tokenizer's; None: it has none, and ``starts_bos`` is 0)."""
    eos: Optional[int]
    """The ``<eos>`` id counted (the tokenizer's; None: it has none, and ``ends_eos`` is 0)."""
    starts_bos: int
    """Documents whose first stored token is ``bos``."""
    ends_eos: int
    """Documents whose last stored token is ``eos``."""

    def to_json(self) -> dict:
        return {"bos": self.bos, "eos": self.eos, "starts_bos": int(self.starts_bos), "ends_eos": int(self.ends_eos)}

    @classmethod
    def from_json(cls, obj: dict) -> "DocumentFraming":
        return cls(bos=None if obj["bos"] is None else int(obj["bos"]),
                   eos=None if obj["eos"] is None else int(obj["eos"]),
                   starts_bos=int(obj["starts_bos"]), ends_eos=int(obj["ends_eos"]))


def count_framed(tokens: np.ndarray, lengths: np.ndarray, per_doc: np.ndarray, bos: Optional[int],
                 eos: Optional[int]) -> Optional[Tuple[int, int]]:
    """``(documents whose first stored token is bos, documents whose last is eos)`` of a batch (flat
    ``tokens``, ``lengths`` per sequence, ``per_doc`` sequences per document), exactly as the index reads
    them (``data/index/documents.py``: a document's first token is its first sequence's, its last token its
    last sequence's; an empty sequence has none). None for a document of no sequences (preprocessing never
    writes one; the index would read the next document's first token for it)."""
    if (per_doc < 1).any():
        return None
    seq_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    last_seq = np.cumsum(per_doc) - 1
    first_seq = last_seq - per_doc + 1
    starts = ends = 0
    if bos is not None:
        ok = lengths[first_seq] > 0
        starts = int((tokens[seq_start[first_seq[ok]]] == bos).sum())
    if eos is not None:
        ok = lengths[last_seq] > 0
        ends = int((tokens[seq_start[last_seq[ok]] + lengths[last_seq[ok]] - 1] == eos).sum())
    return starts, ends


__all__ = ["DocumentFraming", "count_framed"]
