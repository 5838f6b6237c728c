"""``mmbert-preprocess`` / ``tools/preprocess_data.py``: raw text -> per-language Megatron shards.

Example (FineWeb2 layout, 8 workers)::

    python tools/preprocess_data.py --input /data/fineweb-2 --output /data/shards \\
        --tokenizer /models/mmBERT-base --workers 8

Writes ``OUT/{lang}/part-*.bin/.idx`` and ``OUT/manifest.json``; rerunning resumes. ``--holdout-docs N`` also
writes ``OUT/heldout/`` (N documents per language, chosen by content hash, with their own manifest.json). Across nodes: a Slurm
array runs one shard per task (``--num-shards``/``--shard-index``, read from ``SLURM_ARRAY_TASK_*``), then
one ``--finalize`` job writes the manifest (examples/slurm/preprocess_array.sbatch). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mmbert.data.preprocess import (
    PreprocessConfig, PreprocessError, run_preprocess, slurm_array_shard,
)
from megatron_mmbert.data.shards import heldout_manifest_for, load_manifest
from megatron_mmbert.data.sources import BadInputError, InputError, ReadOptions
from megatron_mmbert.data.tokenizer import Framing, TokenizerError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data",
        description="Tokenize raw text into per-language megatron-core MMIDIDX shards plus manifest.json.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files (.jsonl/.json/.ndjson[.gz|.zst], .parquet, .arrow, .txt[.gz|.zst]), a FineWeb2 "
                        "folder (data/{lang}_{Script}/train/*.parquet), a datasets save_to_disk folder, or any "
                        "folder of such files")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (resumed if it exists)")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="HF tokenizer folder or tokenizer.json, or a SentencePiece .model")
    p.add_argument("--lang", help="language of inputs that carry none (e.g. eng_Latn)")
    p.add_argument("--lang-key", help="field/column holding each document's language")
    p.add_argument("--text-key", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--text-mode", choices=("blank", "line"), default="blank",
                   help="plain .txt files: documents separated by blank lines (default) or one per line")
    p.add_argument("--split", default="train", help="FineWeb2 split folder / DatasetDict split (default: train)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, one core each (default: 1)")
    p.add_argument("--chunk-mb", type=float, default=128,
                   help="target MB of input per work unit and shard; fixes the output layout (default: 128)")
    p.add_argument("--strict", action="store_true", help="abort on the first bad input record")
    p.add_argument("--prefix", default="part", help="shard file name prefix (default: part)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend <bos> to each document")
    p.add_argument("--no-eos", action="store_true", help="do not append <eos> to each document")
    p.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (nltk punkt); off by default, MLM packing does not need it")
    p.add_argument("--nltk-language", default="english", help="punkt model for --split-sentences")
    p.add_argument("--batch-docs", type=int, default=512, help="documents per tokenizer call")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--max-bad-locations", type=int, default=5, help="bad-input locations shown per file")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="exit non-zero (after writing everything) when more than this fraction of records is bad or "
                        "an input yields no documents; 1 accepts anything (default: 0.01)")
    p.add_argument("--num-shards", type=int, default=None,
                   help="split the work over N separate tasks (default: SLURM_ARRAY_TASK_COUNT in a Slurm "
                        "array, else 1)")
    p.add_argument("--shard-index", type=int, default=None,
                   help="this task's shard in [0, N) (default: its position in the Slurm array)")
    p.add_argument("--finalize", action="store_true",
                   help="after all shard tasks: check every unit is done and write manifest.json (same arguments, "
                        "no shard flags)")
    p.add_argument("--holdout-docs", type=int, default=0, metavar="N",
                   help="hold out N documents per language (the N smallest sha256 of their text, at most half of a "
                        "language) into OUT/heldout/ with its own manifest.json, never in the training shards; the "
                        "same documents whatever the workers or shard tasks (default: 0, none)")
    p.add_argument("--holdout-fraction", type=float, default=0.0, metavar="F",
                   help="instead of --holdout-docs: hold out each document whose text hash, as a number in [0, 1), "
                        "is below F (about F of every language; default: 0, none)")
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    if args.workers < 1 or args.chunk_mb <= 0 or args.batch_docs < 1:
        raise SystemExit("--workers, --chunk-mb and --batch-docs must be positive")
    num_shards, shard_index = args.num_shards, args.shard_index
    if num_shards is None and shard_index is None and not args.finalize:
        num_shards, shard_index = slurm_array_shard() or (1, None)
    return PreprocessConfig(
        inputs=args.input,
        output=args.output,
        tokenizer=args.tokenizer,
        read=ReadOptions(text_key=args.text_key, lang_key=args.lang_key, lang=args.lang,
                         text_mode=args.text_mode, split=args.split),
        framing=Framing(bos=not args.no_bos, eos=not args.no_eos),
        workers=args.workers,
        strict=args.strict,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        prefix=args.prefix,
        split_sentences=args.split_sentences,
        nltk_language=args.nltk_language,
        batch_docs=args.batch_docs,
        log_interval_s=args.log_interval,
        max_bad_locations=args.max_bad_locations,
        max_bad_fraction=args.max_bad_fraction,
        num_shards=1 if num_shards is None else num_shards,
        shard_index=shard_index,
        finalize=args.finalize,
        holdout_docs=args.holdout_docs,
        holdout_fraction=args.holdout_fraction,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_preprocess(config_from_args(args))
    except (PreprocessError, InputError, BadInputError, TokenizerError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # read-only output, full disk: say which file, no traceback
        print(f"preprocess_data: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1
    m = result.manifest
    if m is None:
        print(f"preprocess_data: shard done ({result.units_in_shard} unit(s) of {result.units_total}); when every "
              "shard task has finished, run the same command with --finalize and no shard flags", file=sys.stderr)
        return 0
    print(
        f"preprocess_data: {len(m.languages)} languages, {sum(e.documents for e in m.languages.values())} "
        f"documents, {sum(e.tokens for e in m.languages.values())} tokens -> {args.output}/manifest.json",
        file=sys.stderr,
    )
    heldout = heldout_manifest_for(args.output)
    if heldout is not None:
        h = load_manifest(heldout)
        print(f"preprocess_data: held out {sum(e.documents for e in h.languages.values())} documents, "
              f"{sum(e.tokens for e in h.languages.values())} tokens -> {heldout}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
