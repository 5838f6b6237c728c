"""One naming per merge: inputs of either checkpoint format, output in the format asked for.

A merge reads every input tensor by tensor and writes one output, so all inputs must present the
same tensor names and layouts. When every input is a ModernBERT model (its config reads as a
:class:`~megatron_mmbert.config.ModelConfig` and each of its tensor names has a counterpart in the
other format), the merge runs in **Hugging Face naming**, whatever the inputs' formats:

* HF naming has no vocabulary padding. Megatron pads the embedding and decoder bias to a multiple
  of 128 x TP; padded rows merged as entries would count in the per-tensor trim (``k = density x
  numel``) and shift it, and checkpoints saved at different TP would not even have equal shapes.
* Each megatron input is read through :class:`MegatronAsHF`, which maps one tensor (or row block)
  at a time with :mod:`megatron_mmbert.convert.hf` -- the one place that knows both namings.
  Embedding / decoder-bias rows map one to one (HF row r is megatron row r), so those are read in
  row blocks like any tensor, padding never read. QKV rows do not: HF stores ``[q heads | k heads |
  v heads]``, megatron groups rows per head, so a block of HF rows is spread over the whole
  megatron tensor; a QKV tensor (3h x h, smaller than the embedding) is therefore read whole,
  regrouped once and kept only while its blocks are being read.
* A megatron output gets each finished tensor mapped back (QKV regrouped per head, vocabulary
  tensors padded with zero rows to the TP1 size) by :class:`~megatron_mmbert.checkpoints.tensors.MegatronSink`.

Inputs that are not ModernBERT models (e.g. other architectures' HF directories) are merged in
their own naming, tensors as stored, and must then all have one format, written unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_mmbert.checkpoints.dist import read_model_config
from megatron_mmbert.checkpoints.layout import (
    CONFIG_FILE,
    FORMATS,
    TOKENIZER_RECORD,
    CheckpointError,
    checkpoint_tokenizer,
    copy_tokenizer_files,
    detect_format,
    tokenizer_dir,
)
from megatron_mmbert.checkpoints.dcp_io import write_config
from megatron_mmbert.checkpoints.tensors import DistSession, HFSource, MegatronSource, TensorInfo, copy_hf_side_files
from megatron_mmbert.config import ConfigError, ModelConfig
from megatron_mmbert.config_base import to_dict
from megatron_mmbert.convert import hf as hf_map
from megatron_mmbert.convert.checkpoints import read_hf_config, write_hf_config

# Config fields that fix the tensors' shapes, and the head count that fixes the QKV regrouping:
# inputs must agree on them. The output's other fields (RoPE, window, dropouts) are the base's.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads")


class MegatronAsHF:
    """A :class:`MegatronSource` seen in HF naming: HF keys, unpadded shapes, HF QKV row order."""

    format = "megatron"

    def __init__(self, source: MegatronSource, model: ModelConfig):
        self.inner = source
        self.path = source.path
        self.config = source.config
        self.model = model
        self.tied_skipped: List[str] = []
        self._megatron = {}  # HF name -> (megatron key, transform kind)
        infos = {}
        for mkey, info in source.infos.items():
            hkey, kind = hf_map.hf_key(mkey)
            shape = info.shape
            if kind == "vocab":
                if shape[0] < model.vocab_size:
                    raise CheckpointError(
                        f"tensor {mkey} in {self.path} has {shape[0]} rows, fewer than vocab_size "
                        f"{model.vocab_size} in its {CONFIG_FILE}"
                    )
                shape = (model.vocab_size,) + tuple(shape[1:])
            infos[hkey] = TensorInfo(hkey, shape, info.dtype)
            self._megatron[hkey] = (mkey, kind)
        self.infos = infos
        self._whole: Tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """The HF tensor ``name``, or rows ``[start, stop)`` of it."""
        mkey, kind = self._megatron[name]
        if kind == "vocab":  # HF row r is megatron row r; the padding rows after vocab_size are never read
            if start is None:
                start, stop = 0, self.model.vocab_size
            return self.inner.read(mkey, start, stop)
        if kind != "qkv":
            return self.inner.read(mkey, start, stop)
        # QKV: the rows of an HF block come from every head of the megatron tensor; read it whole
        # and regroup once, keeping it while the blocks of this tensor are read.
        if self._whole[0] != name:
            self._whole = (None, None)  # release the previous one before reading the next
            self._whole = (name, hf_map.tensor_to_hf(mkey, self.inner.read(mkey), self.model)[1])
        whole = self._whole[1]
        return whole if start is None else whole[start:stop]

    def close(self) -> None:
        self._whole = (None, None)
        self.inner.close()


@dataclass
class MergeInputs:
    """The opened inputs of one merge and the decisions taken about names and output."""

    paths: List[str]
    """Input paths, base first when there is one."""
    formats: List[str]
    """Detected format of each input (``megatron`` or ``hf``)."""
    sources: List[object]
    """Readers, all in the merge naming (``HFSource``, ``MegatronAsHF`` or ``MegatronSource``)."""
    naming: str
    """``hf`` (ModernBERT models, any formats) or ``native`` (tensors as stored, one format)."""
    out_format: str
    """Format of the output checkpoint."""
    model: Optional[ModelConfig] = None
    """The template's (base's, else first model's) model config; ``None`` in native naming."""
    session: Optional[DistSession] = field(default=None, repr=False)
    """The process group opened for megatron inputs or output, closed by :meth:`close`."""

    @property
    def template(self):
        """The input whose config, tokenizer and non-float tensors the output takes."""
        return self.sources[0]

    def close(self) -> None:
        for s in self.sources:
            s.close()
        if self.session is not None:
            self.session.close()


