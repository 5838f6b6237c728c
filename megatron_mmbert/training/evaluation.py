"""The evaluation of a run: MLM loss and accuracy per language and per resource group, forward only,
at the current phase's row length and mask rate.

Which data: ``data.eval_manifest``; else the held-out manifest preprocessing wrote beside the
training manifest (``OUT/heldout/``, ``--holdout_docs``); else rows of the training manifest (not
held out, and logged as such).

Which languages: the phase's languages, in high / mid / low resource terciles by training-manifest
tokens (``evaluation.metrics.resource_groups``, the same terciles ``tools/evaluate.py`` reports),
each capped to ``logging.eval_languages_per_group`` (``metrics.capped_groups``: the largest of high,
the middle of mid, the smallest of low).

Which rows: ``evaluation.data.language_rows`` -- the rows and masks of ``tools/evaluate.py`` for
the same seed (the data seed), row length, mask rate and tokens per language, so a phase-end
checkpoint evaluated by the tool gives the numbers training logged. Rows are built once per phase
and split over the data-parallel ranks; every layout computes the same numbers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import torch

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.training.config import RunConfig


def eval_manifest(cfg: RunConfig) -> Tuple[str, bool]:
    """``(manifest path, held out?)`` of the evaluation rows (see the module docstring)."""
    from megatron_mmbert.data.shards import heldout_manifest_for

    if cfg.data.eval_manifest:
        return cfg.data.eval_manifest, True
    heldout = heldout_manifest_for(cfg.manifest_path)
    if heldout:
        return heldout, True
    return cfg.manifest_path, False


@dataclasses.dataclass
class PhaseEval:
    """What a phase evaluates: row settings, languages and groups, and the rows themselves."""

    phase: str
    seq_len: int
    mask_rate: float
    groups: Dict[str, List[str]]
    rows: list  # evaluation.data.LanguageRows, one per evaluated language
    skipped: List[str]  # the phase's chosen languages the evaluation manifest has too little of


class Evaluator:
    """Evaluates the model chunks of one rank; a phase's rows are built on its first evaluation."""

    def __init__(self, cfg: RunConfig, chunks, rt):
        from megatron_mmbert.data.shards import load_manifest

        self.cfg, self.chunks, self.rt = cfg, chunks, rt
        self.manifest_path, self.held_out = eval_manifest(cfg)
        self.manifest = load_manifest(self.manifest_path)
        train = self.manifest if self.manifest_path == cfg.manifest_path else load_manifest(cfg.manifest_path)
        if self.manifest.tokenizer.hash != train.tokenizer.hash:
            from megatron_mmbert.config_base import ConfigError

            raise ConfigError(f"evaluation manifest {self.manifest_path} was tokenized with "
                              f"{self.manifest.tokenizer.name!r}, not the training manifest's "
                              f"{train.tokenizer.name!r}: preprocess it with the same tokenizer")
        self.size_tokens = {lang: e.tokens for lang, e in train.languages.items()}
        self.current: Optional[PhaseEval] = None

    def settings(self, phase: PhaseConfig) -> Tuple[int, float]:
        """Row length and mask rate of ``phase``'s evaluations."""
        lc = self.cfg.logging
        mask = lc.eval_mask_rate if lc.eval_mask_rate is not None else phase.mask_rate
        return lc.eval_seq_len or phase.seq_len, mask

    def groups(self, phase: PhaseConfig) -> Dict[str, List[str]]:
        """The phase's languages in resource terciles by training tokens, capped per group."""
        import numpy as np

        from megatron_mmbert.data.schedule import active_languages
        from megatron_mmbert.evaluation import metrics

        names = sorted(self.size_tokens)
        tokens = np.array([self.size_tokens[n] for n in names], dtype=np.int64)
        active = [n for n, a in zip(names, active_languages(phase, names, tokens)) if a]
        return metrics.capped_groups(metrics.resource_groups(active, self.size_tokens),
                                     self.cfg.logging.eval_languages_per_group)

    def _build(self, phase: PhaseConfig) -> PhaseEval:
        from megatron_mmbert.evaluation.data import language_rows

        cfg = self.cfg
        seq_len, mask_rate = self.settings(phase)
        groups = self.groups(phase)
        rows, skipped = [], []
        for lang in (m for members in groups.values() for m in members):
            entry = self.manifest.languages.get(lang)
            if entry is None or entry.tokens <= 0:
                skipped.append(lang)
                continue
            n = max(1, min(cfg.logging.eval_rows_per_language, entry.tokens // seq_len))
            # One schedule takes micro-batches of one shape: the largest micro-batch dividing n.
            micro = max(d for d in range(1, min(n, cfg.phase_micro_batch(phase)) + 1) if n % d == 0)
            rows.append(language_rows(self.manifest, lang, seq_len, mask_rate, n * seq_len, cfg.data_seed,
                                      micro, cfg.data.mask_special_tokens))
        return PhaseEval(phase.name, seq_len, mask_rate, groups, rows, skipped)

    def evaluate(self, phase: PhaseConfig) -> Dict:
        """Per-language loss / accuracy / masked tokens, their means and groups
        (``evaluation.metrics.summarize``), with the settings; the same on every rank."""
        from megatron_mmbert.evaluation import metrics
        from megatron_mmbert.evaluation.data import split_rows
        from megatron_mmbert.training.step import eval_step, reduce_mlm_reports

        if self.current is None or self.current.phase != phase.name:
            self.current = self._build(phase)
        pe = self.current
        sums = {}
        for lang_rows in pe.rows:
            mine, _ = split_rows(lang_rows.batches, self.rt.data_parallel_rank, self.rt.data_parallel_size)
            if mine:
                r = eval_step(self.chunks, mine, self.rt.device)
                total = [r.loss * r.tokens, r.tokens, r.accuracy * r.tokens]
            else:  # fewer batches than data-parallel ranks: join the all-reduce with nothing
                total = reduce_mlm_reports([], self.rt.device)
            sums[lang_rows.language] = torch.tensor(total, dtype=torch.float64)
        result = metrics.summarize(sums, {r.language: r.rows for r in pe.rows}, pe.seq_len, self.size_tokens,
                                   groups=pe.groups)
        return {"manifest": os.path.abspath(self.manifest_path), "held_out": self.held_out,
                "seq_len": pe.seq_len, "mask_rate": pe.mask_rate, "skipped": pe.skipped, **result}


__all__ = ["Evaluator", "eval_manifest"]
