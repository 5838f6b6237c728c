"""What a checkpoint folder looks like: the one place that names its files.

A **megatron-mmbert checkpoint** (``dist`` format) is a megatron-core ``dist_checkpointing``
directory (``*.distcp``, ``.metadata``, ``common.pt``, :data:`DCP_METADATA`) plus
:data:`CONFIG_FILE` (the ModelConfig, what a training run needs to resume, and every file's size
and SHA-256) and, when known, the tokenizer under :data:`TOKENIZER_DIR`. A run's checkpoint folder
holds ``iter_NNNNNNN/``, ``phase_end_{name}/`` and :data:`LATEST_FILE` (see :mod:`.dist`).

A **Hugging Face model folder** (``hf`` format) holds :data:`HF_CONFIG`, ``*.safetensors`` (one
file, or shards listed in :data:`HF_INDEX`) and the tokenizer files beside them.

A preprocessed data folder keeps the tokenizer it was made with under :data:`TOKENIZER_DIR` too,
so a training run can put it into every checkpoint it saves.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

from megatron_mmbert.config_base import ConfigError

CONFIG_FILE = "mmbert_config.json"
"""Our model config (and training position, file digests) inside a dist checkpoint."""
DCP_METADATA = "metadata.json"
"""megatron-core's marker of a finished ``dist_checkpointing`` save."""
LATEST_FILE = "latest"
"""One-line pointer to the newest complete checkpoint of a run's checkpoint folder."""
TOKENIZER_DIR = "tokenizer"
"""Subfolder holding the tokenizer files, in a checkpoint and in a preprocessed data folder."""
MERGE_REPORT = "merge_report.json"
"""A merged checkpoint's per-tensor report (fractions kept, sign conflicts), in either format."""
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
"""The files of a tokenizer (``fnmatch`` patterns over plain file names): the only ones copied as
tokenizer files -- a foreign ``tokenizer/`` cannot replace an output's ``config.json`` or weights
-- and the only ones fetched for a tokenizer given as a Hub id (:mod:`megatron_mmbert.hub`), so a
Hub tokenizer's ``merges.txt`` or SentencePiece ``*.model`` reaches the checkpoints too."""


def tokenizer_file_names(directory: str) -> List[str]:
    """The names in ``directory`` that :data:`TOKENIZER_FILES` matches, sorted."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if any(fnmatch.fnmatchcase(n, p) for p in TOKENIZER_FILES))
FORMATS = ("megatron", "hf")
ITER_PREFIX = "iter_"
"""Periodic saves of a run: ``iter_NNNNNNN`` (:func:`iter_name`), the newest few kept."""
PHASE_END_PREFIX = "phase_end_"
"""The save at the end of a phase: ``phase_end_{name}`` (:func:`phase_end_name`), always kept."""

RESERVED_INFIXES = (".tmp-", ".old-", ".partial-")
"""What our temporary names put after a checkpoint's name (an interrupted save's leftovers, which
start-up deletes); no phase name may contain one (``phase_end_{name}`` would look like a leftover)."""
RESOLVED_CONFIG = "resolved_config.yaml"
"""A run folder's resolved config, written by the run at every start (``RUN/resolved_config.yaml``);
its own name, so a user's ``RUN/config.yaml`` (passed as ``--config``) is never replaced."""
LEGACY_RESOLVED_CONFIG = "config.yaml"
"""Where runs started before 0.2 wrote the resolved config; read (never written) when the run has no
:data:`RESOLVED_CONFIG` yet."""


def resolved_config_path(run_dir: str, existing: bool = False) -> Optional[str]:
    """``RUN/resolved_config.yaml``; with ``existing``: the file a resume compares against (that one, or
    a run of an older version's ``RUN/config.yaml`` when it is a resolved config, not a user's file
    with ``inherit:``), or None when there is none."""
    path = os.path.join(run_dir, RESOLVED_CONFIG)
    if not existing or os.path.isfile(path):
        return path
    legacy = os.path.join(run_dir, LEGACY_RESOLVED_CONFIG)
    if not os.path.isfile(legacy):
        return None
    import yaml

    from megatron_mmbert.config_base import safe_load_yaml

    try:
        with open(legacy, encoding="utf-8") as f:
            data = safe_load_yaml(f, legacy)
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return None
    resolved = isinstance(data, dict) and "inherit" not in data and {"run_dir", "model", "phases", "data"} <= set(data)
    return legacy if resolved else None


class CheckpointError(ConfigError):
    """Bad or incompatible input checkpoints; the message names the tensor and the paths."""


# -- format detection ------------------------------------------------------------------------------


def is_dist_checkpoint(path: str) -> bool:
    """A finished megatron-core save (our config may still be missing: a foreign checkpoint)."""
    return os.path.isfile(os.path.join(path, DCP_METADATA))


