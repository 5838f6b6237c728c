"""A merge recipe as one typed config (YAML or ``mmbert-ties-merge`` flags) and the library entry
that runs it, :func:`run_merge`: the same checks whether the recipe came from a command line or
from Python."""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Dict, List, Literal, Optional, Sequence, TextIO

from megatron_mmbert.config_base import ConfigError, check
from megatron_mmbert.merge.stream import DEFAULT_CHUNK_BYTES, merge_checkpoints
from megatron_mmbert.merge.ties import MergeSpec


@dataclasses.dataclass
class MergeRecipe:
    """A merge recipe: the checkpoints, the method and where the result goes (YAML or flags)."""

    models: List[str]
    """Checkpoints to merge (Megatron dist checkpoints or HF directories; ema: oldest first)."""
    out: str
    """Output checkpoint directory (written atomically)."""
    base: Optional[str] = None
    """Checkpoint the models branched from (required for ties and task_arithmetic)."""
    spec: MergeSpec = dataclasses.field(default_factory=MergeSpec)
    """What to compute: method, weights, density, lambda, trim, normalize, EMA decay."""
    out_format: Optional[Literal["megatron", "hf"]] = None
    """Output checkpoint format (default: the base's, else the first model's); inputs may mix formats."""
    chunk_mb: float = DEFAULT_CHUNK_BYTES / 2**20
    """Largest block of a tensor processed at once, in MiB of float64 (the compute dtype; bounds memory)."""
    overwrite: bool = False
    """Replace ``out`` if it is a previous ties_merge output."""
    verify: bool = True
    """Check megatron inputs' file sizes and SHA-256 against those recorded at save time."""
    allow_other_tokenizer: bool = False
    """Merge inputs made with different tokenizers (recorded in their checkpoints, or their
    ``tokenizer.json``); off: stop naming two of them."""
    quiet: bool = False
    """No progress lines."""

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mb * 2**20)

    def validate(self) -> None:
        """The recipe's own fields and its spec against its models (the spec's own rules are
        :meth:`MergeSpec.validate`, run as a nested section)."""
        if not (math.isfinite(self.chunk_mb) and self.chunk_mb > 0 and self.chunk_bytes >= 1):
            raise ConfigError(f"chunk_mb must be a positive number, got {self.chunk_mb}", field="chunk_mb")
        self.spec.check_models(len(self.models), where="spec")
        if self.spec.needs_base and self.base is None:
            raise ConfigError(f"method {self.spec.method} needs base (the checkpoint the models branched from)",
                              field="base")


def run_merge(cfg: MergeRecipe, models: Optional[Sequence[str]] = None,
              report_extra: Optional[Dict[str, object]] = None,
              log: Optional[TextIO] = None) -> Dict[str, object]:
    """Merge as ``cfg`` says (``models``: the checkpoints chosen for ``cfg.models``, e.g. each run's
    best; default ``cfg.models``); returns the merge report. ``cfg`` is checked first, whoever built it.
    Progress goes to ``log`` (default: standard error) unless ``cfg.quiet``."""
    check(cfg)
    log = sys.stderr if log is None else log
    return merge_checkpoints(
        cfg.base, list(cfg.models if models is None else models), cfg.spec, cfg.out, out_format=cfg.out_format,
        chunk_bytes=cfg.chunk_bytes, overwrite=cfg.overwrite, log=None if cfg.quiet else log, verify=cfg.verify,
        report_extra=report_extra, allow_other_tokenizer=cfg.allow_other_tokenizer,
    )


__all__ = ["MergeRecipe", "run_merge"]
