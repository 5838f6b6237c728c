"""Checkpoints through megatron-core ``dist_checkpointing``: any layout saves, any layout loads.

A checkpoint directory holds megatron-core's sharded files (``*.distcp``, ``.metadata``,
``common.pt``, ``metadata.json``) plus ``mmbert_config.json``: the ModelConfig and, for training
checkpoints, what the trainer needs to resume, and the tokenizer when the caller passes one (file
names: :mod:`.layout`). Tensor keys are the model's checkpoint keys
(``embedding.word_embeddings.weight``, ``encoder.layers.{global i}...``), identical for every
TP/PP/VPP layout and for both layer-spec backends, so a checkpoint saved at TP2/PP1 loads at
TP1/PP2 and the merge and conversion tools can read single tensors unsharded.

Saves are atomic: everything is written to ``<dir>.tmp-<stamp>`` and renamed into place by rank 0
after all ranks finished, so a crash mid-save never leaves a directory that looks complete.
``mmbert_config.json`` also records every file's size and SHA-256 (``files``), checked by
:func:`verify_checkpoint` before a load (:mod:`.dcp_io` keeps the reads safe).

Training checkpoints (:func:`save_training` / :func:`load_training`) add the optimizer, sharded
``fully_reshardable`` (any TP/PP/DP layout, distributed optimizer or not, loads it), and the
trainer's position (phase, consumed samples per phase, step, scheduler state) in
``mmbert_config.json``. A run's checkpoint folder holds ``iter_NNNNNNN/`` (periodic, the last K
kept), ``phase_end_{name}/`` (kept) and ``latest``, a one-line pointer rewritten atomically only
after a checkpoint is complete, so a crash during a save resumes from the previous one.

One subject, a dist checkpoint's save/load life cycle (atomic save, verified load, training state,
``latest``, leftovers and retention), hence the length; file names live in :mod:`.layout`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from megatron_mmbert.checkpoints import dcp_io
from megatron_mmbert.checkpoints.dcp_io import UntrustedCheckpointError, write_config
from megatron_mmbert.checkpoints.layout import (
    CONFIG_FILE,
    DCP_METADATA,
    ITER_PREFIX,
    LATEST_FILE,
    PHASE_END_PREFIX,
    TOKENIZER_RECORD,
    copy_tokenizer_files,
    is_complete,
    read_config,
    tokenizer_dir,
    tokenizer_record,
)
from megatron_mmbert.config import ConfigError, ModelConfig
from megatron_mmbert.config_base import from_dict, to_dict
from megatron_mmbert.fileio import atomic_write_text, publish_directory, raise_disk_error
from megatron_mmbert.model.pipeline import _unwrap

logger = logging.getLogger(__name__)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """The sharded state dict of this rank's model chunks (``model``, or ``model0..`` with VPP)."""
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}




def begin_save(directory: str) -> str:
    """The temporary folder a save of ``directory`` writes into, emptied and created by rank 0
    (collective: every rank returns after it exists)."""
    dcp_io.install()
    stamp = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    tmp = f"{os.path.abspath(directory)}.tmp-{stamp}"
    if _rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    return tmp


def publish(
    tmp: str, directory: str, model_config: ModelConfig, extra: Optional[Dict[str, Any]] = None,
    tokenizer: Optional[str] = None, known_digests: Optional[Dict[str, Dict[str, Any]]] = None,
) -> None:
    """Rank 0, once every rank's shards are in ``tmp``: copy the tokenizer, write the config (with
    every file's digest; ``known_digests``: ones the writers already took) and rename ``tmp`` to
    ``directory``."""
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, tokenizer_dir(tmp))
    payload = {"model": to_dict(model_config), "saved_at": time.time()}
    payload.update(extra or {})
    write_config(tmp, payload, known_digests=known_digests)
    publish_directory(tmp, os.path.abspath(directory))


def abandon_save(tmp: str, exc: BaseException, directory: str) -> None:
    """A save into ``tmp`` failed with ``exc``: alone, remove ``tmp`` (with other ranks, a run's
    start-up cleans it up); a full disk or a quota becomes one clear error."""
    if _world_size() == 1:  # alone, nobody else is writing into it
        shutil.rmtree(tmp, ignore_errors=True)
    raise_disk_error(exc, directory, "the checkpoint")


