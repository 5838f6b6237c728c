"""``mmbert-evaluate`` (tools/evaluate.py): per-language MLM evaluation of a checkpoint on a manifest.

  --load CKPT [--tp N --pp M]   a megatron-mmbert checkpoint (any, merged ones included); with
                                --tp/--pp > 1 it relaunches itself under torchrun
  --hf_dir DIR                  a Hugging Face ModernBertForMaskedLM directory
  --compare A B C ...           several (megatron or HF) on the same masks, side by side

Writes OUT/eval.json and OUT/eval.csv (compare: OUT/compare.json, OUT/compare.csv and each model's
OUT/NAME/eval.json) and prints a table. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import List, Optional

from megatron_mmbert.cli.options import ConfigParser, parse_config, run_reporting, tool_main, tool_parser
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.evaluation.config import EvaluateConfig


PROG = "mmbert-evaluate"

FLAGS = {"verify": "--no-verify"}
"""The first release's spellings that were not the field names: deprecated aliases, kept for one release."""


def build_parser() -> "tuple[argparse.ArgumentParser, ConfigParser]":
    """The command line generated from :class:`EvaluateConfig` (every field is a flag)."""
    p = tool_parser(PROG, __doc__, raw=True)
    spec = ConfigParser(EvaluateConfig, FLAGS)
    spec.add_to(p)
    return p, spec


def _relaunch_under_torchrun(cfg: EvaluateConfig, argv: List[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.tp * cfg.pp),
           "-m", "megatron_mmbert.cli.evaluate", *argv]
    return subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # megatron-core logs six lines per shard opened; evaluation opens every language's shards.
    logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, spec = build_parser()
    try:
        cfg, _ = parse_config(parser, spec, argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {spec.explain(exc)}", file=sys.stderr)
        return 2
    if cfg is None:  # --help-config, --print-config
        return 0
    from megatron_mmbert.evaluation.run import evaluate

    def run() -> int:
        if cfg.tp * cfg.pp > 1 and "WORLD_SIZE" not in os.environ:
            return _relaunch_under_torchrun(cfg, argv)
        _, table = evaluate(cfg)
        if table:
            print(table)
            print(f"wrote {os.path.join(cfg.out, 'compare.json' if cfg.compare else 'eval.json')} and .csv")
        return 0

    return run_reporting(run, prefix=f"{PROG}: ", spec=spec)


if __name__ == "__main__":
    sys.exit(main())
