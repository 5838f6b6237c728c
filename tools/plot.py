#!/usr/bin/env python
"""Pictures of the schedule, a run's loss and a checkpoint comparison (matplotlib: the ``plots`` extra).

  plot.py schedule PLAN      index_plan.json (or its folder)       -> schedule.png beside it
  plot.py loss RUN           a run folder or its metrics.jsonl       -> loss.png beside it
  plot.py compare CMP        evaluate --compare's compare.json/folder -> compare.png beside it

--out FILE.png writes elsewhere. See docs/evaluation.md.
"""
import argparse
import sys


def main(argv=None) -> int:
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.evaluation import plots

    p = argparse.ArgumentParser(prog="plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["schedule", "loss", "compare"])
    p.add_argument("path", help="the data file or its folder")
    p.add_argument("--out", default=None, help="PNG path (default: next to the data)")
    args = p.parse_args(argv)
    draw = {"schedule": plots.plot_schedule, "loss": plots.plot_loss, "compare": plots.plot_compare}[args.what]
    try:
        print(f"wrote {draw(args.path, args.out)}")
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
