"""Install megatron-mmbert: the Python package, the C++ index builder and the tool entry points.

The C++ extension (``megatron_mmbert.data._index_builder``) is built with pybind11. Build it in
place for development with ``pip install --no-build-isolation -e .`` (torch must already be
installed: ``pip install torch==2.13.0`` on CPU machines, or use the NGC image on GPUs).
"""

import glob
import os
import re
import shutil

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class build_py_with_configs(build_py):
    """Install the shipped run configs (examples/configs/*.yaml) as package data in
    ``megatron_mmbert/configs/``, so ``mmbert-pretrain --config mmbert-base`` works outside a source
    checkout (there, and in editable installs, they are read from examples/configs directly)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "megatron_mmbert", "configs")
        os.makedirs(target, exist_ok=True)
        for path in sorted(glob.glob(os.path.join("examples", "configs", "*.yaml"))):
            shutil.copy2(path, target)

ext_modules = [
    Pybind11Extension(
        "megatron_mmbert.data._index_builder",
        ["csrc/index_builder.cpp"],
        cxx_std=17,
        # No floating-point contraction: the blending deficits must round exactly like megatron's.
        extra_compile_args=["-O3", "-ffp-contract=off"],
        depends=["csrc/blending.h"],
    ),
]

setup(
    name="megatron-mmbert",
    version=re.search(r'__version__ = "([^"]+)"', open("megatron_mmbert/__init__.py", encoding="utf-8").read()).group(1),
    description="mmBERT / ModernBERT multilingual encoder pretraining on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mmbert", "megatron_mmbert.*"]),
    # The released language list and FineWeb2's folder table (data/languages.py names their sources).
    package_data={"megatron_mmbert.data": ["languages/*.csv", "languages/*.md"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext, "build_py": build_py_with_configs},
    install_requires=[
        # A range, never a pin: 2.13.0 (CPU) satisfies it, NGC images keep their own build.
        "torch>=2.4,<2.15",
        "megatron-core==0.16.1",
        "transformers>=4.48",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "tokenizers>=0.19",
        "sentencepiece>=0.1.99",
        "pyarrow>=14",
        "zstandard>=0.22",
        "psutil>=5.9",  # megatron-core dist_checkpointing writer processes need it
    ],
    extras_require={
        # GPU accelerations are optional and never installed from PyPI here: the NGC PyTorch image
        # ships TransformerEngine, apex and flash-attn. "apex" on PyPI is an unrelated package.
        "datasets": ["datasets>=2.16"],
        "nltk": ["nltk>=3.8"],
        "plots": ["matplotlib>=3.5"],
        # Hub ids in place of paths (--tokenizer org/name, import-hf --hf-dir org/name) and
        # export-hf --push-to-hub (megatron_mmbert/hub.py)
        "hub": ["huggingface_hub>=0.23"],
        # Weights & Biases logging of training runs (logging.wandb in the run config)
        "wandb": ["wandb>=0.16"],
        # torch-optimi: the reference StableAdamW the tests hold ours to (needs only torch>=2.2);
        # wandb: the offline W&B run test (tests/test_training_eval.py; ~30 s to install);
        # mergekit: the reference TIES merge (tests/test_ties_merge.py; 0.1.5 takes the installed
        # CPU torch and transformers 5 as they are, adding accelerate, peft, scipy, immutables);
        # pytest-xdist: ./run-tests runs the tests in one worker per core
        "test": ["pytest>=7", "pytest-xdist>=3.5", "torch-optimi>=0.3", "wandb>=0.16", "mergekit>=0.1.5"],
    },
    entry_points={
        "console_scripts": [
            "mmbert-pretrain=megatron_mmbert.pretrain:main",
            "mmbert-preprocess=megatron_mmbert.cli.preprocess_data:main",
            "mmbert-build-index=megatron_mmbert.cli.build_data_index:main",
            "mmbert-convert=megatron_mmbert.cli.convert_checkpoint:main",
            "mmbert-ties-merge=megatron_mmbert.cli.ties_merge:main",
            "mmbert-evaluate=megatron_mmbert.cli.evaluate:main",
            "mmbert-plot=megatron_mmbert.cli.plot:main",
        ],
    },
)
