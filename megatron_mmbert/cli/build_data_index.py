"""Build the blended and packed index arrays of a schedule ahead of launch, and print its tables.

    python tools/build_data_index.py --config RUN.yaml [--data.manifest ...]   # a training run config
    python tools/build_data_index.py --config phases.yaml --manifest data/manifest.json \
        --cache-dir data/index-cache --seed 21 [--global-batch-size 4608] [--packing best_fit]

With a training run config (the YAML given to pretrain_mmbert.py, plus the same ``--a.b value``
overrides), the manifest, data seed, cache folder, global batch size, annealing resolution, row
packing (``data.packing``) and start phase (``init.start_phase``) are the run's own, so the run finds exactly these arrays (all of them
are part of the cache key). Otherwise ``--config`` holds a list of phases (fields of
``megatron_mmbert.config.PhaseConfig``) and the other values come from the flags. Flags given
explicitly win over the run config.

It writes ``index_plan.json`` into the index folder and prints it: per phase and language the rows,
tokens, share, ``first_token`` (where the language's stream stands when the phase starts) and the
epochs seen by the end of the phase. A decay branch's plan must show its parent's ``first_token``
for the decay phase (the run checks it against the parent's checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError, from_dict


def load_phases(path: str) -> List[PhaseConfig]:
    """Phases from a YAML list or from the ``phases:`` section of a run YAML."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict):
        if "phases" not in data:
            raise ConfigError(f"{path}: no 'phases:' section (keys: {sorted(data)})")
        data = data["phases"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected a non-empty list of phases")
    phases = [from_dict(PhaseConfig, p, f"phases[{i}]") for i, p in enumerate(data)]
    for p in phases:
        p.validate()
    return phases


def _is_run_config(path: str) -> bool:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return isinstance(data, dict) and ("run_dir" in data or "model" in data or "inherit" in data)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a training run YAML, or a YAML list of phases")
    ap.add_argument("--manifest", help="manifest.json written by tools/preprocess_data.py (or its folder)")
    ap.add_argument("--cache-dir", help="folder for the index arrays (shared by all ranks)")
    ap.add_argument("--seed", type=int, help="data seed of the run (shuffles and masks)")
    ap.add_argument("--global-batch-size", type=int, default=None,
                    help="rows per step for phases that do not set global_batch_size (rounds sample counts)")
    ap.add_argument("--anneal-segments", type=int, default=None, help="segments per temperature-annealed phase")
    ap.add_argument("--start-phase", default=None,
                    help="first phase to build (earlier ones are planned for the stream positions only)")
    ap.add_argument("--packing", choices=["concat", "best_fit"], default=None,
                    help="row packing for a phase list (a run config's data.packing otherwise; default concat)")
    ap.add_argument("--warn-epochs", type=float, default=5.0, help="flag languages repeated more than this")
    ap.add_argument("--rows", type=int, default=15, help="top rows per table (plus 5 bottom rows)")
    args, overrides = ap.parse_known_args(argv)

    from megatron_mmbert.data.index import build_data_index, format_index_plan
    from megatron_mmbert.data.shards import check_manifest_shards, load_manifest

    try:
        if _is_run_config(args.config):
            from megatron_mmbert.training.config import load_config

            run = load_config(args.config, overrides)
            phases = run.phases
            for p in phases:
                p.validate()
            manifest_path = args.manifest or run.manifest_path
            cache_dir = args.cache_dir or run.index_cache_dir
            seed = run.data_seed if args.seed is None else args.seed
            batch = args.global_batch_size or run.batch.global_batch_size
            anneal = args.anneal_segments or run.data.anneal_segments
            start = args.start_phase or run.init.start_phase
            vocab = run.model.vocab_size
            if args.packing and args.packing != run.data.packing:
                raise ConfigError(f"--packing {args.packing} differs from {args.config}'s data.packing "
                                  f"{run.data.packing}; the run would not find this index (override with "
                                  f"--data.packing {args.packing} instead)")
            packing = run.data.packing
        else:
            if overrides:
                raise ConfigError(f"unknown arguments {overrides} (overrides need a training run config)")
            missing = [f for f in ("manifest", "cache_dir", "seed") if getattr(args, f) is None]
            if missing:
                raise ConfigError(f"{args.config} is a phase list: give --{', --'.join(m.replace('_', '-') for m in missing)}")
            phases = load_phases(args.config)
            manifest_path, cache_dir, seed = args.manifest, args.cache_dir, args.seed
            batch, anneal = args.global_batch_size, args.anneal_segments or 64
            start = args.start_phase
            vocab = None
            packing = args.packing or "concat"
        names = [p.name for p in phases]
        if start is not None and start not in names:
            raise ConfigError(f"start phase {start!r} is not a phase; phases are {names}")
        manifest = load_manifest(manifest_path)
        # Damaged or foreign shards fail here, naming the file, not in the middle of training.
        check_manifest_shards(manifest, [lang for lang, e in manifest.languages.items() if e.shards],
                              vocab or manifest.tokenizer.vocab_size)
        t0 = time.time()
        index = build_data_index(manifest, phases, seed, cache_dir, batch, anneal, is_builder=True,
                                 start_phase=names.index(start) if start else 0, packing=packing)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_index_plan(index.plan, warn_epochs=args.warn_epochs, head=args.rows))
    print()
    print(f"index ready in {index.path} ({time.time() - t0:.1f}s); plan: {os.path.join(index.path, 'index_plan.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
