"""``run_preprocess``: one run, step by step -- check the options (and read the language list), hold the output, plan, run the pending
units, write the manifests, report. Each step's subject lives in its own module of this package (see
``__init__``'s docstring for the whole flow and its invariants).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import List, Optional, Tuple

from megatron_mmbert.checkpoints.layout import store_tokenizer
from megatron_mmbert.config_base import ConfigError, check
from megatron_mmbert.data.languages import LanguageListError, load_language_list
from megatron_mmbert.data.preprocess import layout
from megatron_mmbert.data.preprocess.config import PreprocessConfig
from megatron_mmbert.data.preprocess.counters import RunProgress
from megatron_mmbert.data.preprocess.errors import BadInputFractionError
from megatron_mmbert.data.preprocess.finalize import (
    bad_input_checks, bad_input_report, check_finalize, write_manifests,
)
from megatron_mmbert.data.preprocess.holdout import HoldoutRule, check_heldout_share
from megatron_mmbert.data.preprocess.holdout_scan import holdout_rule
from megatron_mmbert.data.preprocess.locks import hold_output
from megatron_mmbert.data.preprocess.markers import check_overlap, forget_units_with_missing_shards, load_markers
from megatron_mmbert.data.preprocess.output import check_output, check_output_folder, remove_partials
from megatron_mmbert.data.preprocess.sharding import assign_shards
from megatron_mmbert.data.preprocess.units import WorkUnit, plan_units, unit_fingerprint
from megatron_mmbert.data.preprocess.workers import Job, run_units
from megatron_mmbert.data.shards import Manifest, TokenizerIdentity, token_dtype
from megatron_mmbert.data.sources import BadInputLog, discover, plan_segments
from megatron_mmbert.data.tokenizer import SentenceSplitter, load_tokenizer, resolve_tokenizer_path


@dataclasses.dataclass
class PreprocessResult:
    """What a run produced."""

    manifest: Optional[Manifest]
    """The manifest as written; None for a shard task (``finalize`` writes it)."""
    bad_input: BadInputLog
    """Bad input over all units of the output (earlier runs included) and this run's discovery."""
    units_total: int
    """Units in this run's plan."""
    units_run: int
    """Units processed now (the rest were already done)."""
    units_in_shard: Optional[int] = None
    """Units of the plan this shard task owns (None when not sharded)."""


@dataclasses.dataclass
class _Plan:
    """This run's units and what is already done of them."""

    units: List[WorkUnit]
    plan_log: BadInputLog
    """Bad input met while discovering the inputs and cutting segments."""
    markers: List[dict]
    """Markers of the finished units of the output."""
    mine: Optional[set]
    """Unit ids this process may run and clean up (a shard task's); None: all."""
    pending: List[WorkUnit]
    """Units to run now, biggest first (the tail of the run is not one large unit on one busy worker)."""


def run_preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Preprocess ``cfg.inputs`` into ``cfg.output``; see the package docstring."""
    _check_options(cfg)
    cfg, identity, dtype, framing = _prepare(cfg)
    with hold_output(cfg.output, cfg.num_shards, cfg.shard_index):
        check_output(cfg, identity, dtype)
        store_tokenizer(cfg.tokenizer, cfg.output)  # travels on: training copies it into every checkpoint
        plan = _plan(cfg, identity)
        _announce(cfg, plan, identity, dtype)
        if plan.pending:
            _run_pending(cfg, plan, identity, dtype, framing)
        markers, manifest = _write_outputs(cfg, plan, identity, dtype)
    report = bad_input_report(cfg, plan.plan_log, markers)
    print(report.report(), file=sys.stderr, flush=True)
    result = PreprocessResult(manifest, report, len(plan.units), len(plan.pending),
                              len(plan.mine) if cfg.sharded else None)
    errors = bad_input_checks(cfg, plan.units, markers, report, whole_plan=not cfg.sharded)
    if errors:
        raise BadInputFractionError("\n".join(errors), result)
    return result


def _check_options(cfg: PreprocessConfig) -> None:
    """Every section's own checks (``validate``, as ``from_dict`` runs them) and the language list read,
    every problem in one :class:`ConfigError`: a bad option or list fails before hours of tokenizing."""
    errors = []
    try:
        check(cfg)
    except ConfigError as e:
        errors.append(e)
    try:
        load_language_list(cfg.language_list)
    except LanguageListError as e:
        errors.append(LanguageListError(str(e), field="language_list"))
    if errors:
        raise ConfigError.combine(errors)


def _prepare(cfg: PreprocessConfig) -> Tuple[PreprocessConfig, TokenizerIdentity, str, Tuple[tuple, tuple]]:
    """Absolute paths, the tokenizer loaded (a Hub id: its snapshot, once) and its framing ids, the
    splitter checked, the output folder checked and its state folder made."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer_path = os.path.abspath(resolve_tokenizer_path(cfg.tokenizer))
    cfg = dataclasses.replace(cfg, output=os.path.abspath(cfg.output), tokenizer=tokenizer_path)
    identity = load_tokenizer(cfg.tokenizer).identity
    prefix_ids, suffix_ids = cfg.framing.ids(identity)
    if cfg.split_sentences:
        SentenceSplitter(cfg.nltk_language)  # fail now, not in every worker
    dtype = token_dtype(identity.vocab_size).name
    check_output_folder(cfg.output, cfg.inputs)
    os.makedirs(os.path.join(cfg.output, layout.STATE_DIR), exist_ok=True)
    return cfg, identity, dtype, (tuple(prefix_ids), tuple(suffix_ids))


