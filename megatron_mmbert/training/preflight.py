"""Start-up checks of a run ("preflight"): the rules no single config section can check alone, each
failure one ``ConfigError`` naming the key, the values and the fix.

Scope. Every section checks its own fields in its ``validate()`` (``config.py``, ``training/config.py``),
run when the config is built (``config_base.from_dict``) and again here (``config_base.check``) for a
config built or changed in Python. This module holds only what needs more than one section, the world
size, this machine or the disk: the layout against the world size (``config.validate_layout``),
precision against the model and the attention backend this machine can run, phase budgets against LR
segments and batches, batch arithmetic against the data-parallel size (with the warmup sizes of
:mod:`training.batch_plan`), phase names against the checkpoint folder names and, unless
``check_data=False``, the data on disk (:func:`validate_data`: the manifest, that every phase language
has whole shards of the right dtype and vocabulary, and the ``init.checkpoint``).
"""

from __future__ import annotations

import os

from megatron_mmbert.checkpoints.layout import RESERVED_INFIXES
from megatron_mmbert.config import validate_layout
from megatron_mmbert.config_base import ConfigError, check
from megatron_mmbert.training.batch_plan import rampup_rows
from megatron_mmbert.training.config import RunConfig


def validate(cfg: RunConfig, world_size: int, check_data: bool = True) -> None:
    """Every start-up check (no process group needed); raises one ConfigError with the fix.

    ``check_data=False`` skips what needs files on disk (manifest, shards, init checkpoint)."""
    check(cfg)  # each section's own rules, also for a config built in Python
    validate_layout(cfg.effective_model, cfg.parallel, world_size)
    _validate_precision(cfg)
    _validate_phases(cfg)
    _validate_batches(cfg, world_size)
    _validate_environment(cfg)
    if check_data:
        validate_data(cfg)


def _validate_precision(cfg: RunConfig) -> None:
    from megatron_mmbert.model.build import select_backend

    if cfg.model.fp8 is not None and cfg.precision in ("fp32", "amp_bf16"):
        raise ConfigError(
            f"model.fp8 is set but precision is {cfg.precision}; use precision: fp8 (bf16 + FP8 GEMMs)",
            field="precision",
        )
    # An attention backend (or FP8, or context parallelism) this machine's TE / cuDNN / flash-attn
    # cannot run is a ConfigError naming the versions, before anything starts.
    select_backend(cfg.effective_model, cfg.compute_precision, cfg.parallel.context_parallel)


