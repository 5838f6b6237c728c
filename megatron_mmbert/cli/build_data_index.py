"""Build the blended and packed index arrays of a schedule ahead of launch, and print its tables.

    python tools/build_data_index.py --manifest data/manifest.json --config run.yaml \
        --cache-dir data/index-cache --seed 21 [--global-batch-size 4608]

``--config`` is a YAML file holding either a list of phases or a mapping with a ``phases:`` list
(a full run YAML); each phase has the fields of ``megatron_mmbert.config.PhaseConfig``. The
training run finds the arrays in the same cache folder when it uses the same manifest, phases,
seed, global batch size and annealing resolution (they are part of the cache key).
"""

from __future__ import annotations

import argparse
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


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="manifest.json written by tools/preprocess_data.py (or its folder)")
    ap.add_argument("--config", required=True, help="YAML with a list of phases or a run config with 'phases:'")
    ap.add_argument("--cache-dir", required=True, help="folder for the index arrays (shared by all ranks)")
    ap.add_argument("--seed", type=int, required=True, help="data seed of the run (shuffles and masks)")
    ap.add_argument("--global-batch-size", type=int, default=None,
                    help="rows per step for phases that do not set global_batch_size (rounds sample counts)")
    ap.add_argument("--anneal-segments", type=int, default=64, help="segments per temperature-annealed phase")
    ap.add_argument("--warn-epochs", type=float, default=5.0, help="flag languages repeated more than this")
    ap.add_argument("--rows", type=int, default=15, help="top rows per table (plus 5 bottom rows)")
    args = ap.parse_args(argv)

    from megatron_mmbert.data.index import build_data_index
    from megatron_mmbert.data.schedule import format_table
    from megatron_mmbert.data.shards import load_manifest

    try:
        phases = load_phases(args.config)
        manifest = load_manifest(args.manifest)
        t0 = time.time()
        index = build_data_index(manifest, phases, args.seed, args.cache_dir, args.global_batch_size,
                                 args.anneal_segments, is_builder=True)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for phase in index.phases:
        print(format_table(phase.plan, phase.counts, warn_epochs=args.warn_epochs, head=args.rows))
        print()
    print(f"index ready in {index.path} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