def _model_config(path: str, fmt: str) -> ModelConfig:
    try:
        return read_hf_config(path) if fmt == "hf" else read_model_config(path)
    # ConfigError is a ValueError; ModernBertConfig(**unexpected) may raise any of these.
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{path}: {err}") from None


def _unmapped(source, fmt: str) -> Optional[str]:
    """The first tensor of ``source`` with no counterpart in the other format, or None."""
    to_other = hf_map.megatron_key if fmt == "hf" else hf_map.hf_key
    for name in source.infos:
        try:
            to_other(name)
        except KeyError:
            return name
    return None


def check_same_architecture(paths: Sequence[str], models: Sequence[ModelConfig]) -> None:
    """Raise :class:`CheckpointError` naming both checkpoints when their configs disagree."""
    for path, model in zip(paths[1:], models[1:]):
        for name in ARCHITECTURE_FIELDS:
            a, b = getattr(models[0], name), getattr(model, name)
            if a != b:
                what = "different vocabularies" if name == "vocab_size" else "model configs differ"
                raise CheckpointError(
                    f"{what}: {paths[0]} has {name} {a} but {path} has {b}; only checkpoints of one "
                    "architecture (and tokenizer) can be merged"
                )


def open_inputs(paths: Sequence[str], out_format: Optional[str] = None, verify: bool = True) -> MergeInputs:
    """Open ``paths`` (base first) in one naming; see the module docstring for the rule.
    ``verify``: check megatron inputs' files against their recorded digests first. An HF input may
    be a Hub id (``org/name[@revision]``, :func:`megatron_mmbert.hub.resolve`)."""
    from megatron_mmbert.hub import resolve

    paths = [resolve(p) for p in paths]
    formats = [detect_format(p) for p in paths]
    out_format = out_format or formats[0]
    if out_format not in FORMATS:
        raise CheckpointError(f"out_format {out_format!r}: choose one of {', '.join(FORMATS)}")
    needs_mapping = len(set(formats)) > 1 or out_format != formats[0]
    models: List[Optional[ModelConfig]] = []
    why_not = None  # why the inputs cannot be merged in HF naming
    for path, fmt in zip(paths, formats):
        try:
            models.append(_model_config(path, fmt))
        except ConfigError as err:
            why_not = why_not or str(err)
            models.append(None)
    def refuse_mapping(reason: str) -> None:
        if needs_mapping:
            mix = ", ".join(f"{f} {p}" for f, p in zip(formats, paths))
            raise CheckpointError(
                f"inputs ({mix}) and out_format {out_format} need converting between formats, "
                f"which works for ModernBERT checkpoints only: {reason}"
            )

    if why_not is not None:
        refuse_mapping(why_not)  # before opening anything
    session = DistSession() if "megatron" in formats or out_format == "megatron" else None
    raw: List[object] = []
    try:
        for path, fmt in zip(paths, formats):
            raw.append(HFSource(path) if fmt == "hf" else MegatronSource(path, session, verify=verify))
        if why_not is None:
            for src, fmt in zip(raw, formats):
                name = _unmapped(src, fmt)
                if name is not None:
                    other = "megatron-mmbert" if fmt == "hf" else "HF ModernBERT"
                    why_not = f"{src.path}: tensor {name} has no {other} counterpart"
                    refuse_mapping(why_not)
                    break
        if why_not is not None:
            if out_format == "megatron" and raw[0].config is None:
                raise CheckpointError(
                    f"{paths[0]}: no {CONFIG_FILE}; the merged checkpoint needs the base's "
                    "model config (save the base with the project's checkpoint code)"
                )
            return MergeInputs(paths, formats, raw, "native", out_format, None, session)
        check_same_architecture(paths, models)
        sources = [s if f == "hf" else MegatronAsHF(s, m) for s, f, m in zip(raw, formats, models)]
        return MergeInputs(paths, formats, sources, "hf", out_format, models[0], session)
    except BaseException:
        for s in raw:
            s.close()
        if session is not None:
            session.close()
        raise