def _validate_phases(cfg: RunConfig) -> None:
    names = [p.name for p in cfg.phases]
    for i, p in enumerate(cfg.phases):
        reserved = [x for x in RESERVED_INFIXES if x in p.name]
        if reserved:  # phase_end_{name} would look like the leftover of an interrupted save and be deleted
            raise ConfigError(field=f"phases.{i}.name", message=(
                f"phases.{i}.name={p.name!r} contains {reserved[0]!r}, which marks temporary checkpoint "
                "folders; rename the phase (e.g. without the dot)"))
    total = sum(p.tokens for p in cfg.phases)
    if cfg.schedule.total_tokens is not None and total != cfg.schedule.total_tokens:
        parts = " + ".join(f"{p.name} {p.tokens:,}" for p in cfg.phases)
        raise ConfigError(
            f"phase budgets do not add up: {parts} = {total:,} tokens, but schedule.total_tokens = "
            f"{cfg.schedule.total_tokens:,}; fix a phase's tokens or schedule.total_tokens",
            field="schedule.total_tokens",
        )
    missing = [n for n in names if n not in cfg.schedule.phases]
    if missing:
        raise ConfigError(
            f"schedule.phases has no LR segment for phase(s) {missing}; add e.g. "
            f"schedule.phases.{missing[0]}: {{lr: 8.0e-4}}", field="schedule.phases"
        )
    # Segments of phases this run does not have are ignored: a decay variant inherits the full
    # recipe's schedule and runs only its last phase.
    for p in cfg.phases:
        seg = cfg.schedule.phases[p.name]
        where = f"schedule.phases.{p.name}"
        if seg.warmup_tokens + seg.decay_tokens > p.tokens:
            raise ConfigError(
                f"{where}: warmup_tokens {seg.warmup_tokens:,} + decay_tokens {seg.decay_tokens:,} exceed "
                f"the phase's budget phases[{p.name}].tokens = {p.tokens:,}; shorten them or grow the phase",
                field=f"{where}.warmup_tokens",
            )
        seq_tokens = cfg.phase_global_batch(p) * p.seq_len
        if p.tokens < seq_tokens:
            raise ConfigError(
                f"phase {p.name!r}: tokens {p.tokens:,} is less than one global batch "
                f"({cfg.phase_global_batch(p)} rows x seq_len {p.seq_len} = {seq_tokens:,}); "
                "raise tokens or lower the batch"
            )
        if p.seq_len > cfg.model.max_position_embeddings:
            raise ConfigError(
                f"phase {p.name!r}: seq_len {p.seq_len} exceeds model.max_position_embeddings "
                f"{cfg.model.max_position_embeddings}"
            )
    if cfg.init.start_phase is not None and cfg.init.start_phase not in names:
        raise ConfigError(f"init.start_phase={cfg.init.start_phase!r} is not a phase; phases are {names}",
                          field="init.start_phase")


def _validate_batches(cfg: RunConfig, world_size: int) -> None:
    b = cfg.batch
    dp = cfg.parallel.data_parallel(world_size)
    for p in cfg.phases:
        gbs, mbs = cfg.phase_global_batch(p), cfg.phase_micro_batch(p)
        if gbs % (mbs * dp):
            raise ConfigError(
                f"phase {p.name!r}: global batch {gbs} rows is not a multiple of micro batch {mbs} x "
                f"data-parallel size {dp} = {mbs * dp}; change batch.global_batch_size / micro_batch_size "
                "or the number of processes"
            )
    if b.rampup_start_rows is not None and b.rampup_tokens > 0:
        phase = cfg.phase(b.rampup_phase) if b.rampup_phase else cfg.phases[0]
        full = cfg.phase_global_batch(phase)
        inc = b.rampup_increment_rows or b.rampup_start_rows
        mbs = cfg.phase_micro_batch(phase)
        if not 0 < b.rampup_start_rows < full or inc <= 0 or (full - b.rampup_start_rows) % inc:
            raise ConfigError(
                f"batch warmup: rampup_start_rows {b.rampup_start_rows} must be in (0, {full}) and "
                f"{full} - {b.rampup_start_rows} a multiple of rampup_increment_rows {inc}"
            )
        bad = [r for r in rampup_rows(cfg) if r % (mbs * dp)]
        if bad:
            raise ConfigError(
                f"batch warmup: step sizes {bad[:4]} rows are not multiples of micro batch {mbs} x "
                f"data-parallel size {dp}; pick rampup_start_rows/increment_rows that are"
            )
        if b.rampup_tokens > phase.tokens:
            raise ConfigError(
                f"batch.rampup_tokens {b.rampup_tokens:,} exceeds phase {phase.name!r}'s budget {phase.tokens:,}"
            )
    elif b.rampup_phase is not None:
        cfg.phase(b.rampup_phase)


def _validate_environment(cfg: RunConfig) -> None:
    """What the config asks of this machine's Python environment (before the run starts)."""
    if cfg.logging.wandb.enabled:
        from megatron_mmbert.training.logging import require_wandb

        require_wandb()


