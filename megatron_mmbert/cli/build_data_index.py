"""Build the blended and packed index arrays of a schedule ahead of launch, and print its tables.

    mmbert-build-index --config RUN.yaml [--data.manifest ...]   # a training run config
    mmbert-build-index --config phases.yaml --manifest data/manifest.json \
        --cache_dir data/index-cache --seed 21 [--global_batch_size 4608] [--packing best_fit]

With a training run config (the YAML given to pretrain_mmbert.py, plus the same ``--a.b value``
overrides), the manifest, data seed, cache folder, global batch size, annealing resolution, row
packing (``data.packing``, and best_fit's packed rows: ``data.packed_row`` with the phases' micro-batch
sizes) and start phase (``init.start_phase``) are the run's own, so the run finds exactly these arrays
(all of them are part of the cache key). Otherwise ``--config`` holds a list of phases (fields of
``megatron_mmbert.config.PhaseConfig``), or a mapping of ``BuildIndexConfig`` fields (``phases:``,
``manifest:``, ``cache_dir:``, ``seed:`` ...), and the other values come from the flags. Flags given
explicitly win over either YAML; ``--help-config`` lists every field with its flag, ``--print-config``
prints the effective config as YAML.

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
from typing import List, Literal, Optional

from megatron_mmbert.cli.options import ConfigParser, config_yaml, os_error_text, tool_main, tool_parser
from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError


@dataclasses.dataclass
class BuildIndexConfig:
    """What to build: the phases, the data and the run values that key the index cache.

    From a training run config all but the last two fields are the run's own; from a phase list
    (``--config phases.yaml``: a YAML list of phases, or a mapping with ``phases:`` and these
    fields) ``manifest``, ``cache_dir`` and ``seed`` must be given.
    """

    phases: List[PhaseConfig] = dataclasses.field(default_factory=list)
    """The training phases (fields of ``PhaseConfig``), in order."""
    manifest: Optional[str] = None
    """manifest.json written by tools/preprocess_data.py (or its folder)."""
    cache_dir: Optional[str] = None
    """Folder for the index arrays (shared by all ranks)."""
    seed: Optional[int] = None
    """Data seed of the run (shuffles and masks)."""
    global_batch_size: Optional[int] = None
    """Rows per step for phases that do not set global_batch_size (rounds sample counts)."""
    anneal_segments: int = 64
    """Segments per temperature-annealed phase."""
    start_phase: Optional[str] = None
    """First phase to build (earlier ones are planned for the stream positions only)."""
    packing: Optional[Literal["concat", "best_fit"]] = None
    """Row packing (``data.packing`` of the run: ``best_fit`` as mmBERT, or ``concat``); from a run
    config it must equal the run's, else the run would not find this index. Phase lists: default concat."""
    bin_rows: Optional[List[int]] = None
    """best_fit: ``seq_len`` rows per packed row, one per phase (None: one row each). From a run config:
    its micro-batch sizes under ``data.packed_row: micro_batch`` (the reference's geometry)."""
    language_list: str = "mmbert-1833"
    """Report which languages of this list the manifest lacks and which keys it has beyond it
    (``data/languages.py``): ``mmbert-1833`` (mmBERT's released 1,833), a file of codes, or ``none``."""
    threads: int = 0
    """Languages packed at once (0: every CPU this process may use); the arrays do not depend on it."""
    warn_epochs: float = 5.0
    """Flag languages repeated more than this many epochs."""
    rows: int = 15
    """Top rows per table (plus 5 bottom rows)."""


PROG = "mmbert-build-index"


def _read_yaml(path: str):
    from megatron_mmbert.config_base import YAMLTooLarge, safe_load_yaml

    try:
        with open(path, encoding="utf-8") as f:
            return safe_load_yaml(f, f"--config {path}")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except YAMLTooLarge as e:
        raise ConfigError(str(e)) from None


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
    """``(BuildIndexConfig, vocab_size or None)`` from ``--config`` and the flags (flags win)."""
    data = _read_yaml(args.config)
    if _is_run_config(data):
        from megatron_mmbert.training.config import load_config as load_run_config

        run = load_run_config(args.config, overrides)
        base = {"phases": list(run.phases), "manifest": run.manifest_path, "cache_dir": run.index_cache_dir,
                "seed": run.data_seed, "global_batch_size": run.batch.global_batch_size,
                "anneal_segments": run.data.anneal_segments, "start_phase": run.init.start_phase,
                "packing": run.data.packing, "bin_rows": run.packing_bin_rows()}
        cfg, vocab = spec.build(args, base, argv), run.model.vocab_size
        if cfg.bin_rows != run.packing_bin_rows():
            raise ConfigError(f"bin_rows {cfg.bin_rows} differs from {args.config}'s packed rows {run.packing_bin_rows()} "
                              "(data.packed_row, batch.micro_batch_size); the run would not find this index (override "
                              "the run's settings instead)", field="bin_rows")
        if cfg.packing != run.data.packing:
            raise ConfigError(f"packing {cfg.packing} differs from {args.config}'s data.packing {run.data.packing}; "
                              "the run would not find this index (override the run's data.packing instead)",
                              field="packing")
    else:
        if overrides:
            raise ConfigError(f"unknown arguments {overrides} (overrides need a training run config)")
        if isinstance(data, list):
            data = {"phases": data}
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: expected a list of phases or a mapping with 'phases:'")
        cfg, vocab = spec.build(args, data, argv), None
        missing = [f for f in ("manifest", "cache_dir", "seed") if getattr(cfg, f) is None]
        if missing:
            raise ConfigError(f"{args.config} is a phase list: give {', '.join(spec.flag_for(m) for m in missing)} "
                              f"(or the keys {', '.join(missing)} next to phases: in the YAML)", field=missing[0])
    if not cfg.phases:
        raise ConfigError(f"{args.config}: no phases (a non-empty list of phases is needed)", field="phases")
    for p in cfg.phases:
        p.validate()
    return cfg, vocab


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

    from megatron_mmbert.data.index import build_data_index, format_index_plan
    from megatron_mmbert.data.languages import LanguageListError, manifest_coverage
    from megatron_mmbert.data.shards import check_manifest_shards, load_manifest

    cfg = None
    try:
        cfg, vocab = load_config(args, spec, overrides, argv)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        names = [p.name for p in cfg.phases]
        start = cfg.start_phase
        if start is not None and start not in names:
            raise ConfigError(f"start_phase {start!r} is not a phase; phases are {names}", field="start_phase")
        manifest = load_manifest(cfg.manifest)
        try:
            coverage = manifest_coverage(manifest, cfg.language_list)
        except LanguageListError as e:
            raise ConfigError(str(e), field="language_list") from None
        # Damaged or foreign shards fail here, naming the file, not in the middle of training.
        check_manifest_shards(manifest, [lang for lang, e in manifest.languages.items() if e.shards],
                              vocab or manifest.tokenizer.vocab_size)
        t0 = time.time()
        index = build_data_index(manifest, cfg.phases, cfg.seed, cfg.cache_dir, cfg.global_batch_size,
                                 cfg.anneal_segments, is_builder=True,
                                 start_phase=names.index(start) if start else 0,
                                 packing=cfg.packing or "concat", bin_rows=cfg.bin_rows, threads=cfg.threads)
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
    print(format_index_plan(index.plan, warn_epochs=cfg.warn_epochs, head=cfg.rows))
    if coverage is not None:
        print()
        print(coverage.format())
    print()
    print(f"index ready in {index.path} ({time.time() - t0:.1f}s); plan: {os.path.join(index.path, 'index_plan.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
