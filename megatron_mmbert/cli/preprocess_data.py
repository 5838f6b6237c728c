"""``mmbert-preprocess`` / ``tools/preprocess_data.py``: raw text -> per-language Megatron shards.

Example (FineWeb2 layout, 8 workers)::

    python tools/preprocess_data.py --input /data/fineweb-2 --output /data/shards \\
        --tokenizer /models/mmBERT-base --workers 8

Writes ``OUT/{lang}/part-*.bin/.idx`` and ``OUT/manifest.json``; rerunning resumes. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_mmbert.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
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
                   help="HF tokenizer folder or tokenizer.json, a SentencePiece .model, or a Hub id org/name[@revision]")
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
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    if args.workers < 1 or args.chunk_mb <= 0 or args.batch_docs < 1:
        raise SystemExit("--workers, --chunk-mb and --batch-docs must be positive")
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
    print(
        f"preprocess_data: {len(m.languages)} languages, {sum(e.documents for e in m.languages.values())} "
        f"documents, {sum(e.tokens for e in m.languages.values())} tokens -> {args.output}/manifest.json",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