def _check_init_checkpoint(cfg: RunConfig) -> None:
    """``init.checkpoint`` is a finished checkpoint whose data a run from the first phase can continue."""
    from megatron_mmbert.checkpoints.layout import is_complete

    if cfg.init.strided_from is not None:
        if not is_complete(cfg.init.strided_from):
            raise ConfigError(f"init.strided_from={cfg.init.strided_from!r} is not a finished checkpoint",
                              field="init.strided_from")
        from megatron_mmbert.checkpoints.dist import read_model_config
        from megatron_mmbert.convert.strided import check_models

        check_models(read_model_config(cfg.init.strided_from), cfg.model)
    if cfg.init.checkpoint is not None and not is_complete(cfg.init.checkpoint):
        raise ConfigError(
            f"init.checkpoint={cfg.init.checkpoint!r} is not a finished checkpoint; point it at one "
            "(e.g. RUN/checkpoints/phase_end_mid, written when that run finished its mid phase)"
        )
    if cfg.init.checkpoint is not None and not cfg.init.restart_data and cfg.start_phase_index == 0:
        # The cheap half of the branch check (the run compares every stream position at start-up):
        # a checkpoint whose data streams have moved cannot be continued by a run reading from token 0.
        from megatron_mmbert.training.data_position import DataPosition

        position = DataPosition.of_checkpoint(cfg.init.checkpoint)  # typed; a malformed record is named
        if position is not None and any(position.stream_positions.values()):
            raise ConfigError(
                f"init.checkpoint={cfg.init.checkpoint!r} ended phase {position.phase!r} with its language "
                f"streams under way, but this run starts at its first phase {cfg.phases[0].name!r}, so it would "
                "re-read the data from its start. Declare the parent's phase list (inherit its config) and set "
                "init.start_phase to the next phase (e.g. decay), or set init.restart_data: true on purpose",
                field="init.checkpoint",
            )


def validate_data(cfg: RunConfig) -> None:
    """The manifest exists, every phase language (and fixed share) has shards, the init checkpoint exists."""
    from megatron_mmbert.data.shards import load_manifest

    _check_init_checkpoint(cfg)
    path = cfg.manifest_path
    if not path or not os.path.isfile(path):
        raise ConfigError(
            f"data.manifest={cfg.data.manifest!r}: no manifest.json there; run tools/preprocess_data.py "
            "first (or bash examples/quickstart.sh for the demo data)"
        )
    manifest = load_manifest(path)
    have = {lang for lang, e in manifest.languages.items() if e.tokens > 0 and e.shards}
    vocab = manifest.tokenizer.vocab_size
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"the manifest's tokenizer has {vocab} ids but model.vocab_size is {cfg.model.vocab_size}; "
            f"set model.vocab_size: {vocab}"
        )
    from megatron_mmbert.data.languages import LanguageListError, load_language_list
    from megatron_mmbert.data.mixture import check_sources

    try:
        load_language_list(cfg.data.language_list)
    except LanguageListError as e:
        raise ConfigError(str(e), field="data.language_list") from None
    check_sources([p for p in cfg.phases if not p.manifest], have, path)
    for p in cfg.phases:
        if p.manifest:  # a phase's own manifest: it exists, its tokenizer and languages fit
            from megatron_mmbert.data.shards import phase_sources

            if not os.path.exists(p.manifest):
                raise ConfigError(f"phase {p.name!r}: manifest {p.manifest!r} does not exist; preprocess "
                                  "the phase's sources with tools/preprocess_data.py first")
            phase_sources(manifest, [p])
            continue
        wanted = list(p.languages) if isinstance(p.languages, list) else []
        wanted += list(p.fixed_shares)
        missing = [lang for lang in wanted if lang not in have]
        if missing:
            raise ConfigError(
                f"phase {p.name!r}: language(s) {missing[:5]} have no shards in {path} "
                f"({len(have)} languages there, e.g. {sorted(have)[:5]}); preprocess them or drop them from "
                "the phase"
            )
        if isinstance(p.languages, str) and p.languages.startswith("top:") and int(p.languages[4:]) > len(have):
            raise ConfigError(
                f"phase {p.name!r}: languages {p.languages!r} but the manifest has only {len(have)} languages"
            )
    if cfg.data.eval_manifest and not os.path.exists(cfg.data.eval_manifest):
        raise ConfigError(f"data.eval_manifest={cfg.data.eval_manifest!r} does not exist")
    if cfg.init.checkpoint is not None:
        check_checkpoint_tokenizer(cfg, cfg.init.checkpoint, "init.checkpoint", manifest.tokenizer.to_json())
    _check_shards(cfg, manifest, have)