def is_complete(directory: str) -> bool:
    """A finished checkpoint of ours: megatron-core's metadata and our config are both present."""
    return is_dist_checkpoint(directory) and os.path.isfile(os.path.join(directory, CONFIG_FILE))


def detect_format(path: str) -> str:
    """``"megatron"`` for a dist-checkpoint directory, ``"hf"`` for a safetensors model directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint directory)")
    if is_dist_checkpoint(path):
        return "megatron"
    if os.path.exists(os.path.join(path, HF_CONFIG)):
        return "hf"
    raise CheckpointError(
        f"{path}: neither a megatron dist checkpoint ({DCP_METADATA}) nor a Hugging Face model "
        f"directory ({HF_CONFIG})"
    )


def iter_name(step: int) -> str:
    """The folder name of the periodic save after optimizer step ``step``."""
    return f"{ITER_PREFIX}{step:07d}"


def phase_end_name(phase: str) -> str:
    """The folder name of the save that ends phase ``phase``."""
    return f"{PHASE_END_PREFIX}{phase}"


def is_run_folder(path: str) -> bool:
    """A training run's checkpoint folder (holds ``latest``, ``iter_*`` or ``phase_end_*``)."""
    return os.path.isdir(path) and any(
        e == LATEST_FILE or e.startswith((ITER_PREFIX, PHASE_END_PREFIX)) for e in os.listdir(path)
    )


# -- the model-config file -------------------------------------------------------------------------


def config_path(directory: str) -> str:
    return os.path.join(directory, CONFIG_FILE)


def read_config(directory: str) -> Dict[str, Any]:
    """``mmbert_config.json`` of a checkpoint, with a clear error when it is not one of ours."""
    path = config_path(directory)
    if not os.path.isfile(path):
        raise ConfigError(
            f"{directory} is not a megatron-mmbert checkpoint (no {CONFIG_FILE}); for a Hugging "
            "Face directory run tools/convert_checkpoint.py import-hf first"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); the checkpoint is damaged") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ConfigError(f"{path}: not a megatron-mmbert checkpoint config (no 'model' section)")
    return meta


def read_config_if_any(directory: str) -> Optional[Dict[str, Any]]:
    """The raw config of a dist checkpoint, or None when it has none (a foreign checkpoint)."""
    path = config_path(directory)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc


# -- tokenizer -------------------------------------------------------------------------------------


def tokenizer_dir(folder: str) -> str:
    """Where ``folder`` (a checkpoint or a preprocessed data folder) keeps its tokenizer."""
    return os.path.join(folder, TOKENIZER_DIR)


def data_tokenizer_dir(manifest_path: str) -> str:
    """The tokenizer folder preprocessing stored beside a shard manifest."""
    return tokenizer_dir(os.path.dirname(os.path.abspath(manifest_path)))


def has_tokenizer_files(directory: Optional[str]) -> bool:
    return bool(directory) and any(
        n == "tokenizer.json" or n.endswith(".model") for n in tokenizer_file_names(directory)
        if os.path.isfile(os.path.join(directory, n)))


def copy_tokenizer_files(src_dir: str, dst_dir: str, follow_symlinks: bool = False) -> List[str]:
    """Copy the tokenizer files of ``src_dir`` (only the names in :data:`TOKENIZER_FILES`, only
    regular files) into ``dst_dir``; returns the names copied. Symlinks are skipped unless
    ``follow_symlinks`` (a folder the user named, e.g. an HF cache snapshot, made of links): one in
    a downloaded checkpoint could otherwise copy any local file into an export."""
    copied = []
    for name in tokenizer_file_names(src_dir):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and (follow_symlinks or not os.path.islink(src)):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


TOKENIZER_RECORD = "tokenizer"
"""Key of ``mmbert_config.json`` holding the tokenizer identity (``name``, ``hash``, ``vocab_size``) of
the data a training checkpoint was trained on: the manifest's ``tokenizer``."""
ALLOW_OTHER_TOKENIZER = "allow_other_tokenizer"
"""The option (same name in every tool: ``checkpoint.allow_other_tokenizer`` in a run config) that
accepts a checkpoint whose tokenizer is not the data's."""


