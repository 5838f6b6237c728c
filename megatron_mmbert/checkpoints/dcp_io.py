"""How this project reads and writes megatron-core ``dist_checkpointing`` files: one home for the
adjustments to megatron-core 0.16.1 / torch DCP that safety needs, installed by :func:`install`.

Checkpoints are downloaded and shared, so nothing read from one may run code:

* ``.metadata`` -- torch DCP's ``FileSystemReader.read_metadata`` (which megatron-core's
  ``load``, ``load_tensors_metadata`` and ``CachedMetadataFileSystemReader`` all call) unpickles it
  with plain ``pickle.load``. :func:`install` replaces that one method with a reader that unpickles
  through :class:`MetadataUnpickler`, which resolves only the classes checkpoint metadata is made
  of (torch DCP's metadata/planner dataclasses, ``torch.Size``, dtypes, layouts); anything else
  is refused with :class:`UntrustedCheckpointError` naming the file.
* ``common.pt`` and sharded-object ``*.pt`` files -- megatron-core calls ``torch.load`` without
  ``weights_only``; torch >= 2.6 defaults it to True, unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
  is set, which :func:`install` therefore removes (with a warning). A refusal surfaces as
  ``pickle.UnpicklingError``; :func:`translate_load_error` turns it into a message naming the file.
* ``_extra_state`` byte blobs (TransformerEngine's FP8 metadata) are checked with a weights-only
  ``torch.load`` before a module sees them (:func:`check_extra_state`).

Writing: megatron-core's ``FileSystemWriterAsync`` collects its writer results through a queue of a
``multiprocessing`` Manager it spawns on the first save. That helper process is in the trainer's
process group, so SIGTERM to the group (Slurm at the time limit, ``kill -- -PGID``) killed it
before the trainer could save (``BrokenPipeError``), and SIGKILL of the trainer orphaned it. Our
saves collect those results in the trainer itself (synchronous saves in the calling process, and
``checkpoint.async_save``'s writer thread, :mod:`.async_save`), so :func:`install` gives it an
in-process ``queue.Queue`` instead: no such helper process exists.

Integrity: :func:`file_digests` records every file's size and SHA-256 at save time and
:func:`verify_digests` checks them on load (see docs/training.md "Safety").
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import os
import pickle
import queue
import traceback
from typing import Any, Dict, Iterable, Optional

import torch

from megatron_mmbert.checkpoints.layout import CONFIG_FILE, config_path
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.fileio import atomic_write_json

logger = logging.getLogger(__name__)


class UntrustedCheckpointError(ConfigError):
    """A checkpoint file holds something other than plain checkpoint data, or is damaged; the
    message names the file."""


def _allowed_globals() -> Dict[tuple, Any]:
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed: Dict[tuple, Any] = {("torch", "Size"): torch.Size}
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    # Plain dataclasses and enums of torch DCP's checkpoint metadata (torch/distributed/checkpoint/
    # metadata.py, planner.py, filesystem.py): constructing them runs no code of the file's choosing.
    for module, names in (
        (metadata, ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "ChunkStorageMetadata",
                    "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
        (planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
        (filesystem, ("_StorageInfo",)),
    ):
        for name in names:
            if hasattr(module, name):
                allowed[(module.__name__, name)] = getattr(module, name)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


_ALLOWED: Optional[Dict[tuple, Any]] = None


# How pickle names the builtin ``getattr``: protocol 3+ says ``builtins``; protocols 0-2 say
# ``__builtin__`` (the Python 2 name, which the default ``find_class`` maps and ours sees raw).
_GETATTR_NAMES = {("builtins", "getattr"), ("__builtin__", "getattr")}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch DCP ``.metadata`` and nothing else: only allow-listed globals resolve.

    An ``Enum`` member is pickled in one of two forms, depending on the interpreter that wrote
    the file: ``EnumClass(value)`` (CPython 3.11.3+ and 3.12+) or ``getattr(EnumClass, 'NAME')``
    (``Enum.__reduce_ex__`` of CPython <= 3.11.2, the system Python of Debian 12; see CPython
    gh-103056 / the 3.11.3 changelog). The second form asks for the builtin ``getattr``, which
    this unpickler never hands out: it resolves to :func:`_enum_member`, which accepts only an
    allow-listed ``Enum`` class and one of its member names, and looks the member up in
    ``__members__`` (no attribute access of the file's choosing).
    """

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def _enum_member(self, cls: Any, name: Any):
        """``getattr(cls, name)`` restricted to ``cls`` an allow-listed Enum, ``name`` a member."""
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and cls in _ALLOWED.values()):
            raise UntrustedCheckpointError(
                f"{self.path}: refused to load: it calls getattr on {cls!r}, which is not an enum of "
                "checkpoint metadata (a crafted or foreign file; loading it could run code)"
            )
        if not isinstance(name, str) or name not in cls.__members__:
            raise UntrustedCheckpointError(
                f"{self.path}: refused to load: {name!r} is not a member of {cls.__module__}.{cls.__qualname__} "
                "(a crafted file, or one written by another torch version)"
            )
        return cls.__members__[name]

    def find_class(self, module: str, name: str):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        if (module, name) in _GETATTR_NAMES:
            return self._enum_member
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UntrustedCheckpointError(
                f"{self.path}: refused to load: it references {module}.{name}, which is not part of "
                "checkpoint metadata (a crafted or foreign file; loading it could run code)"
            )
        return found


_last_refusal: Optional[str] = None  # torch DCP re-raises reader errors as AssertionError text


