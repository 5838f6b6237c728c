"""``mmbert-ties-merge`` / ``tools/ties_merge.py``: merge checkpoints with TIES, task arithmetic, linear averaging or EMA.

Examples::

    # mmBERT-base: TIES over the three decay runs, against the mid-training checkpoint
    mmbert-ties-merge --base ckpt/mid --models ckpt/decay_eng ckpt/decay_cont ckpt/decay_all \\
        --spec.density 0.2 --spec.lam 1.0 --out ckpt/merged
    # mmBERT-small: exponentially weighted checkpoints along one decay run (oldest first)
    mmbert-ties-merge --spec.method ema --spec.ema_decay 0.9 --models ckpt/d/iter_1 ckpt/d/iter_2 ... --out ckpt/ema
    # inputs of both formats (megatron checkpoints, HF directories), written as an HF model
    mmbert-ties-merge --base ckpt/mid --models ckpt/decay_eng hf/decay_all --out_format hf --out merged_hf

    # mmBERT's way: the best kept checkpoint of each decay run, by held-out loss (in the report)
    mmbert-ties-merge --base ckpt/mid --models runs/decay_eng runs/decay_cont runs/decay_all \
        --select.enabled --select.manifest data/mmbert/heldout --spec.density 0.2 --out ckpt/merged
    # the same recipe as YAML (mergekit-yaml style); flags given on top win
    mmbert-ties-merge --config examples/merge/merge_decay.yaml [--spec.density 0.3]

See docs/merging.md for the algorithm, the memory bound and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import List, Optional

from megatron_mmbert.cli.options import ConfigParser, os_error_text, parse_config, tool_main, tool_parser
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.checkpoints.layout import CheckpointError
from megatron_mmbert.evaluation.select import SelectConfig
from megatron_mmbert.merge.config import MergeRecipe, run_merge


@dataclasses.dataclass
class MergeConfig(MergeRecipe):
    """A merge recipe (:class:`megatron_mmbert.merge.config.MergeRecipe`) and how its models are
    chosen: the options of ``mmbert-ties-merge``."""

    select: SelectConfig = dataclasses.field(default_factory=SelectConfig)
    """Merge each input run's best kept checkpoint by held-out loss (mmBERT merged the best checkpoint
    of each decay mixture); ``models`` then names runs. The choice is in the merge report."""


PROG = "mmbert-ties-merge"

FLAGS = {"spec.lam": "--lambda", "verify": "--no-verify"}
"""The first release's spellings that were not the field names: deprecated aliases, kept for one release."""


def build_parser() -> "tuple[argparse.ArgumentParser, ConfigParser]":
    """The command line generated from :class:`MergeConfig` (and the sections in it)."""
    p = tool_parser(PROG, "Merge model checkpoints (Megatron dist checkpoints at any TP/PP layout, or "
                    "Hugging Face ModernBERT directories) one tensor at a time. Every option is a field of "
                    "MergeConfig, spelled as its YAML key (--help-config); --config RECIPE.yaml gives them as "
                    "YAML (examples/merge/merge_decay.yaml).")
    spec = ConfigParser(MergeConfig, FLAGS, config_help="merge recipe YAML (keys: models, base, out, spec: {method, "
                        "density, ...}); flags given win")
    spec.add_to(p)
    return p, spec


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    # The merge's warnings (a model that did not branch from the base) go to stderr through logging.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser, options = build_parser()
    try:
        cfg, _ = parse_config(parser, options, argv)
        if cfg is None:  # --help-config, --print-config
            return 0
    except ConfigError as err:
        print(f"{PROG}: error: {options.explain(err)}", file=sys.stderr)
        return 2
    try:
        models, extra = cfg.models, None
        if cfg.select.enabled:
            from megatron_mmbert.evaluation.select import select_best

            selection = select_best(cfg.models, cfg.select, log=None if cfg.quiet else sys.stderr)
            models = [s["chosen"] for s in selection]
            extra = {"selection": {"config": dataclasses.asdict(cfg.select), "runs": selection}}
        report = run_merge(cfg, models, report_extra=extra)
    except ConfigError as err:
        print(f"{PROG}: error: {options.explain(err)}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, FileExistsError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only output, full disk, missing file: say which, no traceback
        print(f"{PROG}: error: {os_error_text(err)}", file=sys.stderr)
        return 1
    s = report["summary"]
    kept = ", ".join(f"{k:.3f}" for k in s["fraction_kept"])
    print(f"{PROG}: wrote {cfg.out} ({s['merged_params']} merged parameters; fraction kept per "
          f"model [{kept}]; sign-conflict rate {s['sign_conflict_rate']:.4f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
