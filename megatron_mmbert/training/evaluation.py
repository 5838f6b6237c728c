"""The evaluation loss of a run: MLM loss per language group, forward only.

Rows come from the held-out manifest (``data.eval_manifest``) or, without one, from the training
manifest with another seed (not held out; logged as such). Each group is one pseudo-phase of an
:class:`~megatron_mmbert.data.mlm.MLMStream` of ``logging.eval_rows_per_group`` rows (rounded to
the data-parallel size), so every parallel layout evaluates the same rows and computes the same
numbers.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.training.config import RunConfig


def eval_groups(cfg: RunConfig) -> Dict[str, List[str]]:
    """Language groups evaluated: ``logging.eval_groups``, or the manifest's languages by tokens in
    thirds (``high``/``mid``/``low``)."""
    if cfg.logging.eval_groups:
        return dict(cfg.logging.eval_groups)
    from megatron_mmbert.data.shards import load_manifest

    manifest = load_manifest(cfg.data.eval_manifest or cfg.manifest_path)
    langs = sorted((lang for lang, e in manifest.languages.items() if e.tokens > 0),
                   key=lambda lang: (-manifest.languages[lang].tokens, lang))
    k = max(1, math.ceil(len(langs) / 3))
    groups = {"high": langs[:k], "mid": langs[k:2 * k], "low": langs[2 * k:]}
    return {g: v for g, v in groups.items() if v}


class Evaluator:
    """Evaluates the model chunks of one rank; the stream is built on first use."""

    def __init__(self, cfg: RunConfig, chunks, rt):
        self.cfg, self.chunks, self.rt = cfg, chunks, rt
        self.stream = None
        self.rows: Optional[int] = None

    def _build(self) -> None:
        from megatron_mmbert.data.mlm import MLMStream

        cfg = self.cfg
        seq = cfg.logging.eval_seq_len or cfg.phases[0].seq_len
        dp = self.rt.data_parallel_size
        rows = max(dp, cfg.logging.eval_rows_per_group // dp * dp)
        phases = [
            PhaseConfig(name=f"eval_{g}", tokens=rows * seq, seq_len=seq, mask_rate=cfg.logging.eval_mask_rate,
                        languages=langs, temperature=1.0, global_batch_size=rows)
            for g, langs in eval_groups(cfg).items()
        ]
        self.stream = MLMStream(cfg.data.eval_manifest or cfg.manifest_path, phases, cfg.data_seed + 1,
                                cache_dir=None, mask_special_tokens=cfg.data.mask_special_tokens,
                                packing=cfg.data.packing)
        self.rows = rows

    def evaluate(self) -> Dict[str, float]:
        """MLM loss per language group (forward only, every layout computes the same numbers)."""
        from megatron_mmbert.training.step import eval_step

        if self.stream is None:
            self._build()
        per_rank = self.rows // self.rt.data_parallel_size
        first = self.rt.data_parallel_rank * per_rank
        losses = {}
        for name in self.stream.phase_names:
            batches = [self.stream.batch(name, [i]) for i in range(first, first + per_rank)]
            losses[name[len("eval_"):]] = eval_step(self.chunks, batches, self.rt.device).loss
        return losses


__all__ = ["Evaluator", "eval_groups"]
