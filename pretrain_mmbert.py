"""Pre-train mmBERT with megatron-core: parse the run config, build, train.

    torchrun --nproc_per_node 8 pretrain_mmbert.py --config examples/configs/mmbert_base.yaml \
        [--section.key value ...]

Rerunning the same command resumes from the run's latest checkpoint. ``--help-config`` lists
every field; ``--validate`` checks the config and data for a given ``--world-size`` and exits.
See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_mmbert.config_base import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run YAML (examples/configs/*.yaml)")
    parser.add_argument("--help-config", action="store_true", help="print every config field and exit")
    parser.add_argument("--validate", action="store_true", help="validate config + data and exit")
    parser.add_argument("--world-size", type=int, help="world size for --validate (default: $WORLD_SIZE or 1)")
    parser.add_argument("--skip-data", action="store_true", help="--validate without the data/checkpoint checks")
    parser.add_argument("--print-checkpoint-dir", action="store_true",
                        help="print the run's checkpoint folder and exit (examples/launch_resumable.sh)")
    args, overrides = parser.parse_known_args(argv)

    from megatron_mmbert.training import config as run_config

    if args.help_config:
        print(run_config.describe_all())
        return 0
    if not args.config:
        parser.error("--config is required")
    try:
        cfg = run_config.load_config(args.config, overrides)
        if args.print_checkpoint_dir:
            print(os.path.abspath(cfg.checkpoint_dir))
            return 0
        if args.validate:
            from megatron_mmbert.runtime import world_size_from_env
            from megatron_mmbert.training.preflight import validate

            validate(cfg, args.world_size or world_size_from_env(), check_data=not args.skip_data)
            print(f"{args.config}: valid")
            return 0
        from megatron_mmbert.training.loop import train

        return train(cfg)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails the same way; say it once
            print(f"pretrain_mmbert.py: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only run_dir, full disk, missing file: say which, no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"pretrain_mmbert.py: error on rank {os.environ.get('RANK', '0')}: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
