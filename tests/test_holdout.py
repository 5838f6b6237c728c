"""Held-out documents at preprocessing (issue 11): ``--holdout-docs N`` / ``--holdout-fraction F``.

* The held-out documents are exactly the N smallest sha256 of the text per language (computed here from
  the corpus files, independently of the tool), they are in ``OUT/heldout/`` and none is in a training shard.
* The split does not depend on the unit size or the worker count, and a killed shard task plus reruns and
  ``--finalize`` give the same bytes (training and held-out shards, both manifests) as one uninterrupted run.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import time

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_mmbert.cli.preprocess_data import main as cli_main
from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megatron_mmbert.data.shards import HELDOUT_DIR, heldout_manifest_for, load_manifest, valid_lang
from megatron_mmbert.data.sources import ReadOptions
from tests.helpers.preprocess import cli_args as _args, framed as _framed, output_files as _files
from tests.helpers.preprocess import shard_documents as _documents, shard_task as _task

N = 3


def _corpus_texts(corpus):
    """language -> its documents' texts, read straight from the FineWeb2-layout parquet files."""
    texts = {}
    for path in sorted(glob.glob(os.path.join(corpus, "data", "*", "train", "*.parquet"))):
        lang = path.split(os.sep)[-3]
        texts.setdefault(lang, []).extend(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    return texts


def _norm_hash(text):
    """The held-out hash, computed here from its stated rule: NFC, whitespace runs as one space, stripped."""
    import unicodedata

    return hashlib.sha256(" ".join(unicodedata.normalize("NFC", text).split()).encode("utf-8")).hexdigest()


def _key(doc):
    return hashlib.sha256(repr(doc).encode()).hexdigest()


def _split(manifest_path):
    m = load_manifest(manifest_path)
    return {lang: sorted(map(_key, _documents(e.shards))) for lang, e in m.languages.items()}


@pytest.mark.slow
def test_heldout_are_the_smallest_hashes_and_never_trained_on(tmp_path, demo_corpus, demo_tokenizer):
    out = str(tmp_path / "out")
    res = run_preprocess(PreprocessConfig(inputs=[demo_corpus], output=out, tokenizer=demo_tokenizer,
                                          chunk_bytes=8 << 10, holdout_docs=N))
    assert heldout_manifest_for(out) == os.path.join(out, HELDOUT_DIR, "manifest.json")
    assert heldout_manifest_for(os.path.join(out, "manifest.json")) == heldout_manifest_for(out)
    heldout = _split(heldout_manifest_for(out))
    train = {lang: sorted(map(_key, _documents(e.shards))) for lang, e in res.manifest.languages.items()}

    hf = AutoTokenizer.from_pretrained(demo_tokenizer)
    texts = _corpus_texts(demo_corpus)
    assert sorted(heldout) == sorted(texts) == sorted(train)
    for lang, docs in texts.items():
        by_hash = {}
        for t in docs:
            by_hash.setdefault(_norm_hash(t), []).append(t)
        chosen, cap = [], min(N, len(docs) // 2)  # the cap counts documents, every copy of a text
        for h in sorted(by_hash)[:N]:
            if sum(len(by_hash[c]) for c in chosen) + len(by_hash[h]) <= cap:
                chosen.append(h)
        expected_held = [t for h in chosen for t in by_hash[h]]
        expected_train = [t for h in sorted(by_hash) if h not in chosen for t in by_hash[h]]
        assert heldout[lang] == sorted(map(_key, _framed(hf, expected_held))), lang
        assert train[lang] == sorted(map(_key, _framed(hf, expected_train))), lang
        assert not set(heldout[lang]) & set(train[lang]), lang  # no held-out document in a training shard
    m = load_manifest(heldout_manifest_for(out))
    assert all(os.path.dirname(s) == os.path.join(out, HELDOUT_DIR, lang)
               for lang, e in m.languages.items() for s in e.shards)
    assert m.tokenizer == res.manifest.tokenizer and m.dtype == res.manifest.dtype

    # Another unit size and worker count: the same documents held out (the shards are laid out differently).
    other = str(tmp_path / "other")
    run_preprocess(PreprocessConfig(inputs=[demo_corpus], output=other, tokenizer=demo_tokenizer,
                                    chunk_bytes=64 << 10, workers=2, holdout_docs=N))
    assert _split(heldout_manifest_for(other)) == heldout
    assert _split(os.path.join(other, "manifest.json")) == train

    # The fraction rule is a property of each text alone.
    frac = str(tmp_path / "frac")
    run_preprocess(PreprocessConfig(inputs=[demo_corpus], output=frac, tokenizer=demo_tokenizer,
                                    chunk_bytes=8 << 10, holdout_fraction=0.25))
    got = _split(heldout_manifest_for(frac))
    for lang, docs in texts.items():
        held = [t for t in docs if int(_norm_hash(t)[:16], 16) < 0.25 * 2 ** 64]
        assert got.get(lang, []) == sorted(map(_key, _framed(hf, held))), lang

    # No preprocessing without held-out data writes a held-out folder; "heldout" is no language name.
    assert heldout_manifest_for(str(tmp_path)) is None
    assert not valid_lang("heldout") and not valid_lang("HeldOut")
    with pytest.raises(ConfigError, match="give one of them"):  # PreprocessConfig.validate: before any work
        run_preprocess(PreprocessConfig(inputs=[demo_corpus], output=str(tmp_path / "both"), tokenizer=demo_tokenizer,
                                        holdout_docs=2, holdout_fraction=0.1))


@pytest.mark.slow
def test_killed_shard_task_keeps_the_split(tmp_path, demo_corpus, demo_tokenizer):
    hold = ("--holdout-docs", str(N))
    out = str(tmp_path / "out")
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, *hold)) == 0
    expected = _files(out)
    assert any(f.startswith(HELDOUT_DIR + os.sep) and f.endswith(".idx") for f in expected)
    assert os.path.join(HELDOUT_DIR, "manifest.json") in expected
    shutil.rmtree(out)
    units = os.path.join(out, ".preprocess", "units")

    def finished():
        return [f for f in os.listdir(units) if f.endswith(".json")] if os.path.isdir(units) else []

    p = _task(demo_corpus, out, demo_tokenizer, "--num-shards", "2", "--shard-index", "0", "--batch-docs", "1", *hold)
    deadline = time.time() + 90
    while not finished() and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    assert p.poll() is None, "the shard task finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert finished()
    for index in ("0", "1"):
        assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--num-shards", "2", "--shard-index", index, *hold)) == 0
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--finalize", *hold)) == 0
    got = _files(out)
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], rel
    # A rerun resumes: nothing to do, the same bytes.
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, *hold)) == 0
    assert _files(out) == expected


