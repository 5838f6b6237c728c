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
