#!/usr/bin/env python
"""Per-language MLM evaluation of a checkpoint on a manifest (see --help and docs/evaluation.md)."""
import sys

from megatron_mmbert.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
