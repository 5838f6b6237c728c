#!/usr/bin/env python
"""Pictures of the schedule, a run's loss and a checkpoint comparison (see --help and docs/evaluation.md)."""
import sys

from megatron_mmbert.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
