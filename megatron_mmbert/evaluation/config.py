"""Options of ``tools/evaluate.py`` and ``tools/plot.py`` as typed dataclasses (field docstrings are
the help text), each with its own rules (``validate()``: ``config_base.from_dict`` and the library
entry points call it)."""

from __future__ import annotations

import dataclasses
from typing import List, Literal, Optional

from megatron_mmbert.config_base import ConfigError


@dataclasses.dataclass
class EvaluateConfig:
    """Per-language MLM evaluation of one checkpoint, or several side by side."""

    manifest: str
    """Manifest to read rows from: a ``manifest.json`` or its folder (a held-out manifest has the
    training manifest's format)."""
    out: str
    """Output folder for ``eval.json`` / ``eval.csv`` (``compare.json`` / ``compare.csv`` with
    ``compare``). Created if missing; an existing folder must be empty or a previous evaluate output."""
    load: Optional[str] = None
    """A megatron-mmbert checkpoint (training, ``phase_end_*``, imported or merged)."""
    hf_dir: Optional[str] = None
    """A Hugging Face ``ModernBertForMaskedLM`` directory (e.g. ``convert_checkpoint.py export-hf``)."""
    compare: List[str] = dataclasses.field(default_factory=list)
    """Several checkpoints (megatron or HF folders, told apart by their files) evaluated on the same
    masks and shown side by side with each language's winner."""
    tp: int = 1
    """Tensor-parallel size for megatron checkpoints (> 1 relaunches under torchrun)."""
    pp: int = 1
    """Pipeline-parallel size for megatron checkpoints."""
    seq_len: int = 512
    """Tokens per evaluated row (documents packed, long ones split, as in training)."""
    mask_rate: float = 0.15
    """Fraction of non-special tokens selected for prediction (80% <mask>, 10% random, 10% kept)."""
    tokens_per_language: int = 16384
    """Row capacity evaluated per language (rounded down to whole rows, at least one; capped at the
    language's tokens so that no token is read twice)."""
    seed: int = 0
    """Masks and row order come from (seed, language, row) only: the same for every model and layout."""
    languages: str = "all"
    """``all``, ``top:N`` (the N largest in the manifest) or a comma-separated list of names."""
    size_manifest: Optional[str] = None
    """Manifest whose token counts rank languages into high/mid/low resource groups (default:
    ``manifest``). Give the training manifest when evaluating a held-out one, whose per-language
    sizes are alike by construction."""
    micro_batch_rows: int = 4
    """Rows per forward pass."""
    mask_special_tokens: bool = False
    """Let special tokens be selected too (as ``data.mask_special_tokens`` in training)."""
    verify: bool = True
    """Check a megatron checkpoint's file digests before loading it."""
    allow_other_tokenizer: bool = False
    """Evaluate a model whose tokenizer (recorded in its checkpoint, or its ``tokenizer.json``) is not
    the manifest's. Off: stop naming both, since the ids would mean other tokens and the loss be wrong."""
    quiet: bool = False
    """No per-language progress lines."""

    def validate(self) -> None:
        """Every problem of the options at once (the CLI adds the flag of each field)."""
        errors = []
        sources = sum(bool(x) for x in (self.load, self.hf_dir, self.compare))
        if sources != 1:
            errors.append(ConfigError("give exactly one of load (a checkpoint), hf_dir (a Hugging Face folder) or "
                                      "compare (two or more of either)", field="load"))
        if self.compare and len(self.compare) < 2:
            errors.append(ConfigError("compare needs at least two checkpoints", field="compare"))
        if self.seq_len < 2:
            errors.append(ConfigError(f"seq_len must be >= 2, got {self.seq_len}", field="seq_len"))
        if not 0.0 < self.mask_rate < 1.0:
            errors.append(ConfigError(f"mask_rate must be in (0, 1), got {self.mask_rate}", field="mask_rate"))
        for name in ("tokens_per_language", "micro_batch_rows", "tp", "pp"):
            if getattr(self, name) < 1:
                errors.append(ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name))
        if self.seed < 0:
            errors.append(ConfigError(f"seed must be >= 0, got {self.seed}", field="seed"))
        if errors:
            raise ConfigError.combine(errors)


@dataclasses.dataclass
class PlotConfig:
    """One picture (matplotlib, the ``plots`` extra) drawn from the data file it shows."""

    what: Literal["schedule", "loss", "compare"]
    """``schedule``: an index plan's language shares and epochs per phase; ``loss``: a run's
    training (and evaluation) loss; ``compare``: ``evaluate --compare``'s per-language losses."""
    path: str
    """The data: ``index_plan.json`` (schedule), a run folder or its ``metrics.jsonl`` (loss),
    ``compare.json`` (compare), or the folder holding it."""
    out: Optional[str] = None
    """PNG to write (None: ``{what}.png`` beside the data)."""
    max_languages: int = 60
    """schedule: languages shown at most (beyond it every k-th language is shown); compare: a
    resource group of at most this many languages is labelled language by language."""
    baseline: Optional[str] = None
    """compare: the model the others are measured against (None: the first model compared)."""

    def validate(self) -> None:
        if self.max_languages < 1:
            raise ConfigError(f"max_languages must be >= 1, got {self.max_languages}", field="max_languages")
