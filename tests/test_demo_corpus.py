"""The gettext demo corpus and its tokenizer: locale mapping, .mo reading against the stdlib,
determinism, layout, the missing-catalog error, and the tokenizer's special ids."""

import gettext
import glob
import os

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_mmbert.data.demo_corpus import (
    DemoCorpusError,
    DemoCorpusOptions,
    build_gettext_corpus,
    locale_to_key,
    read_mo,
    train_tokenizer,
)
from tests.helpers.demo_data import DEMO_LANGUAGES


@pytest.mark.parametrize("locale,key", [
    ("fr", "fra_Latn"), ("pt_BR", "por_Latn"), ("ru", "rus_Cyrl"), ("sr", "srp_Cyrl"), ("sr@latin", "srp_Latn"),
    ("zh_TW", "cmn_Hani"), ("zh_CN", "cmn_Hani"), ("ar", "arb_Arab"), ("az_IR", "azb_Arab"), ("ja", "jpn_Jpan"),
    ("ko", "kor_Hang"), ("uz@cyrillic", "uzn_Cyrl"), ("kmr", "kmr_Latn"), ("nah", "nah_Zzzz"), ("en@quot", None),
    ("locale.alias", None),
])
def test_locale_to_key(locale, key):
    assert locale_to_key(locale) == key


def test_read_mo_matches_stdlib_gettext():
    files = sorted(glob.glob("/usr/share/locale/*/LC_MESSAGES/*.mo"))
    if not files:
        pytest.skip("no gettext catalogs installed")
    checked = 0
    for path in files[:: max(1, len(files) // 40)]:
        try:
            with open(path, "rb") as f:
                ref = gettext.GNUTranslations(f)._catalog
        except (UnicodeDecodeError, IndexError, OSError):
            continue  # the stdlib fails on a few mislabelled catalogs
        ours = {s for _, s in read_mo(path)}
        want = set()
        for k, v in ref.items():
            if k != "" and v:
                want.update(v.split("\x00"))
        assert ours == {s for s in want if s}, path
        checked += 1
    assert checked >= 20


def test_corpus_layout_and_determinism(demo_corpus, tmp_path):
    langs = sorted(os.listdir(os.path.join(demo_corpus, "data")))
    assert langs == sorted(DEMO_LANGUAGES)
    sizes = {}
    for lang in langs:
        t = pq.read_table(os.path.join(demo_corpus, "data", lang, "train", "000.parquet"))
        assert t.column_names[0] == "text" and t.num_rows > 0
        assert set(t.column("language_script").to_pylist()) == {lang.split("_")[1]}
        sizes[lang] = sum(map(len, t.column("text").to_pylist()))
    assert sizes["fra_Latn"] > 100 * sizes["tzm_Tfng"]  # the skew survives
    again = str(tmp_path / "again")
    build_gettext_corpus(again, DemoCorpusOptions(languages=["fra_Latn", "jpn_Jpan"], max_chars_per_language=30_000,
                                                  doc_chars=800, row_group_docs=8))
    for lang in ("fra_Latn", "jpn_Jpan"):
        rel = os.path.join("data", lang, "train", "000.parquet")
        assert open(os.path.join(again, rel), "rb").read() == open(os.path.join(demo_corpus, rel), "rb").read()


def test_full_catalogs_cover_many_languages_and_scripts(tmp_path):
    stats = build_gettext_corpus(str(tmp_path), DemoCorpusOptions(max_chars_per_language=2000, include_iso_codes=True))
    assert len(stats) >= 100, len(stats)
    assert len({k.split("_")[1] for k in stats}) >= 20


def test_missing_catalogs_error(tmp_path):
    with pytest.raises(DemoCorpusError, match="apt-get install"):
        build_gettext_corpus(str(tmp_path / "out"), DemoCorpusOptions(locale_dir=str(tmp_path / "nothing")))


def test_tokenizer_special_ids_and_autotokenizer(demo_tokenizer):
    hf = AutoTokenizer.from_pretrained(demo_tokenizer)
    assert [hf.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert len(hf) == 4096
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(demo_tokenizer, f))
    text = "Fichier introuvable — Файл не найден 파일"
    ids = hf(text).input_ids
    assert ids[0] == 2 and ids[-1] == 1 and 3 not in ids  # byte-level: never <unk>
    assert hf.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_training_is_deterministic(demo_corpus, demo_tokenizer, tmp_path):
    again = train_tokenizer(demo_corpus, str(tmp_path / "tok"), vocab_size=4096)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert open(os.path.join(again, f), "rb").read() == open(os.path.join(demo_tokenizer, f), "rb").read(), f
