import os, sys; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E401,E702
from megatron_mmbert.cli.build_data_index import main  # noqa: E402
sys.exit(main())
