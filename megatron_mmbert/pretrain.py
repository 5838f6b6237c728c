"""Pre-train mmBERT with megatron-core: parse the run config, build, train.

    mmbert-pretrain --config tiny-cpu --data.manifest RUN/shards --run_dir RUN/train
    torchrun --nproc_per_node 8 -m megatron_mmbert.pretrain --config mmbert-base [--section.key value ...]

``--config`` takes a YAML file or the name of a shipped config (``--list-configs``). Rerunning the
same command resumes from the run's latest checkpoint. ``--help-config`` lists every field;
``--print-config`` prints the effective config (after ``inherit:``, phase edits and overrides) as YAML;
``--validate`` checks the config and data for a given ``--world-size`` and exits. See
docs/training.md.
"""

from __future__ import annotations

import os
import sys

from megatron_mmbert.cli.options import config_yaml, tool_main, tool_parser
from megatron_mmbert.config_base import ConfigError

PROG = "mmbert-pretrain"


def run_is_complete(cfg) -> bool:
    """True when the run's latest checkpoint ends its last phase, as the trainer decides it on resume
    (:func:`megatron_mmbert.training.state.run_complete`). A checkpoint from before the record held
    its phase's rows ends the run only as the last phase's phase-end save."""
    from megatron_mmbert.checkpoints import dist as ckpt
    from megatron_mmbert.checkpoints.layout import phase_end_name
    from megatron_mmbert.training.state import run_complete

    latest = ckpt.read_latest(cfg.checkpoint_dir)
    if latest is None:
        return False
    record = ckpt.read_config(latest).get("train_state") or {}
    names = [p.name for p in cfg.phases]
    if record.get("phase_samples") is not None:
        return run_complete(record, names)
    return os.path.basename(os.path.normpath(latest)) == phase_end_name(names[-1])


def configure_logging(rank: int) -> None:
    """Timestamped log records on stdout, in order with the training log lines: this package's
    start-up lines (attention backend, parallel layout, precision, data plan) at INFO on rank 0;
    other ranks only WARNING and above, each saying its rank. Other libraries stay at WARNING."""
    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s{'' if rank == 0 else f' [rank {rank}]'} %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("megatron_mmbert").setLevel(logging.INFO if rank == 0 else logging.WARNING)


@tool_main
def main(argv=None) -> int:
    parser = tool_parser(PROG, __doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run YAML, or the name of a shipped config (see --list-configs)")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    parser.add_argument("--help-config", action="store_true", help="print every config field and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (after inherit:, phase edits and overrides) as YAML and exit")
    parser.add_argument("--validate", action="store_true", help="validate config + data and exit")
    parser.add_argument("--world-size", type=int, help="world size for --validate (default: $WORLD_SIZE or 1)")
    parser.add_argument("--skip-data", action="store_true", help="--validate without the data/checkpoint checks")
    parser.add_argument("--print-checkpoint-dir", action="store_true",
                        help="print the run's checkpoint folder and exit (examples/launch_resumable.sh)")
    parser.add_argument("--is-complete", action="store_true",
                        help="exit 0 if the run has finished its last phase, else 1 (the sbatch scripts "
                             "requeue a job that stopped cleanly before that)")
    parser.add_argument("--slurm-task", action="store_true",
                        help="one srun task per GPU: take RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID / "
                             "SLURM_LOCALID / SLURM_NTASKS (examples/slurm/pretrain.sbatch)")
    args, overrides = parser.parse_known_args(argv)

    from megatron_mmbert.training import config as run_config

    if args.help_config:
        print(run_config.describe_all())
        return 0
    if args.list_configs:
        print(run_config.describe_shipped_configs())
        return 0
    if not args.config:
        parser.error("--config is required (a YAML file or a shipped config name: --list-configs)")
    try:
        if args.slurm_task:
            from megatron_mmbert.slurm import torch_env_from_slurm

            os.environ.update(torch_env_from_slurm())
        configure_logging(int(os.environ.get("RANK", "0")))
        cfg = run_config.load_config(args.config, overrides)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        if args.print_checkpoint_dir:
            print(os.path.abspath(cfg.checkpoint_dir))
            return 0
        if args.is_complete:
            return 0 if run_is_complete(cfg) else 1
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
            print(f"{PROG}: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only run_dir, full disk, missing file: say which, no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: error on rank {os.environ.get('RANK', '0')}: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
