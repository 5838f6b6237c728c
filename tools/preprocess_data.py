import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from megatron_mmbert.cli.preprocess_data import main  # noqa: E402
if __name__ == "__main__": sys.exit(main())  # the guard matters: spawned workers re-import this file  # noqa: E701
