"""What the demo session fixtures (``demo_corpus``, ``demo_tokenizer``, ``demo_shards`` in
tests/conftest.py) build: a small real multilingual corpus, its tokenizer and its shards.

The corpus is built from the gettext catalogs in /usr/share/locale
(see megatron_mmbert/data/demo_corpus.py), limited to a few languages in different scripts (two of
them tiny, to keep the skew), so the whole set builds in a few seconds.
"""

import os

import pytest


# Several scripts, big and tiny languages (tzm_Tfng and azb_Arab have under 100 characters).
DEMO_LANGUAGES = (
    "fra_Latn", "deu_Latn", "rus_Cyrl", "jpn_Jpan", "arb_Arab", "hin_Deva", "ell_Grek",
    "kor_Hang", "cmn_Hani", "amh_Ethi", "tzm_Tfng", "azb_Arab",
)
DEMO_MAX_CHARS = 30_000
DEMO_VOCAB = 4096  # the ``tiny`` model preset's vocab_size


def require_catalogs():
    if not os.path.isdir("/usr/share/locale"):
        pytest.skip("no /usr/share/locale: apt-get install -y iso-codes gettext coreutils libglib2.0-data")