def test_inputs_that_change_the_selection_are_refused(tmp_path, demo_tokenizer):
    """Adding a file whose documents would displace held-out ones, once units are done, would leave them in
    training shards: refused, naming the fix. A file that changes nothing is added."""

    def sha(t):
        return hashlib.sha256(t.encode()).hexdigest()

    texts = [f"document number {i}" for i in range(6)]
    cut = sorted(map(sha, texts))[0]
    smaller = next(t for t in (f"another text {i}" for i in range(10_000)) if sha(t) < cut)
    larger = next(t for t in (f"more text {i}" for i in range(10_000)) if sha(t) > cut)
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    # The language comes from a field, so each file is its own unit (files of a fixed language are packed).
    a.write_text("".join(json.dumps({"text": t, "lang": "eng_Latn"}) + "\n" for t in texts))
    b.write_text(json.dumps({"text": larger, "lang": "eng_Latn"}) + "\n")
    c.write_text(json.dumps({"text": smaller, "lang": "eng_Latn"}) + "\n")
    out = str(tmp_path / "out")

    def run(*inputs):
        return run_preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output=out, tokenizer=demo_tokenizer,
                                               read=ReadOptions(lang_key="lang"), holdout_docs=1))

    run(a)
    assert load_manifest(heldout_manifest_for(out)).languages["eng_Latn"].documents == 1
    res = run(a, b)
    assert res.units_run == 1 and res.manifest.languages["eng_Latn"].documents == 6
    with pytest.raises(PreprocessError, match="held-out selection .* differs .* new output folder"):
        run(a, b, c)
