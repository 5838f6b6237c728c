"""Atomic file and directory publication: readers see the old version or the new one, never half.

Every writer of a file another process may read (manifests, markers, configs, checkpoints, merge
outputs) goes through here: write to a temporary name beside the target, flush and fsync, then
``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (creating the parent folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# -- outputs that never destroy -------------------------------------------------------------------

OUTPUT_MARKER = "mmbert_output.json"
"""Written into every folder a tool creates as its output (``{"kind": ...}``): ``--overwrite``
replaces only a folder holding this marker with the same kind."""


class OutputRefused(ValueError):
    """Writing the requested output would destroy something that is not a previous output of the
    same tool; the message names the folder and what to do."""


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(out: str, kind: str, inputs=(), overwrite: bool = False) -> str:
    """Refuse an output folder ``out`` that is or contains an input, that exists
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
    if os.path.lexists(out):
        if not overwrite:
            raise OutputRefused(f"{out} exists; choose a new folder, or pass --overwrite to replace a previous {kind} output")
        marker = os.path.join(out, OUTPUT_MARKER)
        found = None
        if os.path.isdir(out) and not os.path.islink(out) and os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    found = json.load(f).get("kind")
            except (OSError, ValueError, AttributeError):
                found = None
        run_folder = os.path.isdir(out) and any(
            e == "latest" or e.startswith(("iter_", "phase_end_")) for e in os.listdir(out)
        )
        if found != kind or run_folder:
            what = "a run's checkpoint folder" if run_folder else (
                f"a {found} output" if found else f"not an output of {kind} (no {OUTPUT_MARKER})")
            raise OutputRefused(f"{out} is {what}; --overwrite replaces only a previous {kind} output. "
                                "Choose a new output folder")
    return os.path.abspath(out)


def write_output_marker(directory: str, kind: str, **details: Any) -> None:
    """Mark ``directory`` (before it is published) as a ``kind`` output."""
    atomic_write_json(os.path.join(directory, OUTPUT_MARKER), {"kind": kind, **details})
