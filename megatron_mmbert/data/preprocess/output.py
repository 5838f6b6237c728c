"""The output folder: which folders a run may write into, what it records there, what it cleans up.

A run refuses an output that is, holds or lies inside an input, a non-empty folder that no preprocess
run made (:func:`check_output_folder`), and a folder of shards made with another tokenizer or framing
(:func:`check_output`: ``OUT/.preprocess/state.json`` and ``OUT/manifest.json`` record them). It removes
only what killed runs of its own left half-written, by name and never through a link
(:func:`remove_partials`): a tool never deletes what it did not create.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

from megatron_mmbert.data.preprocess import layout
from megatron_mmbert.data.preprocess.config import PreprocessConfig
from megatron_mmbert.data.preprocess.errors import PreprocessError
from megatron_mmbert.data.shards import HELDOUT_DIR, MANIFEST_NAME, TokenizerIdentity, load_manifest


def check_output_folder(output: str, inputs: List[str]) -> None:
    """Refuse an output that is, holds or lies inside an input (its shards would be read back as input),
    and a non-empty folder that is not a previous output of preprocessing (its files are not ours to
    replace or clean up)."""
    real_out = os.path.realpath(output)
    for raw in inputs:
        real_in = os.path.realpath(raw)
        inside = real_out == real_in or real_out.startswith(real_in.rstrip(os.sep) + os.sep)
        holds = real_in.startswith(real_out.rstrip(os.sep) + os.sep)
        if inside or holds:
            where = "is the input" if real_out == real_in else ("lies inside the input" if inside else "holds the input")
            raise PreprocessError(
                f"output {output} {where} {raw}: its shards would be read back as input (or the input "
                "overwritten); choose an output folder outside every input", field="output"
            )
    if os.path.lexists(output) and not os.path.isdir(output):
        raise PreprocessError(f"output {output} exists and is not a folder; choose a new output folder", field="output")
    if os.path.isdir(output) and os.listdir(output) and not is_preprocess_output(output):
        shown = sorted(os.listdir(output))
        raise PreprocessError(
            f"output {output} is a non-empty folder that no preprocess run made (no {layout.STATE_DIR}/ or "
            f"{MANIFEST_NAME}; it holds {', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''}); its files "
            "would be mixed with the shards: choose a new or empty output folder", field="output"
        )


def is_preprocess_output(output: str) -> bool:
    """A folder a preprocess run made: its state folder, or (made before the state folder existed) a manifest."""
    if _is_real_dir(os.path.join(output, layout.STATE_DIR)):
        return True
    manifest = os.path.join(output, MANIFEST_NAME)
    if os.path.isfile(manifest) and not os.path.islink(manifest):
        try:
            load_manifest(manifest)
            return True
        except Exception:  # noqa: BLE001 - anything unreadable is not ours
            return False
    return False


def check_output(cfg: PreprocessConfig, identity: TokenizerIdentity, dtype: str) -> None:
    """Refuse to mix tokenizers / framings in one output; record ours for later runs."""
    state_path = layout.state_path(cfg.output, "state.json")
    ours = {"tokenizer": identity.to_json(), "framing": cfg.framing.to_json(), "dtype": dtype}
    theirs = None
    if os.path.isfile(state_path):
        theirs = layout.read_json(state_path)
    elif os.path.isfile(os.path.join(cfg.output, MANIFEST_NAME)):
        m = load_manifest(os.path.join(cfg.output, MANIFEST_NAME))
        theirs = {"tokenizer": m.tokenizer.to_json(), "framing": ours["framing"], "dtype": m.dtype}
    if theirs is not None:
        if theirs["tokenizer"]["hash"] != identity.hash:
            raise PreprocessError(
                f"{cfg.output} already holds shards made with tokenizer {theirs['tokenizer']['name']!r} "
                f"(sha256 {theirs['tokenizer']['hash'][:12]}...), but this run uses {identity.name!r} "
                f"(sha256 {identity.hash[:12]}...). Shards of different tokenizers cannot share a manifest: "
                "use a new output folder, or the tokenizer the folder was made with.", field="output"
            )
        if theirs["framing"] != ours["framing"]:
            raise PreprocessError(
                f"{cfg.output} was made with framing {theirs['framing']}, this run asks for {ours['framing']}; "
                "use a new output folder or the same framing (framing.bos, framing.eos)", field="output"
            )
    layout.write_json(state_path, ours)


def remove_partials(output: str, prefix: str, unit_ids: Optional[List[str]] = None) -> None:
    """Remove what killed runs of ours left half-written, by name only and never through a link: the
    shard files ``{lang}/{prefix}-{unit}.{bin,idx}.partial`` (and under ``heldout/``), the manifests'
    ``manifest.json.partial`` and ``.preprocess/``'s atomic-write temporaries. ``unit_ids`` (a shard
    task, while other tasks write theirs): only those units' shard files."""
    ids = "|".join(re.escape(u) for u in unit_ids) if unit_ids is not None else "[0-9a-f]+"
    shard_partial = re.compile(rf"^{re.escape(prefix)}-({ids})\.(bin|idx)\.partial$")
    for root in (output, os.path.join(output, HELDOUT_DIR)):
        for folder in _real_subfolders(root):
            _remove_matching(folder, shard_partial)
    if unit_ids is not None:
        return
    _remove_matching(output, re.compile(rf"^{re.escape(MANIFEST_NAME)}\.partial$"))
    _remove_matching(os.path.join(output, HELDOUT_DIR), re.compile(rf"^{re.escape(MANIFEST_NAME)}\.partial$"))
    state_partial = re.compile(r"^.+\.partial-\d+$")  # fileio.atomic_write_text's temporaries
    for folder in (layout.STATE_DIR, layout.UNITS_DIR, layout.SCANS_DIR):
        if _is_real_dir(os.path.join(output, folder)):
            _remove_matching(os.path.join(output, folder), state_partial)


def _is_real_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _real_subfolders(root: str) -> List[str]:
    """The folders directly in ``root`` that are folders themselves (a symlinked folder is not ours)."""
    if not _is_real_dir(root):
        return []
    with os.scandir(root) as it:
        return [e.path for e in it if e.is_dir(follow_symlinks=False)]


def _remove_matching(folder: str, pattern: "re.Pattern[str]") -> None:
    """Remove the regular files (not links) directly in ``folder`` whose names match ``pattern``."""
    if not _is_real_dir(folder):
        return
    with os.scandir(folder) as it:
        for e in it:
            if pattern.match(e.name) and e.is_file(follow_symlinks=False):
                os.remove(e.path)
