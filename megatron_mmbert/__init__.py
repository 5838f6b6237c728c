"""megatron-mmbert: mmBERT pretraining on megatron-core."""

__version__ = "0.1.0"
"""The package version (setup.py reads it; every tool's ``--version``)."""
