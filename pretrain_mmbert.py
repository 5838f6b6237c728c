"""Pre-train mmBERT: the script form of ``mmbert-pretrain`` / ``python -m megatron_mmbert.pretrain``.

    torchrun --nproc_per_node 8 pretrain_mmbert.py --config mmbert-base [--section.key value ...]

Kept so existing command lines work; the code is megatron_mmbert/pretrain.py (docs/training.md).
"""

import sys

from megatron_mmbert.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
