"""Streaming merge over checkpoints: one tensor -- or one block of its rows -- at a time.

Memory bound. Tensors are cut into row blocks of at most ``chunk_bytes`` (counted as float64, the compute dtype); a block of
the base and of every model is read, merged and written before the next is read. The working set
is about ``(n_models + 5) x chunk`` (inputs, float64 task vectors, sign mass / numerator /
denominator), independent of the model size and of the largest tensor. Two exceptions: a megatron
QKV tensor read in HF naming is held whole per input while its blocks are read (see
:mod:`.naming`), and the megatron output sink holds the output model itself (megatron-core saves a
whole state dict at once).

Trim thresholds. TIES keeps the top ``k`` magnitudes of each task vector, per tensor or over the
whole model (``--spec.trim global``). Both are found exactly by :class:`~.ties.KthLargest`, a two-pass
radix select on the float32 bit patterns (a 65536-bucket histogram of the high 16 bits, then of the
low 16 bits inside the one bucket that holds the k-th value): fixed memory, no sort. So:

* ``--spec.trim global``: three passes over the checkpoints (histogram, refine, merge);
* ``--spec.trim per-tensor``: a tensor that fits in one block is read once and its threshold found in
  memory; a larger one (the embedding) is read three times, block by block.

Inputs may mix formats; :func:`~.naming.open_inputs` picks the one naming the merge runs in (HF's
for ModernBERT models). Checks before any work: the same architecture in every config, the same
tensor names, shapes and dtypes in every checkpoint. Output is written into
``OUT.tmp-<pid>`` and renamed to ``OUT`` at the end, so ``OUT`` is either complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import asdict
from typing import Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch

from megatron_mmbert.config_base import ConfigError, check
from megatron_mmbert.fileio import check_output_dir, publish_directory, raise_disk_error, write_output_marker
from megatron_mmbert.checkpoints.layout import MERGE_REPORT, CheckpointError, same_tokenizer
from megatron_mmbert.checkpoints.tensors import MegatronSink, SafetensorsSink, TensorInfo
from megatron_mmbert.merge.naming import megatron_converter, open_inputs, write_output_metadata
from megatron_mmbert.progress import Progress
from megatron_mmbert.merge.ties import (
    ChunkStats, KthLargest, MergeSpec, keep_count, magnitude, merge_chunk, report_entry,
)

# Task vectors of checkpoints trained from the base are small next to the base's weights (a decay
# phase moves them by a few percent); one of an unrelated model is about as large as the weights
# themselves (||a - b|| ~ sqrt(||a||^2 + ||b||^2) for independent initialisations).
UNRELATED_RATIO = 0.5
OUTLIER_RATIO = 4.0
DEFAULT_CHUNK_BYTES = 64 * 2**20

logger = logging.getLogger(__name__)


def row_blocks(info: TensorInfo, chunk_bytes: int) -> List[Tuple[Optional[int], Optional[int]]]:
    """Row ranges ``[start, stop)`` covering ``info`` in blocks of at most ``chunk_bytes``, counted
    in the float64 compute precision."""
    if not info.shape or info.numel == 0:
        return [(None, None)]
    rows = info.shape[0]
    row_bytes = max(info.numel // rows, 1) * 8
    per = max(1, chunk_bytes // row_bytes)
    if per >= rows:
        return [(None, None)]
    return [(s, min(s + per, rows)) for s in range(0, rows, per)]


def check_compatible(sources: Sequence) -> List[TensorInfo]:
    """The tensors to write, in order; raises :class:`CheckpointError` on any mismatch."""
    first = sources[0]
    vocab = first.vocab_size
    for other in sources[1:]:
        if vocab is not None and other.vocab_size is not None and other.vocab_size != vocab:
            raise CheckpointError(
                f"different vocabularies: {first.path} has vocab_size {vocab} but {other.path} has "
                f"{other.vocab_size}; models merged together must share one tokenizer"
            )
    for other in sources[1:]:
        missing = sorted(set(first.infos) - set(other.infos))
        extra = sorted(set(other.infos) - set(first.infos))
        if missing:
            raise CheckpointError(
                f"tensor {missing[0]} is in {first.path} but missing from {other.path}"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
        if extra:
            raise CheckpointError(
                f"tensor {extra[0]} is in {other.path} but missing from {first.path}"
                + (f" ({len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for name, info in first.infos.items():
            theirs = other.infos[name]
            if theirs.shape != info.shape:
                hint = ""
                if info.shape and theirs.shape and info.shape[1:] == theirs.shape[1:]:
                    hint = " (a different number of rows: a different vocabulary or padding?)"
                raise CheckpointError(
                    f"tensor {name}: shape {list(info.shape)} in {first.path} but "
                    f"{list(theirs.shape)} in {other.path}{hint}"
                )
            if theirs.dtype != info.dtype:
                raise CheckpointError(
                    f"tensor {name}: dtype {info.dtype} in {first.path} but {theirs.dtype} in "
                    f"{other.path}; convert both to one dtype first"
                )
    return list(first.infos.values())


def _read(sources: Sequence, info: TensorInfo, block) -> List[torch.Tensor]:
    start, stop = block
    return [s.read(info.name, start, stop) for s in sources]


def _check_finite(name: str, paths: Sequence[str], chunks: Sequence[torch.Tensor]) -> None:
    for path, c in zip(paths, chunks):
        if not bool(torch.isfinite(c).all()):
            raise CheckpointError(f"tensor {name} in {path} holds NaN or inf values")


class _Merger:
    """One merge run: the sources, the spec, the sink and the report being built."""

    def __init__(self, spec: MergeSpec, base, models: Sequence, chunk_bytes: int, progress: Progress):
        self.spec = spec
        self.base = base
        self.models = list(models)
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self.base_sq = 0.0
        self.inputs = ([base] if base is not None else []) + self.models
        self.paths = [s.path for s in self.inputs]

    def blocks(self, info: TensorInfo, phase: str) -> Iterator[List[torch.Tensor]]:
        for block in row_blocks(info, self.chunk_bytes):
            chunks = _read(self.inputs, info, block)
            yield chunks
            self.progress.advance(chunks[0].numel(), phase)

    def _split(self, chunks):
        if self.base is not None:
            return chunks[0], chunks[1:]
        return None, chunks

    def global_thresholds(self, merged: Sequence[TensorInfo]) -> List[float]:
        """Pass 1 + 2 over every merged tensor: the exact k-th largest |tau_t| per model."""
        total = sum(i.numel for i in merged)
        selectors = [KthLargest(keep_count(self.spec.density, total)) for _ in self.models]
        for info in merged:
            for chunks in self.blocks(info, "global trim, pass 1/3"):
                _check_finite(info.name, self.paths, chunks)
                base, models = self._split(chunks)
                for sel, m in zip(selectors, models):
                    sel.add_first(magnitude(base, m))
        for sel in selectors:
            sel.finish_first()
        for info in merged:
            for chunks in self.blocks(info, "global trim, pass 2/3"):
                base, models = self._split(chunks)
                for sel, m in zip(selectors, models):
                    sel.add_second(magnitude(base, m))
        return [sel.result() for sel in selectors]

    def tensor_thresholds(self, info: TensorInfo, cached: Optional[List[torch.Tensor]]) -> List[float]:
        """Per-tensor trim: in memory when the tensor is one block, else two passes over blocks."""
        k = keep_count(self.spec.density, info.numel)
        selectors = [KthLargest(k) for _ in self.models]
        passes = cached  # a one-block tensor already in memory: [[base, model_1, ...]]
        for stage in ("first", "second"):
            source = passes if passes is not None else self.blocks(info, f"trim {info.name}, pass {1 if stage == 'first' else 2}/3")
            for chunks in source:
                base, models = self._split(chunks)
                for sel, m in zip(selectors, models):
                    mag = magnitude(base, m)
                    getattr(sel, f"add_{stage}")(mag)
            if stage == "first":
                for sel in selectors:
                    sel.finish_first()
        return [sel.result() for sel in selectors]

    def run(self, plan: Sequence[TensorInfo], sink, template) -> Dict[str, object]:
        spec = self.spec
        merged_infos = [i for i in plan if i.is_float]
        thresholds = None
        if spec.trims and spec.trim == "global":
            thresholds = self.global_thresholds(merged_infos)
        tensors: Dict[str, object] = {}
        copied: List[str] = []
        for info in plan:
            sink.begin(info)
            if not info.is_float:
                # Integer buffers are not weights: copied from the base (template) as they are.
                for block in row_blocks(info, self.chunk_bytes):
                    chunk = template.read(info.name, *block)
                    sink.write(chunk)
                    self.progress.advance(chunk.numel(), "copy")
                copied.append(info.name)
                continue
            blocks = row_blocks(info, self.chunk_bytes)
            tensor_thr = thresholds
            cached = None
            if spec.trims and spec.trim == "per-tensor":
                if len(blocks) == 1:
                    cached = [_read(self.inputs, info, blocks[0])]
                    _check_finite(info.name, self.paths, cached[0])
                tensor_thr = self.tensor_thresholds(info, cached)
            stats = ChunkStats()
            source = cached if cached is not None else self.blocks(info, "merge")
            for chunks in source:
                if cached is None and not (spec.trims and spec.trim == "global"):
                    _check_finite(info.name, self.paths, chunks)
                base, models = self._split(chunks)
                if base is not None:
                    self.base_sq += float(torch.sum(base.double() ** 2))
                out = merge_chunk(spec, base, models, tensor_thr if spec.trims else None, stats)
                sink.write(out.to(info.dtype))
                if cached is not None:
                    self.progress.advance(out.numel(), "merge")
            tensors[info.name] = report_entry(stats, tensor_thr if spec.trims else None)
        return self._summary(tensors, copied, thresholds)

    def _warnings(self, norms: List[float]) -> List[str]:
        """Models whose task vector suggests they did not branch from the base (or from the same
        run as the others): merged anyway, but said."""
        out = []
        base_norm = self.base_sq ** 0.5
        for t, norm in enumerate(norms):
            path = self.models[t].path
            if self.base is not None and base_norm > 0 and norm > UNRELATED_RATIO * base_norm:
                out.append(f"{path}: its task vector (norm {norm:.3g}) is {norm / base_norm:.2f}x the norm of the "
                           f"base's weights ({base_norm:.3g}); was it trained from this base?")
            others = sorted(n for i, n in enumerate(norms) if i != t)
            if others and others[len(others) // 2] > 0 and norm > OUTLIER_RATIO * others[len(others) // 2]:
                out.append(f"{path}: its task vector (norm {norm:.3g}) is {norm / others[len(others) // 2]:.1f}x "
                           "the other models'; was it trained from the same base?")
        return out

    def _summary(self, tensors, copied, thresholds) -> Dict[str, object]:
        n_models = len(self.models)
        numel = sum(e["numel"] for e in tensors.values())
        kept = [sum(e["fraction_kept"][t] * e["numel"] for e in tensors.values()) for t in range(n_models)]
        conflicts = sum(e["sign_conflict_rate"] * e["numel"] for e in tensors.values())
        tv_sq = [sum(e["task_vector_norm"][t] ** 2 for e in tensors.values()) for t in range(n_models)]
        summary: Dict[str, object] = {
            "merged_params": numel,
            "fraction_kept": [k / max(numel, 1) for k in kept],
            "sign_conflict_rate": conflicts / max(numel, 1),
            "task_vector_norm": [s ** 0.5 for s in tv_sq],
        }
        if thresholds is not None:
            summary["global_threshold"] = thresholds
        summary["warnings"] = self._warnings(summary["task_vector_norm"])
        return {"summary": summary, "copied_from_base": copied, "tensors": tensors}


def merge_checkpoints(
    base: Optional[str],
    models: Sequence[str],
    spec: MergeSpec,
    out: str,
    out_format: Optional[str] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    log: Optional[TextIO] = sys.stderr,
    verify: bool = True,
    allow_other_tokenizer: bool = False,
    report_extra: Optional[Dict[str, object]] = None,
) -> Dict[str, object]:
    """Merge ``models`` (against ``base``) into the checkpoint directory ``out``; returns the report
    (``report_extra``: more entries for it, e.g. how the models were chosen).

    Inputs made with different tokenizers (recorded identities, or ``tokenizer.json`` files) are
    refused unless ``allow_other_tokenizer``: same-shaped embeddings of other vocabularies average into noise.

    ``base`` is required for ties and task_arithmetic; for linear and ema it is optional and, if
    given, only supplies the non-float tensors and the config (else the first model does).
    """
    _check_request(spec, base, models, chunk_bytes)
    paths = ([base] if base is not None else []) + list(models)
    out = check_output_dir(out, "ties_merge", inputs=paths, overwrite=overwrite)
    _check_tokenizers(paths, allow_other_tokenizer)
    inputs = open_inputs(paths, out_format, verify=verify)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        plan = check_compatible(inputs.sources)
        body = _merge_into(tmp, inputs, plan, spec, base is not None, chunk_bytes, max_shard_bytes, log)
        report = {**_report_head(spec, base, models, inputs, chunk_bytes), **body, **(report_extra or {})}
        _publish(tmp, out, report)
        return report
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_disk_error(exc, out, "the merged checkpoint")
        raise
    finally:
        inputs.close()


def _check_request(spec: MergeSpec, base: Optional[str], models: Sequence[str], chunk_bytes: int) -> None:
    """The spec (its own rules, also for a spec built in Python) against the number of models, the
    block size, a base where the method needs one."""
    check(spec, "spec")  # MergeSpec.validate
    spec.check_models(len(models), where="spec")
    if not chunk_bytes >= 1:
        raise ConfigError(f"chunk_bytes must be positive (a block of at least one byte), got {chunk_bytes} bytes",
                          field="chunk_bytes")
    if spec.needs_base and base is None:
        raise ConfigError(f"method {spec.method} needs base (the checkpoint the models branched from)", field="base")


def _check_tokenizers(paths: Sequence[str], allow_other_tokenizer: bool) -> None:
    """Every input made with one tokenizer, unless ``allow_other_tokenizer``."""
    why = same_tokenizer(paths)
    if why is not None and not allow_other_tokenizer:
        raise ConfigError(f"merge inputs of different tokenizers: {why}; their embedding rows mean different "
                          "tokens. Merge checkpoints of one tokenizer, or set allow_other_tokenizer on purpose",
                          field="allow_other_tokenizer")


def _work(plan: Sequence[TensorInfo], spec: MergeSpec, chunk_bytes: int) -> int:
    """Elements the merge reads, for its progress: each float tensor once per pass over it (three with a
    trim threshold found block by block, one otherwise), each copied integer buffer once."""
    float_elems = sum(i.numel for i in plan if i.is_float)
    int_elems = sum(i.numel for i in plan if not i.is_float)
    if spec.trims and spec.trim == "global":
        return 3 * float_elems + int_elems
    if spec.trims:
        return int_elems + sum(i.numel * (1 if len(row_blocks(i, chunk_bytes)) == 1 else 3)
                               for i in plan if i.is_float)
    return float_elems + int_elems


def _merge_into(tmp: str, inputs, plan: Sequence[TensorInfo], spec: MergeSpec, has_base: bool, chunk_bytes: int,
                max_shard_bytes: int, log: Optional[TextIO]) -> Dict[str, object]:
    """Merge into the folder ``tmp`` (made afresh): the tensors and the output's metadata files.
    Returns the report's body (summary, tensors); its warnings are logged."""
    sources = inputs.sources
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sink = (SafetensorsSink(tmp, plan, max_shard_bytes) if inputs.out_format == "hf"
            else MegatronSink(tmp, megatron_converter(inputs)))
    progress = Progress("ties_merge", _work(plan, spec, chunk_bytes), "params", log)
    base, models = (sources[0], sources[1:]) if has_base else (None, sources)
    body = _Merger(spec, base, models, chunk_bytes, progress).run(plan, sink, inputs.template)
    for warning in body["summary"]["warnings"]:
        logger.warning(warning)
    sink.finish()
    write_output_metadata(inputs, tmp)
    return body


def _report_head(spec: MergeSpec, base: Optional[str], models: Sequence[str], inputs,
                 chunk_bytes: int) -> Dict[str, object]:
    """The report's first entries: what was merged, how, from which formats."""
    return {
        "format": "megatron-mmbert-merge-report", "version": 1,
        "spec": {k: v for k, v in asdict(spec).items() if k != "needs_base"},
        "weights": spec.model_weights(len(models)),
        "base": base, "models": list(models), "input_formats": inputs.formats,
        "checkpoint_format": inputs.out_format, "merge_naming": inputs.naming,
        "tied_not_merged_twice": sorted({n for s in inputs.sources for n in s.tied_skipped}),
        "chunk_bytes": chunk_bytes,
    }


def _publish(tmp: str, out: str, report: Dict[str, object]) -> None:
    """The report and the output marker into ``tmp``, then ``tmp`` renamed to ``out``."""
    with open(os.path.join(tmp, MERGE_REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    write_output_marker(tmp, "ties_merge")
    publish_directory(tmp, out)
