"""``PreprocessConfig``: every option of a preprocessing run (each field a flag and a YAML key of
``mmbert-preprocess``), and its own checks (:meth:`PreprocessConfig.validate`) -- the one home of every
check on the options alone; what needs a file (the language list, the inputs, the output folder) is
checked by ``run_preprocess``.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from megatron_mmbert.config_base import SAFE_NAME, ConfigError
from megatron_mmbert.data.sources import ReadOptions
from megatron_mmbert.data.tokenizer import Framing


@dataclasses.dataclass
class PreprocessConfig:
    """Everything a preprocessing run needs."""

    inputs: List[str]
    """Input files (.jsonl/.json/.ndjson[.gz|.zst], .parquet, .arrow, .txt[.gz|.zst]), a FineWeb2
    folder (data/{lang}_{Script}/train/*.parquet), a datasets save_to_disk folder, or any folder
    of such files."""
    output: str
    """Output folder: ``{lang}/{prefix}-{unit}.bin/.idx`` and ``manifest.json`` (a rerun resumes it)."""
    tokenizer: str
    """HF tokenizer folder or ``tokenizer.json``, a SentencePiece ``.model``, or a Hub id ``org/name[@revision]``."""
    read: ReadOptions = dataclasses.field(default_factory=ReadOptions)
    """Text / language fields, fixed language, plain-text mode, split."""
    framing: Framing = dataclasses.field(default_factory=Framing)
    """Tokens around each document (mmBERT: ``<bos> ... <eos>``)."""
    workers: int = 1
    """Worker processes (each single-threaded). 1 runs in this process."""
    strict: bool = False
    """Abort on the first bad input instead of skipping and reporting it."""
    chunk_bytes: int = 128 << 20
    """Target on-disk bytes per work unit (and so per shard); fixes the output layout."""
    prefix: str = "part"
    """Shard file name prefix."""
    split_sentences: bool = False
    """Split documents into sentences with nltk punkt (one sequence per sentence)."""
    nltk_language: str = "english"
    """Punkt model used with ``split_sentences``."""
    batch_docs: int = 512
    """Documents encoded per tokenizer call."""
    log_interval_s: float = 5.0
    """Seconds between progress lines on stderr."""
    max_bad_locations: int = 5
    """Locations of bad input kept per file."""
    max_bad_fraction: float = 0.01
    """Fail (non-zero exit) when more than this fraction of the records read was bad (skipped), or when an
    input yields no documents at all; checked after the manifest and the bad-input report are written.
    1.0 accepts anything (sources without documents are then only reported)."""
    num_shards: int = 1
    """Split the unit plan over this many separate tasks (a Slurm array, one node each); each does only
    its units and writes no manifest; ``finalize`` writes it once all are done."""
    shard_index: Optional[int] = None
    """This task's shard, 0-based, below ``num_shards`` (required when ``num_shards > 1``)."""
    finalize: bool = False
    """Run no unit: check that every unit of the plan is done (by the shard tasks) and write the manifest.
    Give the same inputs and options as the shard tasks, without the shard fields."""
    holdout_docs: int = 0
    """Hold out this many documents per language (the N smallest sha256 of their text; at most half of a
    language's documents) into ``OUT/heldout/`` with its own manifest, never into the training shards.
    Deterministic: the same documents whatever the workers, units or shard tasks. 0: none."""
    holdout_fraction: float = 0.0
    """Instead of ``holdout_docs``: hold out each document whose text's sha256, as a number in [0, 1), is below
    this fraction (no extra pass over the input; about this fraction of every language). 0: none."""
    language_list: str = "mmbert-1833"
    """Report which languages of this list the finished manifest lacks and which keys it has beyond it
    (``data/languages.py``): ``mmbert-1833`` (mmBERT's released 1,833), a file of codes, or ``none``."""

    @property
    def holdout(self) -> bool:
        return self.holdout_docs > 0 or self.holdout_fraction > 0

    @property
    def sharded(self) -> bool:
        """A shard task of a Slurm array (runs only its units, writes no manifest)."""
        return self.num_shards > 1

    def validate(self) -> None:
        """Refuse options that cannot work, every problem at once, each naming its field (a
        :class:`ConfigError`; a command line adds the flag). Reads no file (``language_list`` is read by
        ``run_preprocess``, before any work); ``config_base.from_dict`` runs it as the config is built and
        ``run_preprocess`` again, so a library caller gets the same checks as the command line."""
        errors = [ConfigError(message, field=field) for field, message in self._problems()]
        if errors:
            raise ConfigError.combine(errors)

    def _problems(self):
        """(field, message) for each option that cannot work."""
        if not SAFE_NAME.match(self.prefix):  # the same rule as a folder name: no "/", "..", absolute paths
            yield "prefix", f"prefix {self.prefix!r}: give a plain file-name prefix (letters, digits, _ . -)"
        for name in ("workers", "chunk_bytes", "batch_docs"):
            if getattr(self, name) < 1:
                yield name, f"{name} must be positive, got {getattr(self, name)}"
        if not self.max_bad_fraction >= 0:
            yield "max_bad_fraction", f"max_bad_fraction {self.max_bad_fraction}: give a fraction in [0, 1]"
        index_ok = isinstance(self.shard_index, int) and 0 <= self.shard_index < self.num_shards
        if self.num_shards < 1 or (self.sharded and not index_ok):
            yield "shard_index", (f"num_shards {self.num_shards}, shard_index {self.shard_index}: give N >= 1 and "
                                  "0 <= I < N (both, or neither)")
        elif not self.sharded and self.shard_index not in (None, 0):
            yield "num_shards", f"shard_index {self.shard_index} needs num_shards above it"
        if self.holdout_docs < 0 or not 0 <= self.holdout_fraction < 1:
            yield ("holdout_docs" if self.holdout_docs < 0 else "holdout_fraction",
                   f"holdout_docs {self.holdout_docs}, holdout_fraction {self.holdout_fraction}: give N >= 0 "
                   "documents per language, or a fraction in [0, 1)")
        elif self.holdout_docs and self.holdout_fraction:
            yield "holdout_fraction", ("holdout_docs and holdout_fraction are two ways to choose the held-out "
                                       "documents: give one of them")
        if self.sharded and self.finalize:
            yield "finalize", ("finalize runs after all shard tasks: give it the same options without "
                               "num_shards/shard_index")
