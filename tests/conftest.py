"""Shared pytest setup: run from the source tree, quiet megatron-core's optional-dependency warnings."""

import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
