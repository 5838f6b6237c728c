"""The data index: which language and which packed row every training sample reads, for a whole
schedule, built by the C++ index builder (``csrc/index_builder.cpp``) and cached.

The package, one subject a module (imported from here: the public names below):

* :mod:`.extension` -- the compiled ``megatron_mmbert.data._index_builder`` (built by setup.py next
  to ``data/``), loading it and its dtype-checked one-call wrappers;
* :mod:`.packing` -- the packing modes, best_fit's constants, the framing bits, the packing checks;
* :mod:`.documents` -- per-document lengths, first tokens and framing flags read from the shards;
* :mod:`.npy` -- ``.npy`` files written block by block (:class:`NpyAppender`);
* :mod:`.blend` -- a phase's blending, streamed; :mod:`.pack` -- a language's packed rows, streamed;
* :mod:`.build` -- the build of every array (:func:`build_arrays`), languages on threads;
* :mod:`.digests` -- the cache key and the manifests' digests;
* :mod:`.cache` -- :func:`build_data_index`: the cache folder read, or built by one rank and published;
* :mod:`.arrays` -- the reader's view (:class:`DataIndex`, :class:`PhaseIndex`);
* :mod:`.plan` -- ``index_plan.json``: its writer and its typed reader (:class:`IndexPlan`);
  :mod:`.plan_format` -- the plan as text;
* :mod:`.prebuild` -- the index built ahead of launch (``mmbert-build-index``): ``BuildIndexConfig``
  and ``prebuild_index``, the library entry with every check the command line makes.

What gets built for a manifest and a list of phases (``build_data_index``):

* per phase ``k``: ``dataset_index`` (int16, or int32 beyond 32767 languages: which language
  each of the phase's samples comes from) and ``dataset_sample_index`` (int32, int64 past 2^31 rows: which packed row
  of that language, counted from the language's first row in this phase), from the greedy
  largest-deficit interleave of ``_index_builder.build_blending_indices``. For a phase with fixed
  weights this is megatron-core's ``helpers_cpp.build_blending_indices`` bit for bit; every
  language's count stays within one sample of its (cumulative, piecewise-constant) target at every
  prefix of the phase, and languages with weight 0 never appear. Deficits restart at each phase.
* per phase and language: the packed rows (``_index_builder.pack_rows``). Each language is an
  endless stream of epochs, epoch ``e`` being its documents (all shards, shard order) shuffled by
  ``permutation(D, seed, stream=hash(language), epoch=e)`` (numpy's ``Generator(PCG64)
  .permutation`` bit for bit, for the documented seeding), cut into rows of the phase's
  ``seq_len``. Phases continue each language's stream where the previous phase stopped, so no
  document repeats before an epoch is used up. A row is ``sample_idx[r] .. sample_idx[r + 1]``
  over ``doc_index`` (megatron GPT ``build_sample_idx`` convention). This is ``packing="concat"``.
* ``packing="best_fit"`` (mmBERT / ModernBERT / Ettin's ``GreedyBestFitSequencePacker``,
  github.com/AnswerDotAI/ModernBERT ``src/sequence_packer.py``): the same document stream, but each
  document's content (its tokens without the shard's own ``<bos>`` / ``<eos>``) is cut every
  ``seq_len - 2`` tokens into pieces framed ``<bos> ... <eos>`` as the reference frames every
  sequence (the shard's own ``<bos>`` / ``<eos>`` are kept where a piece has them, the missing ones
  added by the reader; non-first pieces with fewer than :data:`BEST_FIT_MIN_PIECE` content tokens
  are dropped), and whole pieces are best-fit packed into *packed rows* of ``bin_rows x seq_len``
  tokens (``_index_builder.pack_best_fit``: :data:`BEST_FIT_WINDOW_ROWS` packed rows open at a
  time, up to :data:`BEST_FIT_BUFFER` pieces deferred per window, reading ahead at most
  :data:`BEST_FIT_LOOKAHEAD_ROWS` ``seq_len`` rows' worth of deferred tokens plus half the room of
  the packed rows after the window). ``bin_rows`` is the
  phase's micro-batch size (``data.packed_row: micro_batch``, the reference's geometry: one packed
  row is one micro-batch, a piece may continue from one ``seq_len`` row of it into the next) or 1
  (``data.packed_row: seq_len``: pieces never cross rows, for attention that works row by row).
  Room no piece fills is padding, at the end of the packed row. Packed row ``b`` is
  ``pieces[row_ptr[b] .. row_ptr[b + 1]]``, each piece ``(document, offset, stored tokens)`` plus
  ``piece_flags`` (1: a ``<bos>`` is prepended, 2: an ``<eos>`` appended); sample rows
  ``b x bin_rows .. + bin_rows - 1`` of the language are its ``seq_len`` slices. The blending then
  draws whole packed rows: a language's ``bin_rows`` rows are consecutive samples, aligned to
  ``bin_rows``, so every micro-batch is one packed row. The stream advances by the documents the
  packer took (pieces still waiting for a row when the phase's rows are done are dropped), so every
  phase, and every branch starting at one, begins on a document boundary with nothing pending.

Branches. ``start_phase=k`` (a run that starts at phase ``k``, e.g. a decay variant starting from
its parent's ``phase_end_mid``) plans and blends every phase but packs and stores only phases
``k..``: each language's stream starts at the token where the full schedule would be at phase ``k``
(``first_token``), and sample numbers (the masking RNG counters) keep their offsets, so a branch
that keeps its parent's phase list reads its parent's rows for the phases they share.

The plan. :func:`index_plan` describes the index as JSON (``index_plan.json`` in the cache folder:
per phase and language its rows, tokens, first token and epochs; :mod:`.plan` lists the fields);
:func:`format_index_plan` prints it and :class:`IndexPlan` reads it typed. Training checkpoints carry
a phase's end positions so a branch can be checked against its parent.

Caching: the arrays are ``.npy`` files in ``{cache_dir}/mmbert-index-{key}/`` where ``key`` hashes
everything they depend on (manifest content including the tokenizer hash and each shard's index
size, phases, seed, default global batch size, annealing resolution, packing, builder version). One
rank builds (global rank 0 by default) into a temporary folder published whole when complete
(``fileio.publish_new_directory``); the others poll for it and give up after ``timeout`` seconds with
a message naming the folder and the command that prebuilds it (``tools/build_data_index.py``).

Memory: :func:`build_arrays` streams each array into its ``.npy`` file in blocks (the blending of a
phase and the packing of a language's phase both resumable, ``_index_builder.PhaseBlender`` /
``RowPacker`` / ``BestFitPacker``), languages on ``threads`` threads, so what the build holds does not
grow with the schedule; see docs/data.md "Cache".
"""