def megatron_converter(inputs: MergeInputs):
    """``convert`` for :class:`~megatron_mmbert.checkpoints.tensors.MegatronSink`: HF tensor -> megatron
    key and layout (padded to the TP1 vocabulary size, which loads at any layout); None in native
    naming."""
    if inputs.naming != "hf":
        return None
    model = inputs.model
    padded = model.padded_vocab_size(1)

    def convert(name: str, tensor: torch.Tensor):
        return hf_map.tensor_to_megatron(name, tensor, model, padded)

    return convert


def write_output_metadata(inputs: MergeInputs, out_dir: str) -> None:
    """The output's config and tokenizer, from the template input, in the output's format."""
    template, fmt = inputs.template, inputs.formats[0]
    if inputs.out_format == "hf":
        if fmt == "hf":
            copy_hf_side_files(template.path, out_dir)  # config.json verbatim, tokenizer, generation
            return
        write_hf_config(inputs.model, out_dir, tokenizer_dir(template.path))
        copy_tokenizer_files(tokenizer_dir(template.path), out_dir)
        return
    # megatron output: the model config only (a training checkpoint's position and optimizer flag
    # would be wrong for the merged weights), plus the template's tokenizer where checkpoints keep it.
    if fmt == "megatron":  # its config as stored (open_inputs checked it is there)
        model = template.config.get("model", template.config)
    else:
        model = to_dict(inputs.model)
    tok_src = tokenizer_dir(template.path) if fmt == "megatron" else template.path
    copy_tokenizer_files(tok_src, tokenizer_dir(out_dir))
    payload = {"model": model, "source": "ties_merge"}
    recorded = checkpoint_tokenizer(template.path)
    if recorded is not None:  # the inputs' tokenizer (merge_checkpoints checked they share one)
        payload[TOKENIZER_RECORD] = recorded
    write_config(out_dir, payload)  # last: digests of every file


