"""Build the offline multilingual demo corpus (FineWeb2 layout) from /usr/share/locale catalogs.

    python examples/demo_corpus/build_gettext_corpus.py --output /tmp/demo_corpus [--languages fra_Latn rus_Cyrl]

The text is GPL/LGPL UI translations: built at run time, never committed.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatron_mmbert.data.demo_corpus import DemoCorpusError, DemoCorpusOptions, build_gettext_corpus  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="corpus folder (gets data/{lang}_{Script}/train/000.parquet)")
    p.add_argument("--locale-dir", default="/usr/share/locale")
    p.add_argument("--languages", nargs="+", help="only these {iso639_3}_{Script} keys")
    p.add_argument("--doc-chars", type=int, default=1500, help="characters per document (default 1500)")
    p.add_argument("--max-chars-per-language", type=int, help="cap per language (default: no cap)")
    p.add_argument("--no-iso-codes", action="store_true", help="leave out iso-codes name catalogs")
    args = p.parse_args(argv)
    opts = DemoCorpusOptions(
        locale_dir=args.locale_dir, languages=args.languages, doc_chars=args.doc_chars,
        max_chars_per_language=args.max_chars_per_language, include_iso_codes=not args.no_iso_codes,
    )
    try:
        stats = build_gettext_corpus(args.output, opts)
    except DemoCorpusError as e:
        print(f"build_gettext_corpus: error: {e}", file=sys.stderr)
        return 1
    chars = sum(s.chars for s in stats.values())
    print(f"{len(stats)} languages, {sum(s.documents for s in stats.values())} documents, {chars / 1e6:.1f}M "
          f"characters -> {args.output}/data")
    for key, s in sorted(stats.items(), key=lambda kv: -kv[1].chars)[:5]:
        print(f"  {key}: {s.documents} docs, {s.chars} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
