"""Build the blended and packed index arrays of a schedule ahead of launch, and print its tables.

    mmbert-build-index --config RUN.yaml [--data.manifest ...]   # a training run config
    mmbert-build-index --config phases.yaml --manifest data/manifest.json \
        --cache_dir data/index-cache --seed 21 [--global_batch_size 4608] [--packing best_fit]

With a training run config (the YAML given to pretrain_mmbert.py, plus the same ``--a.b value``
overrides), the manifest, data seed, cache folder, global batch size, annealing resolution, row
packing (``data.packing``, and best_fit's packed rows: ``data.packed_row`` with the phases' micro-batch
sizes) and start phase (``init.start_phase``) are the run's own, so the run finds exactly these arrays
(all of them are part of the cache key), and so is the language list of the coverage report
(``data.language_list``): ``RunConfig.index_config``. Otherwise ``--config`` holds a list of phases
(fields of ``megatron_mmbert.config.PhaseConfig``), or a mapping of ``BuildIndexConfig`` fields
(``phases:``, ``manifest:``, ``cache_dir:``, ``seed:`` ...), and the other values come from the flags.
Flags given explicitly win over either YAML; ``--help-config`` lists every field with its flag,
``--print-config`` prints the effective config as YAML. Every check is the library's
(``BuildIndexConfig.validate``, ``data.index.prebuild.prebuild_index``); this adds the flags to its
messages.

It writes ``index_plan.json`` into the index folder and prints it: per phase and language the rows,
tokens, share, ``first_token`` (where the language's stream stands when the phase starts) and the
epochs seen by the end of the phase. A decay branch's plan must show its parent's ``first_token``
for the decay phase (the run checks it against the parent's checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

from megatron_mmbert.cli.options import ConfigParser, config_yaml, load_yaml, os_error_text, tool_main, tool_parser
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.index.prebuild import BuildIndexConfig

PROG = "mmbert-build-index"


def _read_config(path: str) -> dict:
    """``--config``: a run config's mapping, a mapping of BuildIndexConfig fields, or ``{"phases": [...]}``."""
    return load_yaml(path, "BuildIndexConfig fields", list_key="phases")


def _is_run_config(data) -> bool:
    return isinstance(data, dict) and ("run_dir" in data or "model" in data or "inherit" in data)


def build_parser() -> "tuple[argparse.ArgumentParser, ConfigParser]":
    """The command line generated from :class:`BuildIndexConfig`, plus ``--config``."""
    ap = tool_parser(PROG, __doc__.split("\n\n")[0], raw=True)
    ap.add_argument("--config", help="a training run YAML (plus its --a.b value overrides), a YAML list of "
                    "phases, or a YAML mapping of BuildIndexConfig fields (phases: [...], manifest: ..., ...)")
    spec = ConfigParser(BuildIndexConfig)
    spec.add_to(ap, config_flag=False)
    return ap, spec


def load_config(args: argparse.Namespace, spec: ConfigParser, overrides: List[str], argv: Optional[List[str]] = None):
    """``(BuildIndexConfig, the training run config or None)`` from ``--config`` and the flags (flags win);
    ``overrides`` (``--a.b value``) apply to a training run config."""
    data = _read_config(args.config)
    if not _is_run_config(data):
        return spec.build(args, data, argv), None
    from megatron_mmbert.training.config import load_config as load_run_config

    run = load_run_config(args.config, overrides)
    own = run.index_config()  # the run's values; flags given explicitly win
    return spec.build(args, {f.name: getattr(own, f.name) for f in dataclasses.fields(own)}, argv), run


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    ap, spec = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = ap.parse_known_args(argv)
    if args.help_config:
        print(spec.describe())
        return 0
    if not args.config:
        ap.error("--config is required")

    from megatron_mmbert.data.index import format_index_plan
    from megatron_mmbert.data.index.prebuild import prebuild_index

    cfg = None
    try:
        if overrides and not _is_run_config(_read_config(args.config)):
            ap.error(f"unrecognized arguments: {' '.join(overrides)} (--a.b value overrides need a training run config)")
        cfg, run = load_config(args, spec, overrides, argv)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        t0 = time.time()
        built = prebuild_index(cfg, vocab_size=run.model.vocab_size if run else None,
                               run=run.index_config() if run else None, run_name=args.config)
    except ConfigError as e:
        print(f"{PROG}: error: {spec.explain(e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full disk, read-only cache folder: say which, no traceback
        where = "" if e.filename or cfg is None else f" (writing the index cache {os.path.abspath(cfg.cache_dir)})"
        print(f"{PROG}: error: {os_error_text(e)}{where}; nothing half-built is used: rerun once there is room",
              file=sys.stderr)
        return 1
    print(format_index_plan(built.index.plan, warn_epochs=cfg.warn_epochs, head=cfg.rows))
    if built.coverage is not None:
        print()
        print(built.coverage.format())
    print()
    path = built.index.path
    print(f"index ready in {path} ({time.time() - t0:.1f}s); plan: {os.path.join(path, 'index_plan.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
