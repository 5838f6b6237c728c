"""``mmbert-preprocess`` / ``tools/preprocess_data.py``: raw text -> per-language Megatron shards.

Example (FineWeb2 layout, 8 workers)::

    mmbert-preprocess --inputs /data/fineweb-2 --output /data/shards \\
        --tokenizer /models/mmBERT-base --workers 8

Writes ``OUT/{lang}/part-*.bin/.idx`` and ``OUT/manifest.json``; rerunning resumes. Every option is a
field of ``PreprocessConfig`` (``--help-config``), also accepted as YAML (``--config pre.yaml``; flags
given win; ``--print-config`` shows the result). ``--holdout_docs N`` also writes ``OUT/heldout/`` (N documents per language,
chosen by content hash, with their own manifest.json). Across nodes: a Slurm array runs one shard per task (``--num_shards``/``--shard_index``, read
from ``SLURM_ARRAY_TASK_*``), then one ``--finalize`` job writes the manifest
(examples/slurm/preprocess_array.sbatch). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mmbert.cli.options import ConfigParser, Flag, os_error_text, parse_config, tool_main, tool_parser
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess, slurm_array_shard
from megatron_mmbert.data.sources import InputError
from megatron_mmbert.data.tokenizer import TokenizerError
from megatron_mmbert.data.shards import heldout_manifest_for, load_manifest


PROG = "mmbert-preprocess"

FLAGS = {
    "inputs": Flag("--input"),
    "chunk_bytes": Flag("--chunk-mb", type=float, to_field=lambda mb: max(1, int(mb * (1 << 20))) if mb > 0 else 0,
                        help="the same in MiB; use --chunk_bytes (bytes)"),
    "log_interval_s": "--log-interval",
    "framing.bos": "--no-bos",
    "framing.eos": "--no-eos",
}
"""The first release's spellings that were not the field names: deprecated aliases, kept for one release."""


def build_parser() -> "tuple[argparse.ArgumentParser, ConfigParser]":
    """The command line generated from :class:`PreprocessConfig` (every field is a flag)."""
    p = tool_parser(PROG, "Tokenize raw text into per-language megatron-core MMIDIDX shards plus manifest.json. "
                    "Every option is a field of PreprocessConfig, spelled as its YAML key (--help-config); "
                    "--config FILE.yaml gives them as YAML.")
    spec = ConfigParser(PreprocessConfig, FLAGS)
    spec.add_to(p)
    return p, spec


def _report_coverage(manifest, language_list: str) -> None:
    """Which languages of the list the manifest lacks and which keys it has beyond it (stderr)."""
    from megatron_mmbert.data.languages import LanguageListError, manifest_coverage

    try:
        cov = manifest_coverage(manifest, language_list)
    except LanguageListError as e:  # the shards are written; only the report is lost
        print(f"preprocess_data: warning: no language coverage report: {e}", file=sys.stderr)
        return
    if cov is not None:
        print("preprocess_data: " + cov.format(), file=sys.stderr)


@tool_main
def main(argv=None) -> int:
    parser, spec = build_parser()
    try:
        cfg, _ = parse_config(parser, spec, argv)
        if cfg is None:  # --help-config, --print-config
            return 0
        if cfg.num_shards == 1 and cfg.shard_index is None and not cfg.finalize:
            cfg.num_shards, cfg.shard_index = slurm_array_shard() or (1, None)
    except ConfigError as e:  # also SLURM_ARRAY_TASK_* that name no shard (a PreprocessError)
        print(f"{PROG}: error: {spec.explain(e)}", file=sys.stderr)
        return 2
    try:
        result = run_preprocess(cfg)  # checks the options first (each section's validate, the language list)
    except (PreprocessError, TokenizerError, InputError) as e:  # refused while running (InputError: BadInputError too)
        print(f"{PROG}: error: {spec.explain(e)}", file=sys.stderr)
        return 1
    except ConfigError as e:  # options that fail their own checks: a usage error, as from the parser
        print(f"{PROG}: error: {spec.explain(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only output, full disk: say which file, no traceback
        print(f"{PROG}: error: {os_error_text(e)}", file=sys.stderr)
        return 1
    m = result.manifest
    if m is None:
        print(f"{PROG}: shard done ({result.units_in_shard} unit(s) of {result.units_total}); when every "
              "shard task has finished, run the same command with --finalize and no shard flags", file=sys.stderr)
        return 0
    print(
        f"{PROG}: {len(m.languages)} languages, {sum(e.documents for e in m.languages.values())} "
        f"documents, {sum(e.tokens for e in m.languages.values())} tokens -> {cfg.output}/manifest.json",
        file=sys.stderr,
    )
    _report_coverage(m, cfg.language_list)
    heldout = heldout_manifest_for(cfg.output)
    if heldout is not None:
        h = load_manifest(heldout)
        print(f"{PROG}: held out {sum(e.documents for e in h.languages.values())} documents, "
              f"{sum(e.tokens for e in h.languages.values())} tokens -> {heldout}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