def _plan(cfg: PreprocessConfig, identity: TokenizerIdentity) -> _Plan:
    """Discover the inputs, cut the units, read what is done; clean up what killed runs left."""
    plan_log = BadInputLog(strict=cfg.strict, max_locations=cfg.max_bad_locations)
    sources = discover(cfg.inputs, cfg.read, plan_log)
    segments = plan_segments(sources, cfg.chunk_bytes, cfg.read, plan_log)
    units = plan_units(segments, cfg.chunk_bytes, unit_fingerprint(cfg, identity))
    markers = load_markers(cfg.output)
    check_overlap(units, markers)
    mine = None
    if cfg.sharded:
        assignment = assign_shards(units, cfg.num_shards)
        mine = {u.id for u in units if assignment[u.id] == cfg.shard_index}
        layout.write_json(layout.state_path(cfg.output, "shards.json"), {"num_shards": cfg.num_shards})
    remove_partials(cfg.output, cfg.prefix, sorted(mine) if mine is not None else None)
    markers = forget_units_with_missing_shards(cfg.output, markers, mine)
    done = {m["id"] for m in markers}
    if cfg.finalize:
        check_finalize(units, done, cfg.output)
    pending = [u for u in units if u.id not in done and (mine is None or u.id in mine)]
    pending.sort(key=lambda u: (-u.size, u.id))
    return _Plan(units, plan_log, markers, mine, pending)


def _announce(cfg: PreprocessConfig, plan: _Plan, identity: TokenizerIdentity, dtype: str) -> None:
    scope = f" ({len(plan.mine)} in shard {cfg.shard_index} of {cfg.num_shards})" if cfg.sharded else ""
    ours = len(plan.mine) if plan.mine is not None else len(plan.units)  # a shard task counts its own units only
    print(
        f"preprocess: {len(plan.units)} units planned{scope}, {ours - len(plan.pending)} already done, "
        f"{len(plan.pending)} to run on {cfg.workers} worker(s); tokenizer {identity.name} "
        f"(vocab {identity.vocab_size}, {dtype})",
        file=sys.stderr,
        flush=True,
    )


def _run_pending(cfg: PreprocessConfig, plan: _Plan, identity: TokenizerIdentity, dtype: str,
                 framing: Tuple[tuple, tuple]) -> None:
    """The held-out selection (a first pass with ``holdout_docs``), then the pending units in the workers."""
    rule = holdout_rule(cfg, plan.units, plan.markers) if cfg.holdout else HoldoutRule()
    ids = identity.special_ids
    job = Job(cfg, dtype, framing[0], framing[1], rule, framing_ids=(ids.get("bos"), ids.get("eos")))
    progress = RunProgress(sum(u.size for u in plan.pending), len(plan.pending), cfg.log_interval_s)
    run_units(plan.pending, job, progress)


def _write_outputs(cfg: PreprocessConfig, plan: _Plan, identity: TokenizerIdentity, dtype: str
                   ) -> Tuple[List[dict], Optional[Manifest]]:
    """The markers now (a shard task's own only) and the manifest written from them (None for a shard
    task: the manifest needs every shard's units, ``finalize`` writes it)."""
    markers = load_markers(cfg.output)
    if cfg.sharded:
        return [m for m in markers if m["id"] in plan.mine], None
    if cfg.holdout:
        check_heldout_share(markers)
    return markers, write_manifests(cfg.output, identity, dtype, markers, cfg.holdout)
