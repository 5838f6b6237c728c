"""Reusable session fixtures: a small real multilingual corpus, its tokenizer and its shards.

Import the fixtures you need into a test module (``from tests.data_fixtures import demo_corpus,
demo_tokenizer, demo_shards``). The corpus is built from the gettext catalogs in /usr/share/locale
(see megatron_mmbert/data/demo_corpus.py), limited to a few languages in different scripts (two of
them tiny, to keep the skew), so the whole set builds in a few seconds.
"""

import os

import pytest

from megatron_mmbert.data.demo_corpus import DemoCorpusOptions, build_gettext_corpus, train_tokenizer

# Several scripts, big and tiny languages (tzm_Tfng and azb_Arab have under 100 characters).
DEMO_LANGUAGES = (
    "fra_Latn", "deu_Latn", "rus_Cyrl", "jpn_Jpan", "arb_Arab", "hin_Deva", "ell_Grek",
    "kor_Hang", "cmn_Hani", "amh_Ethi", "tzm_Tfng", "azb_Arab",
)
DEMO_MAX_CHARS = 30_000
DEMO_VOCAB = 4096  # the ``tiny`` model preset's vocab_size


def _require_catalogs():
    if not os.path.isdir("/usr/share/locale"):
        pytest.skip("no /usr/share/locale: apt-get install -y iso-codes gettext coreutils libglib2.0-data")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Path of a FineWeb2-layout corpus folder (``data/{lang}_{Script}/train/000.parquet``)."""
    _require_catalogs()
    out = str(tmp_path_factory.mktemp("demo_corpus"))
    build_gettext_corpus(
        out, DemoCorpusOptions(languages=DEMO_LANGUAGES, max_chars_per_language=DEMO_MAX_CHARS, doc_chars=800,
                               row_group_docs=8)
    )
    return out


@pytest.fixture(scope="session")
def demo_tokenizer(demo_corpus, tmp_path_factory):
    """Path of an HF tokenizer folder trained on ``demo_corpus`` (ids 0-4 <pad> <eos> <bos> <unk> <mask>)."""
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