from megatron_mmbert.data.index.arrays import ARRAY_NAMES, DataIndex, PhaseIndex
from megatron_mmbert.data.index.build import (
    LANGUAGE_DOCUMENT_COST,
    THREAD_DOCUMENT_BUDGET,
    build_arrays,
    default_threads,
    language_schedule,
)
from megatron_mmbert.data.index.cache import build_data_index, default_rank
from megatron_mmbert.data.index.digests import INDEX_VERSION, cache_key, manifest_digest, source_digests
from megatron_mmbert.data.index.documents import document_first_tokens, document_lengths, framing_flags
from megatron_mmbert.data.index.extension import build_blending_indices, language_stream, pack_best_fit, pack_rows
from megatron_mmbert.data.index.npy import NpyAppender
from megatron_mmbert.data.index.packing import (
    BEST_FIT_BUFFER,
    BEST_FIT_LOOKAHEAD_ROWS,
    BEST_FIT_MIN_PIECE,
    BEST_FIT_WINDOW_ROWS,
    FRAMING_BOS,
    FRAMING_EOS,
    PACKED_ROWS,
    PACKING_MODES,
    PACKING_STATS,
    check_bin_rows,
)
from megatron_mmbert.data.index.plan import (
    IndexPlan,
    IndexPlanError,
    LanguagePhase,
    PackingSummary,
    PlanPhase,
    index_plan,
    packing_summary,
    phase_end_positions,
    phase_epochs,
    stream_positions,
    write_index_plan,
)
from megatron_mmbert.data.index.plan_format import format_index_plan

__all__ = [
    "INDEX_VERSION",
    "build_blending_indices",
    "pack_rows",
    "pack_best_fit",
    "PACKING_MODES",
    "PACKED_ROWS",
    "PACKING_STATS",
    "BEST_FIT_MIN_PIECE",
    "BEST_FIT_WINDOW_ROWS",
    "BEST_FIT_BUFFER",
    "BEST_FIT_LOOKAHEAD_ROWS",
    "FRAMING_BOS",
    "FRAMING_EOS",
    "ARRAY_NAMES",
    "THREAD_DOCUMENT_BUDGET",
    "LANGUAGE_DOCUMENT_COST",
    "language_schedule",
    "check_bin_rows",
    "framing_flags",
    "document_first_tokens",
    "packing_summary",
    "language_stream",
    "document_lengths",
    "NpyAppender",
    "PhaseIndex",
    "DataIndex",
    "cache_key",
    "manifest_digest",
    "source_digests",
    "stream_positions",
    "index_plan",
    "IndexPlan",
    "IndexPlanError",
    "PlanPhase",
    "PackingSummary",
    "LanguagePhase",
    "phase_epochs",
    "phase_end_positions",
    "format_index_plan",
    "write_index_plan",
    "build_arrays",
    "default_threads",
    "default_rank",
    "build_data_index",
]
