"""Train the small byte-level BPE tokenizer of the demo (ids 0-4: <pad> <eos> <bos> <unk> <mask>).

    python examples/demo_corpus/train_tokenizer.py --corpus /tmp/demo_corpus --output /tmp/demo_tokenizer

The default vocab size (4096) matches the ``tiny`` model preset in megatron_mmbert/config.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatron_mmbert.data.demo_corpus import train_tokenizer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="a FineWeb2-layout folder (build_gettext_corpus.py output)")
    p.add_argument("--output", required=True, help="tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-chars-per-language", type=int, default=200_000,
                   help="training text per language (keeps the skew from eating the vocabulary)")
    args = p.parse_args(argv)
    train_tokenizer(args.corpus, args.output, args.vocab_size, args.max_chars_per_language)
    print(f"tokenizer ({args.vocab_size} ids) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
