"""Helpers shared by the tests (imported as ``tests.helpers.<name>``); fixtures live in tests/conftest.py.

launch: the repository root (``ROOT``), the environment of a child process, free ports and the one
launcher (``run_process``; ``launch`` for pretrain_mmbert.py, ``torchrun`` for tests/workers/);
corpus: tiny synthetic MMIDIDX corpora; demo_data: the real multilingual demo corpus, its tokenizer
and shards (built by the session fixtures); model: HF reference models, packed batches;
training: tiny run configs, the shared finished run, reading run records, comparing checkpoints;
preprocess: reading shards back, the preprocessing CLI as a separate task; flash_reference: a
pure-PyTorch reference of flash-attn's varlen kernel.
"""
