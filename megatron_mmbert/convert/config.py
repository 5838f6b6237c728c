"""Options of ``mmbert-convert``'s subcommands as typed dataclasses (field docstrings are the help
text), each with its own rules (``validate()``: ``config_base.from_dict`` and the library entry
points call it)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from megatron_mmbert.config_base import ConfigError


VERIFY_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "amp_bf16": 0.25}
"""Default max |logit diff| against HF fp32. bf16 (amp_bf16's GEMMs and attention too) keeps 8
significant bits (relative rounding 2^-9 per operation); logits of a few units through a dozen or
more layers then differ by a few tenths at worst, while a wrong window, theta or weight differs by
whole units."""


@dataclasses.dataclass
class ImportHfConfig:
    """``import-hf``: an HF ModernBertForMaskedLM directory -> a megatron dist checkpoint."""

    hf_dir: str
    """HF model directory (config.json and safetensors weights)."""
    save: str
    """New output folder for the dist checkpoint (written atomically)."""
    overwrite: bool = False
    """Replace ``save`` if it is a previous import-hf output."""


@dataclasses.dataclass
class ExportHfConfig:
    """``export-hf``: a megatron dist checkpoint -> an HF directory that ``from_pretrained`` loads."""

    load: str
    """Dist checkpoint folder to export."""
    out: str
    """New output folder for the HF model (written atomically)."""
    overwrite: bool = False
    """Replace ``out`` if it is a previous export-hf output."""
    tokenizer: Optional[str] = None
    """Tokenizer to write with the model (folder, tokenizer.json or .model; default: the checkpoint's own)."""
    push_to_hub: Optional[str] = None
    """After the export, upload ``out`` with a generated model card to this Hub repo (``org/name``)."""
    private: bool = False
    """Create the ``push_to_hub`` repo private."""
    revision: Optional[str] = None
    """Branch of the ``push_to_hub`` repo to upload to (created if missing)."""
    verify: bool = True
    """Check the checkpoint's file sizes and SHA-256 against those recorded at save time."""

    def validate(self) -> None:
        if self.push_to_hub is not None:  # a repo id the Hub would refuse: say so before exporting
            from megatron_mmbert.hub import check_repo_id

            check_repo_id(self.push_to_hub)


@dataclasses.dataclass
class VerifyConfig:
    """``verify``: compare HF and megatron logits on random packed rows longer than the window."""

    hf_dir: str
    """HF model directory (the reference, always run in fp32)."""
    load: str
    """Dist checkpoint folder of our model."""
    tp: int = 1
    """Tensor-parallel size (with tp * pp > 1 the tool relaunches itself under torchrun)."""
    pp: int = 1
    """Pipeline-parallel size."""
    rows: int = 2
    """Packed rows per batch."""
    seq_len: int = 0
    """Row length (0: 4 x the sliding window, at least 64)."""
    attention_backend: Optional[Literal["auto", "te", "flash", "flex", "sdpa"]] = None
    """Attention kernel (default: the checkpoint's model.attention_backend)."""
    precision: Literal["fp32", "bf16", "amp_bf16"] = "fp32"
    """Compute precision of our model (HF always runs fp32)."""
    tolerance: Optional[float] = None
    """Max |logit diff| allowed (default 1e-3 for fp32, 0.25 for bf16 and amp_bf16)."""
    seed: int = 0
    """Seed of the random rows and of model initialisation."""
    verify: bool = True
    """Check the checkpoint's file digests before loading."""

    def validate(self) -> None:
        for name in ("tp", "pp", "rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        if self.seq_len < 0:
            raise ConfigError(f"seq_len must be >= 0 (0: 4 x the sliding window), got {self.seq_len}", field="seq_len")
        if self.tolerance is not None and not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ConfigError(f"tolerance must be a finite number >= 0, got {self.tolerance}", field="tolerance")


@dataclasses.dataclass
class StridedInitConfig:
    """``strided-init``: a smaller model's checkpoint from a larger one's by strided sampling of the
    weights (mmBERT-small from mmBERT-base; this project's rule: convert/strided.py)."""

    load: str
    """Checkpoint of the larger model (any layout)."""
    save: str
    """New output folder for the smaller model's checkpoint (loads at any layout)."""
    model: str = "mmbert-small"
    """The smaller model: a preset name (``mmbert-small``) or a YAML file of ModelConfig fields."""
    overwrite: bool = False
    """Replace ``save`` if it is a previous strided-init output."""


