"""The released language list (data/languages.py): its content, the FineWeb2 map, and the coverage
report at preprocessing and at index build."""

import pytest

from megatron_mmbert.cli.build_data_index import main as build_index_main
from megatron_mmbert.data import languages as L
from megatron_mmbert.data.shards import load_manifest
from megatron_mmbert.training.config import load_config
from tests.helpers.training import tiny_run_config, write_manifest


def test_released_list_counts_and_the_shipped_language_sets():
    # The released statistics: 1,833 languages in Decay-All, 60 in pre-training, 109 from mid-training on.
    assert len(L.released_languages("decay-all")) == 1833
    assert len(L.released_languages("pretrain")) == 60
    assert len(L.released_languages("ext")) == 109
    assert set(L.released_languages("pretrain")) <= set(L.released_languages("ext"))
    # The shipped base config's sets are those languages (English comes from named sources).
    cfg = load_config("mmbert_base")
    sets = {name: {L.language_code(k) for k in keys} for name, keys in cfg.language_sets.items()}
    assert (sets["mmbert_pretrain"] - {"code"}) | {"eng"} == set(L.released_languages("pretrain"))
    assert (sets["mmbert_mid"] - {"code"}) | {"eng"} == set(L.released_languages("ext"))


def test_fineweb2_folder_map():
    assert L.language_code("srp_Latn") == "srp" and L.language_code("srp_Cyrl") == "srp"
    assert L.fineweb2_folders("srp") == ["srp_Cyrl", "srp_Latn"]
    assert L.language_code("cmn_Hani") == "cmn"
    assert L.language_code("aai_Latn_removed") == "aai"
    assert L.language_code("dclm") == "eng" and L.language_code("starcoder") == "code"
    assert L.language_code("megawika") is None and L.language_code("not a key") is None
    assert L.fineweb2_folders("eng") == []  # FineWeb2 has no English
    listed = L.released_languages()
    without_folder = [c for c in listed if not L.fineweb2_folders(c)]
    assert "eng" in without_folder and len(without_folder) == 33


def test_coverage_both_directions():
    cov = L.coverage(["fra_Latn", "srp_Cyrl", "srp_Latn", "dclm", "code", "und_Kana", "xyz_Latn"],
                     ["fra", "srp", "eng", "deu"], "four")
    assert cov.covered == {"fra": ["fra_Latn"], "srp": ["srp_Cyrl", "srp_Latn"], "eng": ["dclm"]}
    assert cov.missing == ["deu"]
    assert cov.extra == ["und_Kana", "xyz_Latn"]
    assert cov.sources == ["code", "dclm"]
    text = cov.format()
    assert "3 of 4 listed languages present, 1 missing" in text and "deu (deu_Latn)" in text
    assert "beyond the list: und_Kana, xyz_Latn" in text


def test_any_list_file(tmp_path):
    (tmp_path / "list.txt").write_text("# mine\nfra\nsrp_Latn  # a folder name becomes its code\n\n")
    name, codes = L.load_language_list(str(tmp_path / "list.txt"))
    assert codes == ["fra", "srp"]
    (tmp_path / "counts.csv").write_text("language,pretrain\nfra,5\ndeu,0\ncode,9\n")
    assert L.load_language_list(str(tmp_path / "counts.csv"))[1] == ["fra"]  # zero rows are not listed
    assert L.load_language_list("none") is None
    with pytest.raises(L.LanguageListError, match="no such file"):
        L.load_language_list(str(tmp_path / "absent.txt"))
    (tmp_path / "bad.txt").write_text("fra\nFrench!\n")
    with pytest.raises(L.LanguageListError, match="'French!' is neither"):
        L.load_language_list(str(tmp_path / "bad.txt"))


def test_index_build_reports_coverage(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "shards", ("fra_Latn", "deu_Latn", "xyz_Latn"))
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), manifest, str(tmp_path / "run"))
    (tmp_path / "list.txt").write_text("fra\ndeu\nrus\n")
    assert build_index_main(["--config", cfg, "--rows", "2", "--language-list", str(tmp_path / "list.txt")]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 listed languages present, 1 missing, 1 manifest key(s) beyond the list" in out
    assert "missing: rus (rus_Cyrl)" in out and "beyond the list: xyz_Latn" in out
    # The released list by default.
    assert build_index_main(["--config", cfg, "--rows", "2"]) == 0
    assert "2 of 1833 listed languages present, 1831 missing" in capsys.readouterr().out
    assert build_index_main(["--config", cfg, "--language-list", str(tmp_path / "absent")]) == 2
    assert "--language-list" in capsys.readouterr().err
    cov = L.manifest_coverage(load_manifest(manifest), "none")
    assert cov is None


def test_preprocessing_reports_coverage(tmp_path, demo_tokenizer, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_mmbert.cli.preprocess_data import main as preprocess_main

    fw = tmp_path / "fw" / "data"
    for folder in ("fra_Latn", "srp_Latn", "qqq_Latn"):
        (fw / folder / "train").mkdir(parents=True)
        pq.write_table(pa.table({"text": ["bonjour le monde", "encore"]}), fw / folder / "train" / "000_00000.parquet")
    (tmp_path / "list.txt").write_text("fra\nsrp\ndeu\n")
    args = ["--input", str(tmp_path / "fw"), "--output", str(tmp_path / "out"), "--tokenizer", demo_tokenizer]
    assert preprocess_main(args + ["--language-list", str(tmp_path / "list.txt")]) == 0
    err = capsys.readouterr().err
    assert "2 of 3 listed languages present, 1 missing" in err
    assert "missing: deu (deu_Latn)" in err and "beyond the list: qqq_Latn" in err
    # A list that cannot be read fails before any work, naming the flag.
    assert preprocess_main(args + ["--language-list", str(tmp_path / "absent")]) == 2
    assert "--language-list" in capsys.readouterr().err
