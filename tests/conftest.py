"""Shared pytest setup: run from the source tree, quiet megatron-core's optional-dependency warnings,
and the session fixtures every module may use (pytest finds them here; nothing to import).

Helpers (plain functions) live in ``tests/helpers/``, imported as ``tests.helpers.<name>``.
"""

import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from tests.helpers.demo_data import DEMO_LANGUAGES, DEMO_MAX_CHARS, DEMO_VOCAB, require_catalogs  # noqa: E402


# ------------------------------------------------------------------------------------------------
# The demo data: a small real multilingual corpus, its tokenizer and its shards (tests/helpers/demo_data.py)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Path of a FineWeb2-layout corpus folder (``data/{lang}_{Script}/train/000.parquet``)."""
    from megatron_mmbert.data.demo_corpus import DemoCorpusOptions, build_gettext_corpus

    require_catalogs()
    out = str(tmp_path_factory.mktemp("demo_corpus"))
    build_gettext_corpus(
        out, DemoCorpusOptions(languages=DEMO_LANGUAGES, max_chars_per_language=DEMO_MAX_CHARS, doc_chars=800,
                               row_group_docs=8)
    )
    return out


@pytest.fixture(scope="session")
def demo_tokenizer(demo_corpus, tmp_path_factory):
    """Path of an HF tokenizer folder trained on ``demo_corpus`` (ids 0-4 <pad> <eos> <bos> <unk> <mask>)."""
    from megatron_mmbert.data.demo_corpus import train_tokenizer

    return train_tokenizer(demo_corpus, str(tmp_path_factory.mktemp("demo_tokenizer")), vocab_size=DEMO_VOCAB)


@pytest.fixture(scope="session")
def demo_shards(demo_corpus, demo_tokenizer, tmp_path_factory):
    """Path of a preprocessed output folder (``manifest.json`` + per-language shards) of ``demo_corpus``;
    small work units so big languages get several shards."""
    from megatron_mmbert.data.preprocess import PreprocessConfig, run_preprocess

    out = str(tmp_path_factory.mktemp("demo_shards"))
    run_preprocess(PreprocessConfig(inputs=[demo_corpus], output=out, tokenizer=demo_tokenizer,
                                    workers=1, chunk_bytes=8 << 10))
    return out
