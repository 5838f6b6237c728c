"""Choose the best kept checkpoint of a run by held-out MLM loss (the input of mmBERT's merge).

mmBERT-base merges "the best checkpoint of each decay mixture" with TIES (arXiv 2509.06888). A run
keeps its periodic checkpoints (``checkpoint.keep_last``: the shipped decay configs keep 10, one per
10B tokens of the 100B decay) and its ``phase_end_*``; :func:`select_best` evaluates the candidates
of each run on the same held-out rows and masks (``evaluate``'s ``compare``) and chooses the lowest
loss. The metric is the language-macro loss by default (every language counts the same, so
Decay-All's low-resource languages are not drowned by the large ones); ``loss`` is the
token-weighted one. ``tools/ties_merge.py --select.enabled`` uses it and writes the choice and every
candidate's loss into the merge report.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Dict, List, Literal, Optional, TextIO

from megatron_mmbert.config_base import ConfigError, check


@dataclasses.dataclass
class SelectConfig:
    """Selecting each input run's best kept checkpoint by held-out loss before merging."""

    enabled: bool = False
    """Each model given is a run (its folder or its ``checkpoints/`` folder); merge the kept
    checkpoint with the lowest held-out loss of each instead."""
    manifest: Optional[str] = None
    """Held-out manifest the candidates are scored on (``OUT/heldout`` of preprocessing; not the
    training data)."""
    metric: Literal["macro_loss", "loss"] = "macro_loss"
    """``macro_loss``: the mean of the per-language losses; ``loss``: token-weighted."""
    phase: Optional[str] = None
    """Candidates: the checkpoints saved in this phase (None: the phase of each run's newest one)."""
    mask_rate: float = 0.15
    """Masking rate of the evaluation (15%: ModernBERT's evaluation rate)."""
    seq_len: int = 512
    """Tokens per evaluated row."""
    tokens_per_language: int = 16384
    """Row capacity evaluated per language."""
    seed: int = 0
    """Seed of the evaluation rows and masks (the same for every candidate)."""

    def validate(self) -> None:
        if self.enabled and not self.manifest:
            raise ConfigError("select: give the held-out manifest to score the candidates on", field="manifest")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"mask_rate must be in (0, 1), got {self.mask_rate}", field="mask_rate")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}", field="seq_len")
        if self.tokens_per_language < 1:
            raise ConfigError(f"tokens_per_language must be >= 1, got {self.tokens_per_language}",
                              field="tokens_per_language")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}", field="seed")


def run_checkpoints(path: str, phase: Optional[str] = None) -> List[Dict]:
    """The complete checkpoints of the run at ``path`` (a run folder or its ``checkpoints/``) saved in
    ``phase`` (default: the newest one's phase), oldest first, each ``{checkpoint, step, phase}``."""
    from megatron_mmbert.checkpoints import dist as ckpt
    from megatron_mmbert.checkpoints.layout import read_config

    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    found = []
    for c in ckpt.complete_checkpoints(root):
        state = read_config(c).get("train_state") or {}
        found.append({"checkpoint": c, "step": int(state.get("step", -1)), "phase": state.get("phase")})
    if not found:
        raise ConfigError(f"select: {path} holds no complete training checkpoint (give a run folder or its "
                          "checkpoints/ folder)", field="select.enabled")
    want = phase or found[0]["phase"]  # complete_checkpoints lists the newest first
    chosen = [f for f in found if f["phase"] == want]
    if not chosen:
        raise ConfigError(f"select: {path} has no checkpoint of phase {want!r} (it has "
                          f"{sorted({str(f['phase']) for f in found})})", field="select.phase")
    # A phase-end checkpoint and the periodic save of the same step hold the same weights: keep one.
    seen, unique = set(), []
    for f in sorted(chosen, key=lambda f: (f["step"], os.path.basename(f["checkpoint"]).startswith("iter_"))):
        if f["step"] not in seen:
            seen.add(f["step"])
            unique.append(f)
    return unique


def select_best(runs: List[str], cfg: SelectConfig, log: Optional[TextIO] = sys.stderr) -> List[Dict]:
    """Per run: its candidates with their held-out losses, the chosen one and why."""
    from megatron_mmbert.evaluation.config import EvaluateConfig
    from megatron_mmbert.evaluation.run import evaluate

    check(dataclasses.replace(cfg, enabled=True), "select")  # SelectConfig.validate, as merging names it
    out = []
    for run in runs:
        candidates = run_checkpoints(run, cfg.phase)
        paths = [c["checkpoint"] for c in candidates]
        with tempfile.TemporaryDirectory(prefix="mmbert-select-") as tmp:
            common = dict(manifest=cfg.manifest, out=os.path.join(tmp, "eval"), seq_len=cfg.seq_len,
                          mask_rate=cfg.mask_rate, tokens_per_language=cfg.tokens_per_language, seed=cfg.seed,
                          quiet=True)
            if len(paths) == 1:
                result, _ = evaluate(EvaluateConfig(load=paths[0], **common))
                means = [result["mean"]]
            else:
                payload, _ = evaluate(EvaluateConfig(compare=paths, **common))
                by_path = {os.path.abspath(p): n for n, p in payload["paths"].items()}
                means = [payload["results"][by_path[os.path.abspath(p)]]["mean"] for p in paths]
        for c, mean in zip(candidates, means):
            c["loss"], c["macro_loss"] = float(mean["loss"]), float(mean["macro_loss"])
        best = min(candidates, key=lambda c: (c[cfg.metric], -c["step"]))
        why = (f"lowest held-out {cfg.metric} ({best[cfg.metric]:.4f}) of {len(candidates)} kept checkpoint(s) of "
               f"phase {best['phase']!r}, at {cfg.mask_rate:g} masking on {cfg.manifest}")
        out.append({"run": run, "chosen": best["checkpoint"], "why": why, "metric": cfg.metric,
                    "candidates": candidates})
        if log is not None:
            table = ", ".join(f"{os.path.basename(c['checkpoint'])} {c[cfg.metric]:.4f}" for c in candidates)
            print(f"[select] {run}: {os.path.basename(best['checkpoint'])} ({why}); candidates: {table}",
                  file=log, flush=True)
    return out


__all__ = ["SelectConfig", "run_checkpoints", "select_best"]