def load_metadata(stream, path: str):
    """Unpickle a DCP ``.metadata`` stream through the allow-list; damage is named, too."""
    global _last_refusal
    try:
        return MetadataUnpickler(stream, path).load()
    except UntrustedCheckpointError as exc:
        _last_refusal = str(exc)
        raise
    except Exception as exc:  # truncated or garbled pickle
        _last_refusal = f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})"
        raise UntrustedCheckpointError(_last_refusal) from exc


def _safe_read_metadata(self, *args: Any, **kwargs: Any):
    """``FileSystemReader.read_metadata`` (torch 2.13; older torch has no per-rank metadata path)
    with the allow-listed unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    if hasattr(self, "_get_metadata_path"):
        path = self._get_metadata_path(kwargs.get("rank"))
    else:
        path = self.fs.concat_path(self.path, ".metadata")
    with self.fs.create_stream(path, "rb") as metadata_file:
        metadata = load_metadata(metadata_file, str(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = getattr(self, "load_id", None)
    return metadata


_INSTALLED = False


def install() -> None:
    """Install the safe reader and the in-process writer queue (idempotent; call before any
    dist_checkpointing load or save)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    FileSystemReader.read_metadata = _safe_read_metadata
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    if os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None) is not None:
        logger.warning("ignoring TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: checkpoints are loaded weights-only")
    _INSTALLED = True


def translate_load_error(exc: BaseException, directory: str) -> Optional[UntrustedCheckpointError]:
    """A clear error for a weights-only refusal or a damaged file met inside megatron-core's
    ``load`` (its own messages do not name the file), else None."""
    global _last_refusal
    if isinstance(exc, UntrustedCheckpointError):
        return exc
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    if _last_refusal is not None:
        refusal, _last_refusal = _last_refusal, None
        if refusal in "".join(traceback.format_exception(exc)):  # this failure, not an earlier one
            return UntrustedCheckpointError(refusal)
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        detail = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        return UntrustedCheckpointError(
            f"{os.path.join(directory, 'common.pt')} (or another *.pt of {directory}): refused to load: "
            f"it is not plain tensor data, and unpickling it could run code ({detail or 'weights-only load failed'})"
        )
    return None


def check_extra_state(key: str, value: Any, directory: str) -> None:
    """``_extra_state`` blobs are unpickled by the module that owns them (TransformerEngine with
    ``torch.load``/``pickle``); accept only what a weights-only load reads."""
    if isinstance(value, io.BytesIO):
        data = value.getvalue()
        if not data:
            return
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UntrustedCheckpointError(
                f"{directory}: refused to load {key}: not plain tensor data ({type(exc).__name__})"
            ) from exc


# -- integrity -------------------------------------------------------------------------------------

DIGEST_CHUNK = 8 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(DIGEST_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(directory: str, skip: Iterable[str] = (),
                 known: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """``{file name: {"size", "sha256"}}`` of every regular file directly in ``directory`` (the
    checkpoint's own files; a ``tokenizer/`` beside them may be replaced freely). ``known``: digests
    the writers took of files they wrote (an asynchronous save hashes in the background); taken
    as they are where the size still agrees, every other file is hashed here."""
    skip, known = set(skip), known or {}
    names = [n for n in sorted(os.listdir(directory)) if n not in skip
             and not os.path.islink(os.path.join(directory, n)) and os.path.isfile(os.path.join(directory, n))]
    sizes = {n: os.path.getsize(os.path.join(directory, n)) for n in names}
    todo = [n for n in names if not (n in known and known[n].get("size") == sizes[n])]
    digests = dict(zip(todo, _hash_all([os.path.join(directory, n) for n in todo])))
    return {n: {"size": sizes[n], "sha256": digests[n] if n in digests else known[n]["sha256"]} for n in names}


def _hash_all(paths):
    """SHA-256 of each path, several files at once (hashlib releases the GIL on large blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(paths)))) as pool:
        return list(pool.map(sha256_file, paths))


def verify_digests(directory: str, recorded: Dict[str, Dict[str, Any]], hashes: bool = True) -> None:
    """Raise :class:`UntrustedCheckpointError` naming the first file whose size (and, with
    ``hashes``, SHA-256) differs from ``recorded``, or that is missing."""
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        raise UntrustedCheckpointError(f"{directory}: the recorded file digests are malformed")
    for rel, want in sorted(recorded.items()):
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise UntrustedCheckpointError(f"{directory}: recorded file name {rel!r} is not a plain file name")
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise UntrustedCheckpointError(f"{path}: missing from the checkpoint (it was recorded at save time)")
        size = os.path.getsize(path)
        if size != want.get("size"):
            raise UntrustedCheckpointError(f"{path}: {size} bytes, but {want.get('size')} were saved (truncated or replaced)")
    if not hashes:
        return
    names = sorted(recorded)
    for rel, digest in zip(names, _hash_all([os.path.join(directory, n) for n in names])):
        path = os.path.join(directory, rel)
        if digest != recorded[rel].get("sha256"):
            raise UntrustedCheckpointError(
                f"{path}: SHA-256 differs from the one recorded at save time (the file was modified or damaged); "
                "restore it, or load another checkpoint"
            )


def write_config(directory: str, payload: Dict[str, Any],
                 known_digests: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """Write ``payload`` as the checkpoint's config (``layout.CONFIG_FILE``), with the size and SHA-256
    of every file beside it (``files``; ``known_digests`` as :func:`file_digests`' ``known``). Written
    last: its presence marks the checkpoint complete."""
    payload = dict(payload)
    payload["files"] = file_digests(directory, skip=(CONFIG_FILE,), known=known_digests)
    atomic_write_json(config_path(directory), payload, indent=2)
