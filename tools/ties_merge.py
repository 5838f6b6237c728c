import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from megatron_mmbert.cli.ties_merge import main  # noqa: E402
if __name__ == "__main__":  # guarded: megatron-core's checkpoint writer spawns helper processes
    sys.exit(main())
