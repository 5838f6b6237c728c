"""What a resumed run may change in its config: changed keys are a warning, resume-critical keys an error.

A run writes its resolved config to ``{run_dir}/resolved_config.yaml`` (``checkpoints.layout.RESOLVED_CONFIG``). When it resumes from its own
checkpoint, :func:`check_resume` compares this start's resolved config with that file (before the
file is rewritten) and with what the checkpoint records (seeds, manifest digests):

* every changed key is logged as one WARNING listing the keys with their old and new values
  (changing the LR, the log interval, the parallel layout... on resume is legitimate and common);
* a change of a **resume-critical** key is a ``ConfigError`` naming the keys, why each one cannot
  change under a checkpoint, and the fix. A key is resume-critical when the checkpoint's weights or
  optimizer state could not be loaded into the new run, or when the position it records (the current phase's
  ``consumed_samples``, the sample numbering and every language's stream position, all counted
  in the plan of the phases already begun) would mean other data under the new config, so the
  resumed run would silently repeat or skip data (a sample is a function of (data seed, global
  sample index)) or switch recipe in the middle of a phase;
* keys derived per job or that name places are ignored: ``checkpoint.exit_after_minutes`` is
  re-derived from ``SLURM_JOB_END_TIME`` on every requeue (:mod:`megatron_mmbert.slurm`), and
  ``run_dir``, ``checkpoint.dir``, ``logging.tensorboard_dir`` and ``data.cache_dir`` may move with
  the run (the index cache is keyed by a hash of its content).

The list of critical keys and the reasons are in docs/training.md ("Changing the config on resume").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_mmbert.checkpoints.layout import resolved_config_path
from megatron_mmbert.config_base import ConfigError, YAMLTooLarge, safe_load_yaml
from megatron_mmbert.training.data_position import DataPosition

IGNORED_KEYS = ("run_dir", "checkpoint.dir", "checkpoint.exit_after_minutes", "logging.tensorboard_dir",
                "data.cache_dir")
"""Derived per job (the Slurm time limit) or places that may move; never compared."""

_DATA = ("the data position the checkpoint records (samples consumed, sample numbers, where every "
         "language's stream stands) is counted in the plan of the phases already begun")
_MODEL = "the checkpoint holds the weights of the architecture the run was started with"

CRITICAL_KEYS: Dict[str, str] = {
    "seed": "dropout is re-seeded from (seed, step) and, without data.seed, it is the data seed; "
            "the resumed steps would not be the run's",
    "data.seed": "samples, masks and every language's epoch shuffle are functions of the data seed; "
                 "a new one mid-run repeats some documents and skips others",
    "data.anneal_segments": "the blend of a temperature-annealed phase is cut into these segments; " + _DATA,
    "init.start_phase": "the data index of a run starting at a later phase packs only the phases from there on",
    "optimizer.name": "the checkpoint's optimizer state (moments, step counts) belongs to that optimizer",
    "data.packing": "the rows of every phase are cut by it; " + _DATA,
    **{f"model.{k}": _MODEL for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
        "global_attn_every_n_layers", "local_attention", "max_position_embeddings", "norm_eps",
        "pad_token_id", "make_vocab_size_divisible_by")},
}
"""Keys that may never change under a checkpoint, with the reason."""

BEGUN_PHASE_KEYS = ("tokens", "seq_len", "languages", "temperature", "temperature_end", "fixed_shares",
                    "max_epochs_per_language", "global_batch_size", "manifest")
"""Fields of every phase up to the checkpoint's: they decide the phase's samples (rounded to whole
global batches) and how far each language's stream advances, so the positions of all later phases."""

CURRENT_PHASE_KEYS = ("mask_rate", "mask_rate_end", "global_rope_theta", "local_rope_theta")
"""Fields of a phase the checkpoint is in the middle of: changed, the phase would be a mix of two
recipes. Change them in a new phase, or branch from a ``phase_end_*`` checkpoint (``init.checkpoint``)."""


