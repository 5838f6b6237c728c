#!/usr/bin/env python
"""Convert between Hugging Face ModernBERT and megatron-mmbert checkpoints (see --help)."""
import sys

from megatron_mmbert.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
