"""tools/preprocess_data.py end to end: shards read back through megatron-core's IndexedDataset equal
the tokenizer's output (transformers' AutoTokenizer, not our wrapper), bad input, kill + resume,
every input format, tokenizer refusal."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from megatron_mmbert.cli.preprocess_data import main as cli_main
from megatron_mmbert.data.demo_corpus import train_tokenizer
from megatron_mmbert.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megatron_mmbert.data.shards import DocumentFraming, load_manifest, read_index
from megatron_mmbert.data.sources import BadInputError, ReadOptions

from tests.helpers.launch import ROOT
from tests.helpers.preprocess import framed as _framed, shard_documents as _documents


def _parquet_texts(path):
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def _run(tmp_path, tok, inputs, name="out", **kw):
    kw.setdefault("read", ReadOptions(lang="xxx_Latn"))
    return run_preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output=str(tmp_path / name),
                                           tokenizer=tok, **kw))


# (1) every language of the demo corpus round-trips through megatron-core's IndexedDataset.
def test_shards_equal_tokenizer_output_every_language(demo_corpus, demo_tokenizer, demo_shards):
    hf = AutoTokenizer.from_pretrained(demo_tokenizer)
    assert (hf.bos_token_id, hf.eos_token_id) == (2, 1)
    m = load_manifest(demo_shards)
    langs = sorted(os.listdir(os.path.join(demo_corpus, "data")))
    assert sorted(m.languages) == langs
    assert m.dtype == "uint16" and m.tokenizer.vocab_size == 4096
    assert m.tokenizer.special_ids == {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}
    assert len(m.languages["fra_Latn"].shards) > 1  # small units: several shards, listed in order
    for lang in langs:
        src = os.path.join(demo_corpus, "data", lang, "train", "000.parquet")
        texts = _parquet_texts(src)
        expected = _framed(hf, texts)
        entry = m.languages[lang]
        assert _documents(entry.shards) == expected, lang
        assert entry.documents == len(texts)
        assert entry.tokens == sum(map(len, expected))
        assert entry.bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert entry.sources == [src]
        for prefix in entry.shards:
            assert prefix.startswith(demo_shards) and IndexedDataset.exists(prefix)
        # every document framed <bos> ... <eos>, recorded so the index need not read them back
        assert entry.framing == DocumentFraming(bos=2, eos=1, starts_bos=len(texts), ends_eos=len(texts))


def test_output_keeps_the_tokenizer(demo_tokenizer, demo_shards):
    """The tokenizer travels with the shards (training copies it into every checkpoint)."""
    import filecmp

    for name in ("tokenizer.json", "tokenizer_config.json"):
        copied = os.path.join(demo_shards, "tokenizer", name)
        assert filecmp.cmp(os.path.join(demo_tokenizer, name), copied, shallow=False), name


def test_rerun_skips_finished_units(demo_corpus, demo_tokenizer, demo_shards):
    before = open(os.path.join(demo_shards, "manifest.json"), "rb").read()
    result = run_preprocess(PreprocessConfig(inputs=[demo_corpus], output=demo_shards, tokenizer=demo_tokenizer,
                                             chunk_bytes=8 << 10))
    assert result.units_run == 0 and result.units_total > 0
    assert open(os.path.join(demo_shards, "manifest.json"), "rb").read() == before


# (2) bad input: reported, skipped, not fatal; fatal at the first one with --strict.
def _bad_inputs(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    lines = [
        b'{"text": "good one"}',
        b'{"text": "broken',                       # 2 malformed JSON
        b'{"other": "no text"}',                    # 3 missing text
        b'{"text": 42}',                            # 4 non-string text
        b'{"text": "   "}',                         # 5 empty text
        b'{"text": "caf\xe9"}',                     # 6 invalid UTF-8
        b'[1, 2]',                                  # 7 not an object
        b'{"text": "good two"}',
    ]
    (d / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"text": ["row one", None, "", "row four"]}), d / "b.parquet")
    (d / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine"}\n' * 50)[:-30])  # truncated stream
    (d / "d.parquet").write_bytes(b"PAR1 this is not parquet")
    return d


def test_bad_input_report_without_strict(tmp_path, demo_tokenizer, capsys):
    d = _bad_inputs(tmp_path)
    res = _run(tmp_path, demo_tokenizer, [d], max_bad_fraction=1.0)  # report only (the default fails on this)
    files = res.bad_input.files
    a = files[str(d / "a.jsonl")]
    assert a["counts"] == {"malformed_json": 2, "missing_text": 1, "non_string_text": 1, "empty_text": 1,
                           "invalid_utf8": 1}
    assert [loc.split(": ")[0] for loc in a["locations"]] == [f"{d / 'a.jsonl'}:{n}" for n in (2, 3, 4, 5, 6)]
    assert files[str(d / "b.parquet")]["counts"] == {"missing_text": 1, "empty_text": 1}
    assert files[str(d / "b.parquet")]["locations"][0].startswith(f"{d / 'b.parquet'}:2:")
    assert files[str(d / "c.jsonl.gz")]["counts"] == {"unreadable_file": 1}
    assert files[str(d / "d.parquet")]["counts"] == {"unreadable_file": 1}
    err = capsys.readouterr().err
    assert "bad input: 10 record(s) skipped in 4 file(s)" in err and f"{d / 'a.jsonl'}:2: malformed JSON line" in err
    hf = AutoTokenizer.from_pretrained(demo_tokenizer)
    docs = _documents(res.manifest.languages["xxx_Latn"].shards)
    good = ["good one", "good two", "row one", "row four"]
    assert docs == _framed(hf, good)  # the truncated gzip fails in its first buffered read


def test_bad_input_strict_aborts_at_first(tmp_path, demo_tokenizer, capsys):
    d = _bad_inputs(tmp_path)
    with pytest.raises(BadInputError, match=r"a\.jsonl:2: malformed JSON line"):
        _run(tmp_path, demo_tokenizer, [d / "a.jsonl"], strict=True)
    rc = cli_main(["--input", str(d), "--output", str(tmp_path / "cli"), "--tokenizer", demo_tokenizer,
                   "--lang", "xxx_Latn", "--strict"])
    assert rc == 1
    assert "bad input (strict)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cli" / "manifest.json")


def test_empty_language_folder_and_missing_language(tmp_path, demo_tokenizer):
    fw = tmp_path / "fw" / "data"
    (fw / "fra_Latn" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["bonjour"]}), fw / "fra_Latn" / "train" / "000_00000.parquet")
    (fw / "deu_Latn" / "train").mkdir(parents=True)  # empty
    res = _run(tmp_path, demo_tokenizer, [tmp_path / "fw"], read=ReadOptions())
    assert res.bad_input.files[str(fw / "deu_Latn" / "train")]["counts"] == {"empty_language_folder": 1}
    assert sorted(res.manifest.languages) == ["fra_Latn"]
    with pytest.raises(BadInputError, match="empty language folder"):
        _run(tmp_path, demo_tokenizer, [tmp_path / "fw"], name="strict", read=ReadOptions(), strict=True)

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "lang": "fra_Latn"}\n{"text": "b"}\n{"text": "c", "lang": "../x"}\n')
    res = _run(tmp_path, demo_tokenizer, [mixed], name="mixed", read=ReadOptions(lang_key="lang"),
               max_bad_fraction=1.0)
    assert res.bad_input.files[str(mixed)]["counts"] == {"missing_language": 2}


# (3) a preprocess killed mid-run and rerun gives the bytes of an uninterrupted run.
def _tree_bytes(out):
    files = {}
    for d, _, fs in os.walk(out):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), out)
            if not rel.startswith(".preprocess"):
                files[rel] = open(os.path.join(d, f), "rb").read()
    return files


def _cli(corpus, out, tok, workers):
    return [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus, "--output", out,
            "--tokenizer", tok, "--workers", str(workers), "--chunk-mb", "0.004", "--batch-docs", "4"]


@pytest.mark.slow
def test_killed_and_rerun_is_byte_identical(tmp_path, demo_corpus, demo_tokenizer):
    ref = str(tmp_path / "ref")
    subprocess.run(_cli(demo_corpus, ref, demo_tokenizer, 1), check=True, capture_output=True)
    expected = _tree_bytes(ref)
    assert sum(f.endswith(".idx") for f in expected) > 20

    out = str(tmp_path / "killed")
    units = os.path.join(out, ".preprocess", "units")
    proc = subprocess.Popen(_cli(demo_corpus, out, demo_tokenizer, 2), stderr=subprocess.DEVNULL)
    def finished_units():  # a marker being written is still "{id}.json.partial"
        return [f for f in os.listdir(units) if f.endswith(".json")] if os.path.isdir(units) else []

    deadline = time.time() + 60
    while not finished_units() and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # workers die with it (PR_SET_PDEATHSIG)
    proc.wait()
    time.sleep(0.2)
    done = len(finished_units())
    assert 0 < done < sum(f.endswith(".idx") for f in expected)
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    rerun = subprocess.run(_cli(demo_corpus, out, demo_tokenizer, 2), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f", {done} already done" in rerun.stderr
    got = _tree_bytes(out)
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], rel


# (4) every input format.
def test_all_input_formats(tmp_path, demo_tokenizer):
    hf = AutoTokenizer.from_pretrained(demo_tokenizer)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "ε", "日本", "мир"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(200)]
    d = tmp_path / "in"
    d.mkdir()
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    (d / "plain.jsonl").write_bytes(body)
    (d / "gz.jsonl.gz").write_bytes(gzip.compress(body))
    (d / "zst.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    pq.write_table(pa.table({"text": texts}), d / "rg.parquet", row_group_size=16)
    (d / "blank.txt").write_text("\n\n".join(t.replace(" gamma ", "\ngamma ") for t in texts) + "\n")
    with pa.OSFile(str(d / "t.arrow"), "wb") as f, pa.ipc.new_stream(f, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": texts}))

    expected = _framed(hf, texts)
    for name in ("plain.jsonl", "gz.jsonl.gz", "zst.jsonl.zst", "rg.parquet", "t.arrow"):
        # chunk_bytes tiny: plain JSONL splits into byte ranges, Parquet into row-group runs.
        res = _run(tmp_path, demo_tokenizer, [d / name], name=name, chunk_bytes=1000)
        shards = res.manifest.languages["xxx_Latn"].shards
        assert _documents(shards) == expected, name
        if name in ("plain.jsonl", "rg.parquet"):
            assert len(shards) > 3, name
    res = _run(tmp_path, demo_tokenizer, [d / "blank.txt"], name="blank")
    blank_texts = [t.replace(" gamma ", "\ngamma ") for t in texts]
    assert _documents(res.manifest.languages["xxx_Latn"].shards) == _framed(hf, blank_texts)
    res = _run(tmp_path, demo_tokenizer, [d / "blank.txt"], name="line",
               read=ReadOptions(lang="xxx_Latn", text_mode="line"))
    lines = [ln for t in blank_texts for ln in t.split("\n")]
    assert _documents(res.manifest.languages["xxx_Latn"].shards) == _framed(hf, lines)

    # A language column and a FineWeb2 tree (given as its root and as its data/ folder).
    langs = ["fra_Latn" if i % 3 else "rus_Cyrl" for i in range(len(texts))]
    pq.write_table(pa.table({"text": texts, "lang": langs}), d / "mixed.parquet")
    res = _run(tmp_path, demo_tokenizer, [d / "mixed.parquet"], name="mixed", read=ReadOptions(lang_key="lang"))
    for lang in ("fra_Latn", "rus_Cyrl"):
        want = [t for t, l in zip(texts, langs) if l == lang]
        assert _documents(res.manifest.languages[lang].shards) == _framed(hf, want)
    fw = tmp_path / "fw"
    for lang in ("fra_Latn", "rus_Cyrl"):
        (fw / "data" / lang / "train").mkdir(parents=True)
        (fw / "data" / f"{lang}_removed" / "train").mkdir(parents=True)
        pq.write_table(pa.table({"text": [t for t, l in zip(texts, langs) if l == lang]}),
                       fw / "data" / lang / "train" / "000_00000.parquet")
    for root in (fw, fw / "data"):
        res = _run(tmp_path, demo_tokenizer, [root], name=f"fw{len(str(root))}", read=ReadOptions())
        assert sorted(res.manifest.languages) == ["fra_Latn", "rus_Cyrl"]
        assert _documents(res.manifest.languages["rus_Cyrl"].shards) == _framed(
            hf, [t for t, l in zip(texts, langs) if l == "rus_Cyrl"])

    # Hugging Face datasets: save_to_disk folder (Dataset and DatasetDict).
    import datasets

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hfds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:50]})}).save_to_disk(
        str(tmp_path / "hfdd"))
    res = _run(tmp_path, demo_tokenizer, [tmp_path / "hfds"], name="hfds_out", chunk_bytes=2000)
    assert _documents(res.manifest.languages["xxx_Latn"].shards) == expected
    res = _run(tmp_path, demo_tokenizer, [tmp_path / "hfdd"], name="hfdd_out")
    assert _documents(res.manifest.languages["xxx_Latn"].shards) == expected[:50]


def test_sentencepiece_model_and_framing_options(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "sp.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<mask>"],
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    texts = ["the lazy fox", "quick dog 7"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    res = _run(tmp_path, str(tmp_path / "sp.model"), [tmp_path / "in.jsonl"])
    assert res.manifest.tokenizer.special_ids == {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}
    assert _documents(res.manifest.languages["xxx_Latn"].shards) == [[2] + sp.encode(t) + [1] for t in texts]
    from megatron_mmbert.data.tokenizer import Framing

    res = _run(tmp_path, str(tmp_path / "sp.model"), [tmp_path / "in.jsonl"], name="eos",
               framing=Framing(bos=False, eos=True))
    assert _documents(res.manifest.languages["xxx_Latn"].shards) == [sp.encode(t) + [1] for t in texts]
    assert res.manifest.languages["xxx_Latn"].framing == DocumentFraming(bos=2, eos=1, starts_bos=0, ends_eos=2)
    assert load_manifest(res.manifest.root).languages["xxx_Latn"].framing == res.manifest.languages["xxx_Latn"].framing


def test_split_sentences_needs_nltk(tmp_path, demo_tokenizer):
    try:  # nltk is an optional extra; this checks the message given when it is absent
        import nltk  # noqa: F401
        pytest.skip("nltk is installed")
    except ImportError:
        pass
    (tmp_path / "in.jsonl").write_text('{"text": "One. Two."}\n')
    from megatron_mmbert.data.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="pip install 'nltk"):
        _run(tmp_path, demo_tokenizer, [tmp_path / "in.jsonl"], split_sentences=True)


# (5) shards of another tokenizer are never added to an output.
def test_tokenizer_mismatch_refused(tmp_path, demo_corpus, demo_tokenizer, capsys):
    other = train_tokenizer(demo_corpus, str(tmp_path / "other_tok"), vocab_size=512)
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "world"}\n')
    _run(tmp_path, demo_tokenizer, [tmp_path / "a.jsonl"])
    with pytest.raises(PreprocessError, match="already holds shards made with tokenizer"):
        _run(tmp_path, other, [tmp_path / "b.jsonl"])
    rc = cli_main(["--input", str(tmp_path / "b.jsonl"), "--output", str(tmp_path / "out"), "--tokenizer", other,
                   "--lang", "xxx_Latn"])
    err = capsys.readouterr().err
    assert rc == 1 and "use a new output folder" in err and "[--output]" in err  # the field, then its flag
    # The same tokenizer may add new inputs; the manifest then covers both.
    res = _run(tmp_path, demo_tokenizer, [tmp_path / "b.jsonl"])
    assert res.manifest.languages["xxx_Latn"].documents == 2
    assert len(read_index(res.manifest.languages["xxx_Latn"].shards[0]).sequence_lengths) == 1


# (6) one home per check: the options check themselves, every problem at once, before any work.
def test_config_validates_itself_naming_each_field(tmp_path):
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.data.tokenizer import TokenizerError

    good = PreprocessConfig(inputs=[str(tmp_path)], output=str(tmp_path / "out"), tokenizer="tok")
    good.validate()
    good.validate()  # idempotent: from_dict and run_preprocess may both call it
    bad = PreprocessConfig(inputs=[str(tmp_path)], output=str(tmp_path / "out"), tokenizer="tok", workers=0,
                           prefix="a/b", num_shards=2, holdout_docs=-1, language_list=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError) as info:
        bad.validate()  # the options alone: it reads no file
    assert [e.field for e in info.value.errors] == ["prefix", "workers", "shard_index", "holdout_docs"]
    with pytest.raises(ConfigError, match="5 problems") as info:  # the library entry: the same, the list read
        run_preprocess(bad)
    assert [e.field for e in info.value.errors] == ["prefix", "workers", "shard_index", "holdout_docs",
                                                    "language_list"]
    assert not (tmp_path / "out").exists()
    # One error type for "your config or input is wrong": refusals found while running are ConfigErrors too.
    assert issubclass(PreprocessError, ConfigError) and issubclass(TokenizerError, ConfigError)


def test_progress_line_is_the_one_format(tmp_path):
    import io

    from megatron_mmbert.data.preprocess.counters import InlineCounters, RunProgress

    out = io.StringIO()
    progress = RunProgress(total_disk_bytes=4000, total_units=4, interval=3600, stream=out)
    progress._line.start -= 10.0  # ten seconds in
    counters = InlineCounters(progress)
    counters.add(docs=300, text_bytes=2_000_000, tokens=50_000, disk_bytes=1000)  # not yet due: silent
    assert out.getvalue() == ""
    progress.units_done = 1
    progress.maybe_print(counters, force=True)
    line = out.getvalue().strip()
    assert line.startswith("[preprocess] 1/4 units:  25.0% (1.0k/4.0k input bytes), 100 input bytes/s, "
                           "300 docs (30/s), 2.0M text bytes (200.0k/s), 50.0k tokens (5.0k/s), elapsed 0:00:10")
    assert line.endswith("ETA 0:00:30")  # the rest of the input bytes at the rate so far