def save(
    directory: str,
    sharded_state_dict: Dict[str, Any],
    model_config: ModelConfig,
    extra: Optional[Dict[str, Any]] = None,
    before_publish: Optional[Callable[[], None]] = None,
    tokenizer: Optional[str] = None,
) -> None:
    """Save ``sharded_state_dict`` (collectively, every rank calls this) atomically to ``directory``.

    ``tokenizer``: a folder of tokenizer files copied into the checkpoint (see :mod:`.layout`).
    ``before_publish`` runs on every rank after the shards are on disk and before the rename that
    makes the checkpoint visible (fault-injection tests kill the process there). The asynchronous
    variant, the same steps with the write in the background, is :mod:`.async_save`.
    """
    from megatron.core import dist_checkpointing

    directory = os.path.abspath(directory)
    tmp = begin_save(directory)
    try:
        dist_checkpointing.save(sharded_state_dict, tmp)
        _barrier()
        if before_publish is not None:
            before_publish()
        if _rank() == 0:
            publish(tmp, directory, model_config, extra, tokenizer)
    except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
        abandon_save(tmp, exc, directory)
        raise
    _barrier()


def read_model_config(directory: str) -> ModelConfig:
    return from_dict(ModelConfig, read_config(directory)["model"], "model")


def verify_checkpoint(directory: str, hashes: bool = True) -> None:
    """Check every file against the sizes (and SHA-256, with ``hashes``) recorded at save time.

    Collective when a process group exists: rank 0 reads, every rank raises on a mismatch.
    Checkpoints written before digests were recorded pass with a warning."""
    error: Optional[str] = None
    if _rank() == 0:
        try:
            recorded = read_config(directory).get("files")
            if recorded is None:
                logger.warning("%s records no file digests (an older checkpoint); not verified", directory)
            else:
                dcp_io.verify_digests(directory, recorded, hashes=hashes)
        except (ConfigError, UntrustedCheckpointError) as exc:
            error = str(exc)
    if torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if error else 0.0])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag)
        if flag.item() > 0 and error is None:
            error = f"{directory}: failed verification on rank 0 (see its log)"
    if error:
        raise UntrustedCheckpointError(error)


def load(directory: str, sharded_state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Load a checkpoint into the structure of ``sharded_state_dict`` (any saved layout).

    Its metadata is read through the allow-listed unpickler and ``*.pt`` weights-only
    (:mod:`.dcp_io`); a refusal names the file."""
    from megatron.core import dist_checkpointing

    dcp_io.install()
    if not is_complete(directory):
        raise ConfigError(f"{directory} is not a complete checkpoint (no {DCP_METADATA} / {CONFIG_FILE})")
    try:
        return dist_checkpointing.load(sharded_state_dict, directory)
    except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
        translated = dcp_io.translate_load_error(exc, directory)
        if translated is None:
            raise
        raise translated from exc


def save_model(
    directory: str, chunks: List[torch.nn.Module], model_config: ModelConfig, extra=None,
    tokenizer: Optional[str] = None,
) -> None:
    """Model weights only (conversion, merging, evaluation); ``tokenizer`` as in :func:`save`."""
    save(directory, model_sharded_state_dict(chunks), model_config, extra, tokenizer=tokenizer)


def _weights_only(sharded: Dict[str, Any]) -> Dict[str, Any]:
    """Drop ``_extra_state`` entries (TransformerEngine's FP8 scaling metadata, None for local
    layers) from a nested sharded state dict: weights-only checkpoints (conversions, merges) do
    not carry them, and FP8 scales are re-derived from the first steps."""
    return {
        k: _weights_only(v) if isinstance(v, dict) else v
        for k, v in sharded.items()
        if not k.endswith("_extra_state")
    }


def load_model(directory: str, chunks: List[torch.nn.Module], verify: bool = True) -> None:
    """Load model weights into ``chunks`` from a checkpoint saved at any layout (after checking its
    files against the recorded digests, unless ``verify`` is False)."""
    if verify:
        verify_checkpoint(directory)
    state = load(directory, _weights_only(model_sharded_state_dict(chunks)))
    _load_chunks(chunks, state)


def _load_chunks(chunks: List[torch.nn.Module], state: Dict[str, Any]) -> None:
    """Each model chunk's weights from ``state`` (``model``, or ``model{i}`` per virtual stage)."""
    if len(chunks) == 1:
        _load_chunk(chunks[0], state["model"])
    else:
        for i, chunk in enumerate(chunks):
            _load_chunk(chunk, state[f"model{i}"])


def _load_chunk(chunk: torch.nn.Module, state: Dict[str, Any]) -> None:
    for key, value in state.items():
        if key.endswith("_extra_state"):
            dcp_io.check_extra_state(key, value, "checkpoint")
    result = _unwrap(chunk).load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise ConfigError(f"checkpoint lacks model tensors {missing[:3]} (of {len(missing)})")


# -- training checkpoints ----------------------------------------------------------------------------

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def training_sharded_state_dict(chunks: List[torch.nn.Module], optimizer, is_loading: bool) -> Dict[str, Any]:
    """Model and optimizer state of this rank, as sharded tensors in the layout-free format."""
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        model_sd = state["model"] if len(chunks) == 1 else state
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=dict(OPTIMIZER_METADATA)
        )
    return state


