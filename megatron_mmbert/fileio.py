"""Atomic file and directory publication: readers see the old version or the new one, never half.

Every writer of a file another process may read (manifests, markers, configs, checkpoints, merge
outputs, plots, profiler traces, shards) goes through here: write to a temporary name beside the
target, flush and fsync, then ``os.replace`` (atomic on POSIX within one filesystem). A library
writer that takes a file name goes through :func:`atomic_write_with`; a folder built whole in a
temporary folder beside its final name is published by :func:`publish_directory` (replacing a previous
version) or :func:`publish_new_directory` (content-keyed: the first complete one stays).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import time
from typing import Any, Callable, Optional

from megatron_mmbert.checkpoints.layout import is_run_folder
from megatron_mmbert.config_base import ConfigError


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (creating the parent folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_synced(tmp: str, final: str) -> None:
    """Give the finished file ``tmp`` the name ``final``: its bytes reach the disk first (fsync), so
    after a crash ``final`` is the old file or the whole new one."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def atomic_write_with(path: str, write: Callable[[str], Any], suffix: str = "") -> None:
    """``write(tmp)`` -- a library's writer given a file name (``savefig``, ``pq.write_table``, a
    profiler trace) -- then ``tmp`` published as ``path`` atomically; a failed write leaves no
    partial file. ``suffix`` keeps the extension a writer reads its format from (``.png``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}{suffix}"
    try:
        write(tmp)
        replace_synced(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any, **dump_kwargs) -> None:
    """JSON-dump ``obj`` to ``path`` atomically (sorted keys, indented, unless overridden)."""
    dump_kwargs.setdefault("indent", 1)
    dump_kwargs.setdefault("sort_keys", True)
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def publish_directory(tmp: str, final: str) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an existing one.

    The old directory is renamed aside before the new one takes its name, so ``final`` is always
    either the complete old or the complete new version (never a mix), and the old one is removed last.
    """
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _sync_tree(folder: str) -> None:
    """fsync every file under ``folder``, then the folders themselves (their entries)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs + [""]:
            fd = os.open(os.path.join(root, d), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish_new_directory(tmp: str, final: str) -> bool:
    """Give the finished directory ``tmp`` (beside ``final``, same filesystem) the name ``final``,
    unless another writer published it first: then ``tmp`` is removed and False returned.

    For folders named by a digest of their content (the data index cache): two builders of the same
    name build the same files, so the first complete one stays and nothing is replaced under a
    reader. The files reach the disk first (fsync), so after a crash ``final`` is whole or absent."""
    _sync_tree(tmp)
    try:
        os.rename(tmp, final)  # atomic; fails (not replaces) when ``final`` is a non-empty folder
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp)
        return False
    fd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
    try:
        os.fsync(fd)  # the new name itself
    finally:
        os.close(fd)
    return True


# -- disk errors as one line ----------------------------------------------------------------------

_DISK_WORDS = ("No space left on device", "File too large", "Disk quota exceeded", "file write failed",
               "Read-only file system", "unexpected pos")  # the last: torch's zip writer after a short write


def disk_error(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind ``exc`` (a full disk, a quota, a read-only folder) when a library wrapped
    it: torch DCP's ``CheckpointException`` (per-rank failures), torch.save's ``RuntimeError``
    ("file write failed"), safetensors' ``SafetensorError``; None when ``exc`` is something else."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo.extend(v for v in failures.values() if isinstance(v, BaseException))
            todo.extend(getattr(v, "exc", None) for v in failures.values())  # _WrappingException
        todo.extend([e.__cause__, e.__context__])
        text = str(e)
        if any(w in text for w in _DISK_WORDS):
            code = errno.EFBIG if "too large" in text else errno.EDQUOT if "quota" in text else errno.ENOSPC
            line = next(ln for ln in text.splitlines() if any(w in ln for w in _DISK_WORDS)).strip()
            why = "a write was cut short (disk full, quota or file-size limit)" if "unexpected pos" in line \
                else os.strerror(code)
            return OSError(code, f"{why}: {line[:200]}")
    return None


def raise_disk_error(exc: BaseException, path: str, what: str) -> None:
    """Re-raise ``exc`` as a one-line ``OSError`` naming ``path`` when a disk error is behind it
    (:func:`disk_error`); otherwise return (the caller re-raises ``exc``)."""
    err = disk_error(exc)
    if err is not None:
        raise OSError(err.errno, f"could not write {what} ({err.strerror or err}); nothing half-written was "
                      "kept: free space (or raise the quota / file-size limit) and rerun", path) from None


# -- outputs that never destroy -------------------------------------------------------------------

OUTPUT_MARKER = "mmbert_output.json"
"""Written into every folder a tool creates as its output (``{"kind": ...}``): ``overwrite``
replaces only a folder holding this marker with the same kind."""


class OutputRefused(ConfigError):
    """Writing the requested output would destroy something that is not a previous output of the
    same tool; the message names the folder and what to do (an output option refused)."""


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out: str, kind: str, inputs=(), overwrite: bool = False) -> str:
    """Refuse an output folder ``out`` that is, contains or lies inside an input, that exists
    without ``overwrite``, or that exists but is not a previous ``kind`` output (its marker file
    says so; a run's checkpoint folder never is). Returns ``out`` made absolute."""
    real_out = os.path.realpath(out)
    for given in inputs:
        if given is None:
            continue
        real_in = os.path.realpath(given)
        if _is_within(real_in, real_out):
            raise OutputRefused(
                f"output {out} would overwrite the input {given} (it is or contains it); "
                "choose a new output folder"
            )
        if _is_within(real_out, real_in) and os.path.isdir(real_in):
            raise OutputRefused(
                f"output {out} lies inside the input {given}: it would change the input (and be read as part "
                "of it); choose an output folder outside every input"
            )
    if os.path.lexists(out):
        if not overwrite:
            raise OutputRefused(f"{out} exists; choose a new folder, or set overwrite to replace a previous {kind} output")
        marker = os.path.join(out, OUTPUT_MARKER)
        found, record = None, {}
        if os.path.isdir(out) and not os.path.islink(out) and os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    record = json.load(f)
                found = record.get("kind")
            except (OSError, ValueError, AttributeError):
                found, record = None, {}
        run_folder = is_run_folder(out)
        if found != kind or run_folder:
            what = "a run's checkpoint folder" if run_folder else (
                f"a {found} output" if found else f"not an output of {kind} (no {OUTPUT_MARKER})")
            raise OutputRefused(f"{out} is {what}; overwrite replaces only a previous {kind} output. "
                                "Choose a new output folder")
        added = _files_added(out, record.get("files"))
        if added:
            raise OutputRefused(
                f"{out} is a previous {kind} output, but holds {len(added)} file(s) {kind} did not write: "
                + ", ".join(added[:10]) + (", ..." if len(added) > 10 else "")
                + "; overwrite would delete them. Move them out of the folder (or delete them), then rerun"
            )
    return os.path.abspath(out)


def _output_files(directory: str) -> list:
    """Relative paths of everything under ``directory`` but its marker (links listed, not followed)."""
    found = []
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != OUTPUT_MARKER:
                found.append(rel)
    return sorted(found)


def _files_added(out: str, recorded) -> list:
    """Files in a previous output that its marker does not list (added by a user since); none can be
    told apart in an output whose marker predates the list."""
    if not isinstance(recorded, list):
        return []
    return [f for f in _output_files(out) if f not in set(recorded)]


def write_output_marker(directory: str, kind: str, **details: Any) -> None:
    """Mark ``directory`` (last, before it is published) as a ``kind`` output, listing its files: a later
    ``overwrite`` refuses to delete files a user added since."""
    atomic_write_json(os.path.join(directory, OUTPUT_MARKER),
                      {"kind": kind, **details, "files": _output_files(directory)})


def record_output_file(directory: str, name: str) -> None:
    """Add ``name`` (a file a tool wrote after marking ``directory``, e.g. the model card of a push) to
    the marker's list of the output's own files."""
    path = os.path.join(directory, OUTPUT_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and isinstance(record.get("files"), list) and name not in record["files"]:
        record["files"] = sorted(record["files"] + [name])
        atomic_write_json(path, record)


# -- one writer per run folder --------------------------------------------------------------------

LOCK_FILE = ".lock"
_LOCK_RECORD_BYTES = 256


class LockFileRefused(OSError):
    """A lock's path is a link, not a regular file, or a file that is not ours; never written through."""


def open_lock_file(path: str) -> int:
    """Open (creating) the lock file ``path`` for reading and writing, without following a link and
    without truncating it; refuse anything but a regular file with one name (a link, a FIFO, a device,
    a folder, a hard link to another file). Returns the descriptor."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if os.path.islink(path) or exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise LockFileRefused(f"{path} is {'a symlink' if os.path.islink(path) else 'not a regular file'}; "
                                  "a lock file is never written through a link: remove it") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a hard link ({st.st_nlink} names)"
        raise LockFileRefused(f"{path} is {what}; a lock file is never written through it: remove it")
    return fd


def _read_lock_record(fd: int) -> Optional[dict]:
    """The holder record of a lock file of ours, or None when it holds something else."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "pid" in record and "host" in record else None


class DirectoryLocked(RuntimeError):
    """Another live process holds the folder's lock; the message names its host and pid."""


class DirectoryLock:
    """An exclusive ``fcntl.flock`` on ``directory/.lock``, held until :meth:`release` or the
    process ends (the OS drops it even after SIGKILL, so a crashed run never blocks the next).
    The file records the holder's host, pid and start time for the message a second writer gets.
    ``flock`` is per host on some network filesystems: there it stops a second run on the same
    node only."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "DirectoryLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock_record(fd) or {}
            os.close(fd)
            since = holder.get("since")
            raise DirectoryLocked(
                f"{self.directory} is in use by another run (host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}"
                + (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else "")
                + "); wait for it to finish or stop it, or give this run its own folder (run_dir, checkpoint.dir)"
            ) from None
        size = os.fstat(fd).st_size
        if size and _read_lock_record(fd) is None:  # a file of the user's under our name: never overwrite it
            os.close(fd)
            raise LockFileRefused(f"{self.path} exists and is not a lock file of ours (it holds {size} bytes of "
                                  "something else); move it away, or give this run another folder")
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        # Padded to a fixed size and written in place: the file is never truncated.
        os.pwrite(fd, info.ljust(max(_LOCK_RECORD_BYTES, size) - 1).encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