@dataclass
class Change:
    """One key whose value differs between the stored and the new resolved config."""

    key: str
    old: Any
    new: Any
    reason: Optional[str] = None
    """Why the key is resume-critical (None: a warning only)."""

    def describe(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


_ABSENT = object()


def _show(value: Any) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def flatten(config: Dict[str, Any]) -> Dict[str, Any]:
    """Dotted keys of a resolved config dict. Phases are keyed by name (``phases.decay.mask_rate``,
    as ``--phases.decay.mask_rate`` addresses them) and ``phases`` is the list of names in order;
    other lists are values; empty mappings vanish (``fixed_shares: {}`` is no share at all)."""
    out: Dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value

    for k, v in config.items():
        if k == "phases" and isinstance(v, list):
            out["phases"] = [p.get("name") for p in v]
            for p in v:
                walk({f: x for f, x in p.items() if f != "name"}, f"phases.{p.get('name')}")
        else:
            walk(v, k)
    return out


OPTIMIZER_LAYOUT_KEYS = ("precision", "parallel.use_distributed_optimizer", "optimizer.use_distributed_optimizer")
"""Keys that decide the layout of the optimizer state a checkpoint holds (:func:`_optimizer_layout`)."""


def _optimizer_layout(flat: Dict[str, Any]) -> str:
    """The kind of optimizer state of a flattened config: distributed (sharded) or not, and over fp32
    parameters (``fp32``, ``amp_bf16``) or with fp32 main copies of bf16 parameters (``bf16``, ``fp8``)."""
    v = flat.get("optimizer.use_distributed_optimizer")
    distributed = bool(flat.get("parallel.use_distributed_optimizer") if v is None else v)
    params = "fp32-parameter" if flat.get("precision") in ("fp32", "amp_bf16") else "bf16-parameter"
    return f"{'distributed' if distributed else 'plain'} {params}"


def _phase_key(key: str, names: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(phase name, field) of a ``phases.NAME.FIELD[...]`` key (names may contain dots)."""
    for name in sorted(names, key=len, reverse=True):
        prefix = f"phases.{name}."
        if key.startswith(prefix):
            return name, key[len(prefix):].split(".")[0]
    return None


def compare(stored: Dict[str, Any], new: Dict[str, Any], checkpoint_phase: str, phase_done: bool) -> List[Change]:
    """Every changed key between two resolved configs (as ``resolved_config.yaml`` holds them), those that a
    checkpoint saved in ``checkpoint_phase`` (complete when ``phase_done``) forbids with a reason."""
    old_flat, new_flat = flatten(stored), flatten(new)
    old_names = list(old_flat.get("phases") or [])
    begun = old_names[: old_names.index(checkpoint_phase) + 1] if checkpoint_phase in old_names else [checkpoint_phase]
    in_progress = None if phase_done else checkpoint_phase
    # Phases that use batch.global_batch_size (and the model's RoPE thetas) through their defaults.
    default_batch = any(old_flat.get(f"phases.{p}.global_batch_size") is None
                        or new_flat.get(f"phases.{p}.global_batch_size") is None for p in begun)
    names = set(old_names) | set(new_flat.get("phases") or [])

    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key in IGNORED_KEYS:
            continue
        old, now = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if old == now:
            continue
        reason = CRITICAL_KEYS.get(key)
        if key == "phases" and list(now if now is not _ABSENT else [])[: len(begun)] != begun:
            reason = f"the phases begun, {begun}, must stay first and in order: " + _DATA
        elif key in OPTIMIZER_LAYOUT_KEYS and _optimizer_layout(old_flat) != _optimizer_layout(new_flat):
            reason = (f"the checkpoint's optimizer state is that of a {_optimizer_layout(old_flat)} optimizer, and "
                      "megatron-core loads it only into the same kind, not into a "
                      f"{_optimizer_layout(new_flat)} one; the TP/PP/DP sizes may change, checkpoints reshard")
        elif key == "batch.global_batch_size" and default_batch:
            reason = "a phase already begun takes its global batch from it: " + _DATA
        elif key == "data.mask_special_tokens" and in_progress is not None:
            reason = (f"the checkpoint is in the middle of phase {in_progress!r}, whose masking would become a mix "
                      "of two recipes (change it at a phase end, or branch from a phase_end_* checkpoint)")
        elif key in ("model.global_rope_theta", "model.local_rope_theta") and in_progress is not None:
            field = key.split(".")[1]
            if (old_flat.get(f"phases.{in_progress}.{field}") is None
                    and new_flat.get(f"phases.{in_progress}.{field}") is None):
                reason = f"phase {in_progress!r}, half done, takes its RoPE theta from it (a new phase may change it)"
        else:
            where = _phase_key(key, names)
            if where is not None:
                phase, field = where
                if phase in begun and field in BEGUN_PHASE_KEYS:
                    reason = f"phase {phase!r} has begun: " + _DATA
                elif phase == in_progress and field in CURRENT_PHASE_KEYS:
                    reason = (f"the checkpoint is in the middle of phase {phase!r}, which would become a mix "
                              "of two recipes (change it in a new phase, or branch from a phase_end_* checkpoint)")
        changes.append(Change(key, old, now, reason))
    return changes


def _read_stored(path: str) -> Optional[Dict[str, Any]]:
    import yaml

    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            data = safe_load_yaml(f, path)
        except YAMLTooLarge as e:
            raise ConfigError(str(e)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({e}); restore it or delete it to resume without "
                              "the config check") from None
    return data if isinstance(data, dict) else None


def check_resume(cfg, log, device=None) -> None:
    """On a resume (``checkpoint.resume`` and a ``latest`` checkpoint): compare ``cfg`` with the run's
    stored ``{run_dir}/resolved_config.yaml`` and with the checkpoint's record (seeds, manifest digests); log
    one WARNING listing the changed keys; raise one ConfigError naming the resume-critical ones.

    Every rank calls it before rank 0 rewrites ``resolved_config.yaml``: it ends with one all-reduce, so no
    rank reads the file after the rewrite and every rank raises when any rank found a problem."""
    from megatron_mmbert.training.stopping import any_rank

    error: Optional[ConfigError] = None
    try:
        changes, latest = resume_changes(cfg)
    except ConfigError as exc:
        error, changes, latest = exc, [], None
    if not error and changes:
        stored_path = resolved_config_path(cfg.run_dir, existing=True) or resolved_config_path(cfg.run_dir)
        log(f"the config differs from the one this run was started with ({stored_path}) in "
            f"{len(changes)} key(s): " + "; ".join(c.describe() for c in changes))
        critical = [c for c in changes if c.reason]
        if critical:
            error = ConfigError(
                f"cannot resume from {latest}: resume-critical key(s) changed: "
                + "; ".join(f"{c.describe()} ({c.reason})" for c in critical)
                + f". Restore the values the run was started with ({stored_path}); or start a new run in "
                "another run_dir (branching from a phase end with init.checkpoint and init.start_phase)",
                field=critical[0].key,
            )
    if any_rank(error is not None, device):
        raise error or ConfigError("another rank refused to resume with this config (see rank 0's message)")


def resume_changes(cfg) -> Tuple[List[Change], Optional[str]]:
    """(changed keys, the checkpoint compared against) of a resume; ([], None) when not resuming."""
    import yaml

    from megatron_mmbert.checkpoints import dist as ckpt
    from megatron_mmbert.checkpoints.layout import read_config
    from megatron_mmbert.training.config import resolved_dict

    latest = ckpt.read_latest(cfg.checkpoint_dir) if cfg.checkpoint.resume else None
    if latest is None:
        return [], None
    record = read_config(latest).get("train_state") or {}
    position = DataPosition.of_train_state(record, latest)
    stored_path = resolved_config_path(cfg.run_dir, existing=True)
    stored = _read_stored(stored_path) if stored_path else None
    changes: List[Change] = []
    if stored is not None:
        new = yaml.safe_load(yaml.safe_dump(resolved_dict(cfg), sort_keys=False))  # as resolved_config.yaml holds it
        changes = compare(stored, new, record.get("phase", ""), position is not None and position.at_phase_end)
    # The checkpoint's own record: also when the stored config is missing, or a manifest changed in place.
    flagged = {c.key for c in changes if c.reason}
    for key, recorded, now in (("seed", record.get("seed"), cfg.seed),
                               ("data.seed", record.get("data_seed"), cfg.data_seed)):
        if recorded is not None and recorded != now and key not in flagged:
            changes.append(Change(key, recorded, now, CRITICAL_KEYS[key] + " (recorded in the checkpoint)"))
    if position is not None and position.manifest_sha256:
        changes += _manifest_changes(cfg, position)
    return changes, latest


def _manifest_changes(cfg, position: DataPosition) -> List[Change]:
    """The manifests against the digests the checkpoint records: other shards or token counts under
    the same path change the language streams. The run's manifest is compared by content digest; a
    phase manifest by its source id (folder name and content hash), for the phases begun."""
    from megatron_mmbert.data.index import source_digests
    from megatron_mmbert.data.shards import load_manifest, phase_sources, source_id

    reason = "other shards or token counts than the checkpoint read; " + _DATA
    changes = []
    now = source_digests(phase_sources(load_manifest(cfg.manifest_path), cfg.phases)[0]).get("")
    if now != position.manifest_sha256:
        changes.append(Change("data.manifest (content)", f"sha256 {position.manifest_sha256[:12]}",
                              f"sha256 {str(now)[:12]}", reason))
    names = [p.name for p in cfg.phases]
    begun = cfg.phases[: names.index(position.phase) + 1] if position.phase in names else []
    recorded = position.sources_sha256
    for p in begun:
        if p.manifest:
            path = os.path.abspath(p.manifest)
            sid = source_id(load_manifest(path), path)
            if sid not in recorded:
                changes.append(Change(f"phases.{p.name}.manifest (content)", sorted(recorded), sid, reason))
    return changes


__all__ = ["check_resume", "resume_changes", "compare", "flatten", "Change", "CRITICAL_KEYS", "BEGUN_PHASE_KEYS",
           "CURRENT_PHASE_KEYS", "IGNORED_KEYS"]