def tokenizer_record(identity: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint records of a manifest's tokenizer identity (``TokenizerIdentity.to_json()``)."""
    return {k: identity.get(k) for k in ("name", "hash", "vocab_size")}


def _key_file_digest(folder: str) -> Optional[Tuple[str, str]]:
    """(kind, digest) of what defines a tokenizer's ids in ``folder``: the vocabulary of its
    ``tokenizer.json`` (tokens and ids, added tokens included; unchanged by a ``save_pretrained``
    round trip, which rewrites the file), else the bytes of its ``tokenizer.model``; or None."""
    import hashlib

    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            vocab = (data.get("model") or {}).get("vocab")
            items = sorted(vocab.items()) if isinstance(vocab, dict) else [
                v[0] if isinstance(v, list) and v else v for v in (vocab or [])]  # Unigram: [piece, score]
            added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
        except (OSError, ValueError, AttributeError, TypeError):
            return None
        text = json.dumps([items, added], ensure_ascii=False)
        return "tokenizer.json vocabulary", hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "tokenizer.model", h.hexdigest()
    return None


def checkpoint_tokenizer(path: str) -> Optional[Dict[str, Any]]:
    """The tokenizer identity a checkpoint records (``{"name", "hash", ...}``), or None (imported,
    merged from imports, or saved before identities were recorded)."""
    try:
        meta = read_config_if_any(path) if os.path.isdir(path) else None
    except CheckpointError:
        return None
    record = meta.get(TOKENIZER_RECORD) if isinstance(meta, dict) else None
    return record if isinstance(record, dict) and isinstance(record.get("hash"), str) else None


def tokenizer_mismatch(checkpoint: str, identity: Dict[str, Any], data_tokenizer: Optional[str]) -> Optional[str]:
    """Why ``checkpoint`` (a dist checkpoint or an HF folder) was not made with the tokenizer
    ``identity`` of a manifest whose tokenizer files are in ``data_tokenizer``; None when it was, or
    when neither a recorded identity nor tokenizer files allow a comparison. Token ids of two
    tokenizers with the same vocabulary size fit the same embedding and mean different things: the
    numbers of such a run or evaluation are silently wrong."""
    recorded = checkpoint_tokenizer(checkpoint)
    if recorded is not None:
        if recorded["hash"] == identity.get("hash"):
            return None
        return (f"{checkpoint} was made with tokenizer {recorded.get('name')!r} (sha256 {recorded['hash'][:12]}...), "
                f"the data with {identity.get('name')!r} (sha256 {str(identity.get('hash'))[:12]}...)")
    theirs_dir = tokenizer_dir(checkpoint) if is_dist_checkpoint(checkpoint) else checkpoint
    theirs = _key_file_digest(theirs_dir) if os.path.isdir(theirs_dir) else None
    ours = _key_file_digest(data_tokenizer) if data_tokenizer and os.path.isdir(data_tokenizer) else None
    if theirs is None or ours is None or theirs[0] != ours[0] or theirs[1] == ours[1]:
        return None
    return (f"{checkpoint}'s {theirs[0]} (sha256 {theirs[1][:12]}...) is not that of the data's tokenizer "
            f"{identity.get('name')!r} ({data_tokenizer}, sha256 {ours[1][:12]}...)")


def same_tokenizer(paths: List[str]) -> Optional[str]:
    """Why the checkpoints ``paths`` (merge inputs) were not all made with one tokenizer, or None."""
    seen: Dict[Tuple[str, str], str] = {}
    for path in paths:
        recorded = checkpoint_tokenizer(path)
        if recorded is not None:
            key = ("identity", recorded["hash"])
        else:
            folder = tokenizer_dir(path) if is_dist_checkpoint(path) else path
            digest = _key_file_digest(folder) if os.path.isdir(folder) else None
            if digest is None:
                continue
            key = digest
        seen.setdefault(key, path)
    kinds = {k[0] for k in seen}
    groups = sorted(seen.items())
    # A recorded identity and a bare file cannot be compared with each other: only like with like.
    for kind in kinds:
        same_kind = [(k, p) for k, p in groups if k[0] == kind]
        if len(same_kind) > 1:
            (ka, a), (kb, b) = same_kind[:2]
            return f"{a} was made with tokenizer {ka[1][:12]}... and {b} with {kb[1][:12]}..."
    return None


def store_tokenizer(source: str, folder: str, follow_symlinks: bool = True) -> List[str]:
    """Put the tokenizer ``source`` (an HF tokenizer folder, a ``tokenizer.json`` or a
    SentencePiece ``.model``, named by the user unless ``follow_symlinks`` is False) into
    ``folder``'s :data:`TOKENIZER_DIR`; returns the names copied."""
    dst = tokenizer_dir(folder)
    if os.path.isdir(source):
        copied = copy_tokenizer_files(source, dst, follow_symlinks)
        models = sorted(n for n in os.listdir(source) if n.endswith(".model"))
        if copied or not models:
            return copied
        source = os.path.join(source, models[0])  # a SentencePiece folder (the one a loader picks)
    if os.path.isfile(source) and (follow_symlinks or not os.path.islink(source)) and source.endswith((".json", ".model")):
        name = "tokenizer.json" if source.endswith(".json") else "tokenizer.model"
        os.makedirs(dst, exist_ok=True)
        shutil.copyfile(source, os.path.join(dst, name))
        return [name]
    return []
