"""Helpers shared by the tests (imported as ``tests.helpers.<name>``); fixtures live in tests/conftest.py.

corpus: tiny synthetic MMIDIDX corpora; demo_data: the real multilingual demo corpus, its tokenizer
and shards (built by the session fixtures); model: HF reference models, packed batches, torchrun;
training: tiny run configs, launching pretrain_mmbert.py and reading its records; flash_reference:
a pure-PyTorch reference of flash-attn's varlen kernel.
"""
