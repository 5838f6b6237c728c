"""A test oracle: the packing loop of bert24 / ModernBERT's ``GreedyBestFitSequencePacker`` (the
loader mmBERT trained with), re-implemented from its public description
(github.com/AnswerDotAI/ModernBERT ``src/sequence_packer.py``; mmBERT, arXiv:2509.06888, sec. 2):

* ``from_composer(batch_size, micro_batch_size, max_seq_len, buffer_size=5120)`` packs into
  ``batch_size / micro_batch_size`` packed rows of ``micro_batch_size x max_seq_len`` tokens each,
  all open at once (one outgoing device batch);
* a deque ``buffer`` of incoming sequences is refilled ``src_batch_size`` sequences at a time (empty
  ones skipped) while ``buffer_size - len(buffer) > src_batch_size``, and never by more than
  ``buffer_size - len(deferred)``;
* each popped sequence goes to the row with the least room that still holds it (ties: the lowest
  row), else it is deferred; the batch closes when a refill adds nothing, and the deferred
  sequences go back to the front of the buffer (``deque.extendleft``, so in reverse order);
* a batch with an empty row ends the stream (it is not emitted).

Sequences are framed as the reference frames them (every sequence ``<bos> ... <eos>``, at most
``max_seq_len`` tokens): :func:`reference_sequences` cuts a document's content every ``max_seq_len -
2`` tokens and drops non-first pieces under ``min_piece`` content tokens (mmBERT).
"""

from collections import deque
from typing import Iterable, Iterator, List, Sequence, Tuple


def reference_pieces(content_length: int, max_seq_len: int, min_piece: int = 32) -> List[Tuple[int, int]]:
    """``(content offset, length with <bos> and <eos>)`` of the sequences one document becomes."""
    cmax = max_seq_len - 2
    out = []
    for a in range(0, content_length, cmax):
        piece = min(cmax, content_length - a)
        if a and piece < min_piece:
            continue
        out.append((a, piece + 2))
    return out


def reference_sequences(content_lengths: Iterable[int], max_seq_len: int, min_piece: int = 32) -> Iterator[int]:
    """Lengths (framing included) of the sequences the documents of ``content_lengths`` become."""
    for n in content_lengths:
        for _, length in reference_pieces(n, max_seq_len, min_piece):
            yield length


class ReferenceGreedyBestFitPacker:
    """The reference loop over sequence lengths (tokens do not change where a sequence goes)."""

    def __init__(self, lengths: Iterable[int], batch_size: int, micro_batch_size: int, max_seq_len: int,
                 buffer_size: int = 5120):
        if buffer_size < batch_size // micro_batch_size:
            raise ValueError("buffer_size must be >= the number of packed rows per batch")
        self.src = iter(lengths)
        self.src_batch_size = batch_size
        self.out_rows = batch_size // micro_batch_size
        self.row_tokens = micro_batch_size * max_seq_len
        self.buffer_size = buffer_size
        self.buffer: deque = deque()

    def _fill(self, limit: int) -> int:
        added = 0
        while self.buffer_size - len(self.buffer) > self.src_batch_size:
            if added + self.src_batch_size > limit:
                break
            batch = [x for _, x in zip(range(self.src_batch_size), self.src)]
            if not batch:
                break
            for n in batch:
                if n > 0:
                    self.buffer.append(n)
                    added += 1
        return added

    def batches(self) -> Iterator[Tuple[List[List[int]], List[int]]]:
        """``(rows, room)`` per emitted batch: each row's sequence lengths, and its padding."""
        while True:
            rows: List[List[int]] = [[] for _ in range(self.out_rows)]
            room = [self.row_tokens] * self.out_rows
            deferred: List[int] = []
            while True:
                if not self.buffer and self._fill(self.buffer_size - len(deferred)) == 0:
                    break
                n = self.buffer.popleft()
                best = -1
                for r in range(self.out_rows):
                    if room[r] >= n and (best < 0 or room[r] < room[best]):
                        best = r
                if best < 0:
                    deferred.append(n)
                else:
                    rows[best].append(n)
                    room[best] -= n
            self.buffer.extendleft(deferred)
            if not all(rows):
                return
            yield rows, room


def reference_padding(lengths: Sequence[int], batch_size: int, micro_batch_size: int, max_seq_len: int,
                      num_batches: int, buffer_size: int = 5120) -> float:
    """Padding fraction of the first ``num_batches`` batches the reference packs from ``lengths``."""
    packer = ReferenceGreedyBestFitPacker(lengths, batch_size, micro_batch_size, max_seq_len, buffer_size)
    pad = total = 0
    for b, (_, room) in zip(range(num_batches), packer.batches()):
        pad += sum(room)
        total += len(room) * packer.row_tokens
    if not total:
        raise ValueError("the documents do not fill one batch")
    return pad / total
