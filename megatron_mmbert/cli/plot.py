"""``mmbert-plot`` (tools/plot.py): pictures of the schedule, a run's loss and a checkpoint comparison (matplotlib:
the ``plots`` extra).

  mmbert-plot schedule PLAN      index_plan.json (or its folder)        -> schedule.png beside it
  mmbert-plot loss RUN           a run folder or its metrics.jsonl        -> loss.png beside it
  mmbert-plot compare CMP        evaluate --compare's compare.json/folder -> compare.png beside it

Every option is a field of PlotConfig (--help-config); --config FILE.yaml gives them as YAML, and
the two positionals stand for --what and --path. --out FILE.png writes elsewhere. See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from megatron_mmbert.cli.options import ConfigParser, config_yaml, load_yaml, run_reporting, tool_main, tool_parser
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.evaluation.config import PlotConfig


PROG = "mmbert-plot"


def build_parser() -> "tuple[argparse.ArgumentParser, ConfigParser]":
    """The command line generated from :class:`PlotConfig`, plus ``WHAT PATH`` as positionals."""
    p = tool_parser(PROG, __doc__, raw=True)
    p.add_argument("pos_what", nargs="?", metavar="what", choices=["schedule", "loss", "compare"],
                   help="the picture (same as --what)")
    p.add_argument("pos_path", nargs="?", metavar="path", help="the data file or its folder (same as --path)")
    spec = ConfigParser(PlotConfig)
    spec.add_to(p)
    return p, spec


def parse(argv: Optional[List[str]] = None) -> Optional[PlotConfig]:
    """The config from ``argv``: ``--config`` YAML, then the positionals, then the flags (None after
    ``--help-config`` or ``--print-config``). Errors name the field and its flag."""
    parser, spec = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.help_config:
        print(spec.describe())
        return None
    try:
        base = load_yaml(args.config) if args.config else {}
        base.update({k: v for k, v in (("what", args.pos_what), ("path", args.pos_path)) if v is not None})
        cfg = spec.build(args, base, argv)
    except ConfigError as exc:
        raise ConfigError(spec.explain(exc)) from None
    if args.print_config:
        print(config_yaml(cfg), end="")
        return None
    return cfg


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse(argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if cfg is None:  # --help-config, --print-config
        return 0
    from megatron_mmbert.evaluation import plots

    def draw() -> int:
        if cfg.what == "schedule":
            written = plots.plot_schedule(cfg.path, cfg.out, cfg.max_languages)
        elif cfg.what == "loss":
            written = plots.plot_loss(cfg.path, cfg.out)
        else:
            written = plots.plot_compare(cfg.path, cfg.out, cfg.max_languages, cfg.baseline)
        print(f"wrote {written}")
        return 0

    return run_reporting(draw, prefix=f"{PROG}: ")


if __name__ == "__main__":
    sys.exit(main())
