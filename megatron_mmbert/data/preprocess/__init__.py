"""Raw text -> per-language Megatron shards + manifest, in parallel, resumable and deterministic.

The run rests on one invariant -- a unit's id and bytes depend on the inputs and options only -- that
the plan, the workers, resume, shard tasks and the held-out split each rely on. Readers, tokenizers and
the shard format live in ``data/sources.py``, ``data/tokenizer.py`` and ``data/shards.py``. One subject
per module:

==================  ==========================================================================================
``config.py``       ``PreprocessConfig`` (every option) and its own checks (``validate``)
``errors.py``       ``PreprocessError`` (a ``ConfigError``: the run refuses its input or output),
                    ``BadInputFractionError``
``layout.py``       the names of the output's state files (``OUT/.preprocess/``) and their writer
``units.py``        work units: the plan cut from the input's segments, unit ids (``unit_fingerprint``)
``holdout.py``      which documents are held out: content hash, rule, ``holdout_docs`` selection
``holdout_scan.py`` the ``holdout_docs`` first pass over the units, cached; the recorded selection
``sharding.py``     a Slurm array: units dealt to shard tasks, the task's shard from ``SLURM_ARRAY_TASK_*``
``pool.py``         worker processes (spawned, dying with their parent) or this process
``counters.py``     counters the workers share and the progress line (``megatron_mmbert.progress``)
``workers.py``      one unit's documents encoded, framed and written; the pending units run
``markers.py``      resume: unit markers written, read, forgotten when a shard is lost; overlap refused
``output.py``       output-folder checks (not an input, ours, one tokenizer), removal of our partial files
``locks.py``        who may write an output at once (one run, or one array's shard tasks)
``finalize.py``     manifests from the markers, the bad-input report and checks, the finalize job's check
``run.py``          ``run_preprocess``: the steps in order, ``PreprocessResult``
==================  ==========================================================================================

Flow (``run_preprocess``):

1. Check the options (each section's ``validate``; the language list read). Load the tokenizer; refuse
   an output folder that already holds shards of another tokenizer or framing
   (``OUT/.preprocess/state.json`` and ``OUT/manifest.json`` record them). Its files are copied into
   the output (:func:`megatron_mmbert.checkpoints.layout.store_tokenizer`).
2. Discover the inputs and plan *work units*: segments of about ``chunk_bytes`` (byte ranges of JSONL,
   row-group runs of Parquet); consecutive small segments of one language are packed into one unit. A
   unit's id hashes its segments (path, range, size, mtime) and every option that changes its tokens, so
   the plan and the shard names depend on the inputs only, never on the worker count or scheduling order.
3. Each pending unit is run by a worker process: it reads its documents in file order, encodes them in
   batches, frames them and writes one shard per language it meets, ``OUT/{lang}/{prefix}-{id}``
   (``.bin``/``.idx`` via ``ShardWriter``: ``.partial`` files renamed when complete). Only then is the
   unit's marker ``OUT/.preprocess/units/{id}.json`` (counts, bad-input report) written atomically.
4. The manifest is rebuilt from all unit markers (this run's and earlier runs') and written atomically;
   the bad-input report is printed.

Resume: a unit is done iff its marker exists. A killed run leaves ``.partial`` files (removed on the next
run) and possibly renamed shards of an unmarked unit (rewritten, byte-identically, on the next run); the
manifest never names a shard of an unfinished unit. Because units and their contents are deterministic,
a killed-and-rerun preprocess produces the same bytes as an uninterrupted one.

Shards are never merged: a language's shard set is the list of its units' prefixes (see ``shards.py``),
so the data is written exactly once.

Many nodes (a Slurm array): the plan is the same in every process, so ``num_shards``/``shard_index``
(read from ``SLURM_ARRAY_TASK_*`` when set) deal its units out to N tasks (``assign_shards``: biggest
first, each to the least-loaded shard). A shard task runs only its units and writes no manifest; tasks
hold the output lock shared plus their own shard lock, and touch only their own units' files, so they
run side by side. ``finalize`` then runs no unit: it checks that every unit of the plan has its marker
(naming the missing ones and the shard task that owns them) and writes the manifest, the same bytes a
one-process run writes.

Held-out data (``holdout_docs`` / ``holdout_fraction``): documents chosen by the sha256 of their
normalised text go to ``OUT/heldout/{lang}/`` with their own ``OUT/heldout/manifest.json`` (same format)
and never into the training shards; the rule and the selection are described in ``holdout.py``, the
first pass that ``holdout_docs`` needs in ``holdout_scan.py``. Both depend on the inputs only, never on
workers, units or shard tasks.

Bad input is loud when it is most of the input: a source that yields no document is an error naming it,
the keys looked for and the keys it has; more than ``max_bad_fraction`` of bad records is an error. Both
are raised (``BadInputFractionError``) after the manifest and the report are written, so nothing done is
lost and a rerun with fixed options resumes.
"""

from megatron_mmbert.data.preprocess.config import PreprocessConfig
from megatron_mmbert.data.preprocess.errors import BadInputFractionError, PreprocessError
from megatron_mmbert.data.preprocess.holdout import HASH_RULE, HoldoutRule, doc_hash, normalize_text, select_heldout
from megatron_mmbert.data.preprocess.run import PreprocessResult, run_preprocess
from megatron_mmbert.data.preprocess.sharding import assign_shards, slurm_array_shard
from megatron_mmbert.data.preprocess.units import WorkUnit, plan_units

__all__ = [
    "BadInputFractionError", "HASH_RULE", "HoldoutRule", "PreprocessConfig", "PreprocessError", "PreprocessResult",
    "WorkUnit", "assign_shards", "doc_hash", "normalize_text", "plan_units", "run_preprocess", "select_heldout",
    "slurm_array_shard",
]