def training_extra(optimizer, train_state: Dict[str, Any],
                   tokenizer_identity: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a training checkpoint's config records beside the model config: the trainer's position,
    whether the optimizer is in it, the data's tokenizer (:data:`~.layout.TOKENIZER_RECORD`)."""
    extra = {"train_state": train_state, "has_optimizer": optimizer is not None}
    if tokenizer_identity is not None:
        extra[TOKENIZER_RECORD] = tokenizer_record(tokenizer_identity)
    return extra


def point_latest(root: str, name: str) -> None:
    """Rank 0: rewrite ``root/latest`` (atomically) to name the complete checkpoint ``root/name``."""
    if _rank() == 0:
        atomic_write_text(os.path.join(root, LATEST_FILE), name + "\n")


def save_training(
    root: str,
    name: str,
    chunks: List[torch.nn.Module],
    optimizer,
    model_config: ModelConfig,
    train_state: Dict[str, Any],
    before_publish: Optional[Callable[[], None]] = None,
    tokenizer: Optional[str] = None,
    tokenizer_identity: Optional[Dict[str, Any]] = None,
) -> str:
    """Save ``root/name`` (model, optimizer, position, and the tokenizer folder ``tokenizer`` when
    given; ``tokenizer_identity``, the data's, recorded as :data:`~.layout.TOKENIZER_RECORD`) and then
    point ``root/latest`` at it."""
    directory = os.path.join(root, name)
    save(
        directory,
        training_sharded_state_dict(chunks, optimizer, is_loading=False),
        model_config,
        extra=training_extra(optimizer, train_state, tokenizer_identity),
        before_publish=before_publish,
        tokenizer=tokenizer,
    )
    point_latest(root, name)
    _barrier()
    return directory


def _training_position(directory: str) -> Optional[tuple]:
    """(step, saved_at) of a complete training checkpoint with a readable config, else None."""
    if not is_complete(directory):
        return None
    try:
        meta = read_config(directory)
        return (int(meta["train_state"]["step"]), float(meta.get("saved_at", 0.0)))
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def complete_checkpoints(root: str) -> List[str]:
    """The complete training checkpoints in ``root``, newest (highest step) first."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        if _LEFTOVER.match(entry) or not (PERIODIC.match(entry) or entry.startswith(PHASE_END_PREFIX)):
            continue  # a user's copy (iter_0000010_keep) is never resumed from by accident
        position = _training_position(os.path.join(root, entry))
        if position is not None:
            found.append((position, entry))
    return [os.path.join(root, e) for _, e in sorted(found, reverse=True)]


def read_latest(root: str, warn: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The checkpoint to resume from: the one ``root/latest`` names, or None for a fresh run.

    A damaged pointer (unreadable, not a plain name, naming an incomplete or unreadable
    checkpoint) or a missing one beside complete checkpoints falls back to the newest complete
    checkpoint, reported through ``warn``, naming what was skipped."""
    path = os.path.join(root, LATEST_FILE)
    problem = None
    if os.path.lexists(path):
        try:
            with open(path) as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            name, problem = None, f"{path} is unreadable ({exc})"
        if name is not None:
            if not name or os.path.basename(name) != name or name in (".", ".."):
                problem = f"{path} holds {name[:80]!r}, not a checkpoint name"
            elif _training_position(os.path.join(root, name)) is None:
                problem = f"{path} points at {os.path.join(root, name)}, which is not a complete checkpoint"
            else:
                return os.path.join(root, name)
    candidates = complete_checkpoints(root)
    if problem is None:
        if not candidates:
            return None
        problem = f"{path} is missing although {root} holds checkpoints"
    if not candidates:
        raise ConfigError(f"{problem}, and no complete checkpoint is left in {root}; remove {path} to start over")
    if warn is not None:
        warn(f"{problem}; resuming from the newest complete checkpoint, {candidates[0]}")
    return candidates[0]


def load_training(directory: str, chunks: List[torch.nn.Module], optimizer) -> Dict[str, Any]:
    """Load model (and optimizer, when given and saved) from ``directory``; returns its JSON config
    (``train_state`` holds the trainer position)."""
    meta = read_config(directory)
    with_optimizer = optimizer is not None and meta.get("has_optimizer", False)
    if with_optimizer:
        materialize_optimizer_state(optimizer)
    sharded = training_sharded_state_dict(chunks, optimizer if with_optimizer else None, is_loading=True)
    if "train_state" not in meta:  # a weights-only checkpoint (merge, strided init) has no _extra_state
        sharded = _weights_only(sharded)
    state = load(directory, sharded)
    _load_chunks(chunks, state)
    if with_optimizer:
        load_optimizer_state(optimizer, state["optimizer"])
    meta["loaded_optimizer"] = with_optimizer
    return meta


# -- optimizer state: megatron-core 0.16.1's DistributedOptimizer with torch's Adam -----------------
#
# Without TransformerEngine or Apex, megatron-core builds its optimizers on ``torch.optim.AdamW``,
# which keeps the Adam step count per parameter (``state[p]["step"]``, created lazily by the first
# ``step()``). The DistributedOptimizer's ``fully_reshardable`` format stores that count once, in the
# param groups, and megatron-core 0.16.1 then trips over it in two places:
#   * describing the state to load (``sharded_state_dict(is_loading=True)`` -> ``state_dict()``)
#     reads ``state[p]["step"]`` of every parameter, which a fresh optimizer does not have yet;
#   * loading (``load_parameter_state_from_fully_reshardable`` ->
#     ``_set_main_param_and_optimizer_states``) copies *every* key of the live per-parameter state
#     from the checkpoint's tensors, which have no ``step``: ``KeyError: 'step'``. Its
#     ``load_state_dict`` also hands every parameter the same step tensor object, which torch's
#     Adam then increments once per parameter per step, so the bias correction of a resumed run
#     would run ahead of the uninterrupted one.
# With TE's FusedAdam (or Apex's) the step lives in the param groups only, none of this applies,
# and a per-parameter ``step`` entry must not be added (FusedAdam's ``state_dict`` cannot map it).


def uses_per_parameter_step(optimizer, have_apex_or_te: Optional[bool] = None) -> bool:
    """Whether megatron-core's ``DistributedOptimizer`` ``optimizer`` runs on torch's Adam (per-
    parameter ``step`` state). ``have_apex_or_te`` defaults to megatron-core's own flag, the one its
    ``state_dict`` / ``load_state_dict`` branch on."""
    from megatron.core.optimizer import distrib_optimizer

    if have_apex_or_te is None:
        have_apex_or_te = distrib_optimizer.HAVE_APEX_OR_TE
    return isinstance(optimizer, distrib_optimizer.DistributedOptimizer) and not have_apex_or_te


def _inner_optimizers(optimizer) -> List[Any]:
    """The megatron optimizers inside ``optimizer`` (a ChainedOptimizer, a GuardedOptimizer's
    delegate, or a single one)."""
    inner = getattr(optimizer, "chained_optimizers", None)
    if inner:
        return list(inner)
    return [getattr(optimizer, "_optimizer", optimizer)]


def materialize_optimizer_state(optimizer, have_apex_or_te: Optional[bool] = None) -> None:
    """Give a not-yet-stepped torch Adam inside a DistributedOptimizer its state tensors (zeros,
    step 0), so megatron-core can describe the state it is about to load. Everything is overwritten
    by the load. Only where :func:`uses_per_parameter_step`; elsewhere megatron-core allocates the
    state itself (``init_state_fn`` for the non-distributed optimizers)."""
    for opt in _inner_optimizers(optimizer):
        if not uses_per_parameter_step(opt, have_apex_or_te):
            continue
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def load_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """Load the optimizer part of a training checkpoint (as returned by ``dist_checkpointing.load``)."""
    inner = _inner_optimizers(optimizer)
    states = [state] if len(inner) == 1 else [state[i] for i in range(len(inner))]
    for opt, sub in zip(inner, states):
        if isinstance(sub, dict) and "param_state" in sub:
            _load_distributed_optimizer_state(opt, dict(sub))
        else:
            opt.load_state_dict(sub)


def _load_distributed_optimizer_state(opt, state: Dict[str, Any]) -> None:
    """megatron-core's ``DistributedOptimizer.load_state_dict`` in its two halves (param groups and
    the Adam step, then the per-parameter tensors), with the per-parameter entries the checkpoint's
    tensors do not carry (torch Adam's ``step``) set aside while the tensors are copied, and each
    parameter given its own step tensor again afterwards (see the note above)."""
    param_state = state.pop("param_state")
    kind = state.pop("param_state_sharding_type")
    if kind != OPTIMIZER_METADATA["distrib_optim_sharding_type"]:
        raise ConfigError(f"optimizer state of sharding type {kind!r}; this trainer writes and reads "
                          f"{OPTIMIZER_METADATA['distrib_optim_sharding_type']!r} only")
    opt.load_state_dict(state)
    saved_keys = {"param" if k == "fp32_param" else k for entry in param_state.values() for k in entry}
    saved_keys.add("param")
    torch_state = opt.optimizer.state
    aside = {p: {k: s.pop(k) for k in list(s) if k not in saved_keys} for p, s in torch_state.items()}
    try:
        opt.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, entries in aside.items():
            for k, v in entries.items():
                torch_state[p][k] = v.clone() if isinstance(v, torch.Tensor) else v


# What an interrupted save of ours leaves: ``{name}.tmp-{stamp}`` (shards being written),
# ``{name}.old-{pid}`` (a replaced checkpoint not yet deleted), ``latest.partial-{pid}``.
# Phase names may not hold ``.tmp-`` / ``.old-`` / ``.partial-`` (:data:`RESERVED_INFIXES`, checked at
# start-up), so a complete ``phase_end_{name}`` never looks like a leftover.
_LEFTOVER = re.compile(
    rf"^({ITER_PREFIX}\d+|{PHASE_END_PREFIX}[A-Za-z0-9_.-]+)\.(tmp-[A-Za-z0-9_.-]+|old-\d+)$|^"
    + re.escape(LATEST_FILE) + r"\.partial-\d+$"
)



def clean_incomplete(root: str) -> List[str]:
    """Remove leftovers of this run's interrupted saves in ``root`` (rank 0 only; the caller holds
    the run folder's lock, so no other writer can be mid-save). Only names our saves produce are
    touched; anything else in the folder is left alone."""
    removed = []
    if _rank() != 0 or not os.path.isdir(root):
        return removed
    for entry in sorted(os.listdir(root)):
        if _LEFTOVER.match(entry):
            path = os.path.join(root, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(entry)
    return removed


PERIODIC = re.compile(rf"^{ITER_PREFIX}(\d+)$")
"""A periodic save's folder name (:func:`~.layout.iter_name`): the only names retention may delete.
A user's copy (``iter_0000010_keep``) or a leftover (``iter_0000010.tmp-run``) never matches."""


def apply_retention(root: str, keep_last: int) -> List[str]:
    """Delete all but the newest ``keep_last`` periodic checkpoints (folders named exactly
    ``iter_<digits>``, ordered by their number; never the one ``latest`` points at; ``phase_end_*``
    and anything else are not touched). Rank 0 only; returns what was deleted."""
    if _rank() != 0 or not os.path.isdir(root):
        return []
    latest = read_latest(root)
    periodic = sorted(
        (int(m.group(1)), e) for e in os.listdir(root) if (m := PERIODIC.match(e))
        and os.path.isdir(os.path.join(root, e)) and not os.path.islink(os.path.join(root, e))
    )
    names = [e for _, e in periodic]
    doomed = [e for e in names[:-keep_last] if os.path.join(root, e) != latest] if keep_last else []
    for e in doomed:
        shutil.rmtree(os.path.join(root, e), ignore_errors=True)
    return doomed