def check_checkpoint_tokenizer(cfg: RunConfig, checkpoint: str, what: str, identity, warn=None) -> None:
    """Stop when ``checkpoint`` (resumed from, or ``init.checkpoint``) was made with another tokenizer
    than ``data.manifest``'s ``identity`` (``TokenizerIdentity.to_json()``), unless
    ``checkpoint.allow_other_tokenizer`` (then ``warn`` gets the reason): vocabularies of one size load
    silently and train on ids that mean other tokens."""
    from megatron_mmbert.checkpoints.layout import data_tokenizer_dir, tokenizer_mismatch

    why = tokenizer_mismatch(checkpoint, identity, data_tokenizer_dir(cfg.manifest_path))
    if why is None:
        return
    if cfg.checkpoint.allow_other_tokenizer:
        if warn is not None:
            warn(f"checkpoint.allow_other_tokenizer: {why}")
        return
    raise ConfigError(field="checkpoint.allow_other_tokenizer", message=(
        f"{what}: {why}. Use data made with the checkpoint's tokenizer (data.manifest), or set "
        "checkpoint.allow_other_tokenizer: true to load it anyway on purpose"))


def _check_shards(cfg: RunConfig, manifest, have) -> None:
    """Every shard a phase can draw from is whole and of the manifest's dtype, and its token ids
    fit the model's vocabulary (before hours are spent, not at step 1)."""
    from megatron_mmbert.data.shards import check_manifest_shards

    used = set()
    for p in cfg.phases:  # 'all' / 'top:N': every language with shards (header reads are cheap)
        used.update(p.languages if isinstance(p.languages, list) else have)
        used.update(p.fixed_shares)
    try:
        check_manifest_shards(manifest, sorted(used), cfg.model.vocab_size)
    except ValueError as exc:
        raise ConfigError(f"data.manifest={cfg.data.manifest!r}: {exc}") from None


__all__ = ["validate", "validate_data", "check_checkpoint_tokenizer", "check_packed_row_backend"]


SDPA_MICRO_BATCH_TOKENS = 8192
"""Most tokens of a micro-batch the sdpa backend attends as one sequence (``data.packed_row:
micro_batch``): its boolean masks and scores grow with the square."""


def check_packed_row_backend(cfg: RunConfig, backend: str) -> None:
    """Refuse best_fit micro-batch packed rows the chosen attention backend cannot attend: pieces cross
    the rows of a micro-batch, and sdpa then attends over the flattened micro-batch with a dense
    ``[t, t]`` mask (model/attention.py ``segment_masks``), fine for tiny rows only. Checked when the
    model is built, on the machine that runs (``--validate`` on a login node does not know its GPUs)."""
    bins = cfg.packing_bin_rows()
    if backend != "sdpa" or not bins:
        return
    rows, phase = max(zip(bins, cfg.phases), key=lambda x: x[0] * x[1].seq_len)
    if rows > 1 and rows * phase.seq_len > SDPA_MICRO_BATCH_TOKENS:
        raise ConfigError(
            f"data.packed_row: micro_batch makes micro-batches of {rows} x {phase.seq_len} tokens (phase "
            f"{phase.name!r}) one packed sequence, which the sdpa attention backend chosen on this machine "
            f"attends with a dense mask (at most {SDPA_MICRO_BATCH_TOKENS} tokens); run where a packed backend "
            "(te, flash, flex) runs, or set data.packed_row: seq_len", field="data.packed_row")
