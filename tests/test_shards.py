"""ShardWriter against megatron-core's own IndexedDatasetBuilder / IndexedDataset, and the manifest."""

import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_mmbert.data.shards import (
    DTYPE_CODES,
    DocumentFraming,
    LanguageEntry,
    Manifest,
    ShardWriter,
    TokenizerIdentity,
    load_manifest,
    read_index,
    shard_finished,
    token_dtype,
    write_manifest,
)


def _random_docs(rng, n, vocab, split=False):
    docs = []
    for _ in range(n):
        if split:
            lengths = list(rng.integers(1, 20, size=int(rng.integers(1, 5))))
        else:
            lengths = [int(rng.integers(0, 50))]
        docs.append((rng.integers(0, vocab, size=sum(lengths)), lengths))
    return docs


def test_dtype_table_matches_megatron():
    for name, code in DTYPE_CODES.items():
        assert DType.code_from_dtype(getattr(np, name)) == code
    for vocab in (1, 4096, 65499, 65500, 256000):
        assert token_dtype(vocab) == np.dtype(DType.optimal_dtype(vocab))


@pytest.mark.parametrize("vocab,split", [(4096, False), (256000, False), (256000, True)])
def test_bytes_identical_to_megatron_builder(tmp_path, vocab, split):
    rng = np.random.default_rng(vocab + split)
    docs = _random_docs(rng, 300, vocab, split)
    dtype = token_dtype(vocab)

    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=dtype.type)
    for toks, lengths in docs:
        builder.add_document(torch.tensor(toks), lengths)
    builder.finalize(ref + ".idx")

    ours = str(tmp_path / "ours")
    with ShardWriter(ours, dtype) as w:
        # Mixed batched and single-document calls must give the same file.
        half = len(docs) // 2
        flat = np.concatenate([t for t, _ in docs[:half]])
        lengths = np.concatenate([l for _, l in docs[:half]])
        w.add_documents(flat, lengths, np.array([len(l) for _, l in docs[:half]]))
        for toks, l in docs[half:]:
            w.add_document(toks, l)
        w.finalize()

    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(ref + ext, "rb").read(), ext

    ds = IndexedDataset(ours)
    assert len(ds.document_indices) == len(docs) + 1
    seq = 0
    for toks, lengths in docs:
        got = np.concatenate([ds[seq + j] for j in range(len(lengths))]) if lengths else np.array([])
        np.testing.assert_array_equal(got, toks)
        seq += len(lengths)

    idx = read_index(ours)
    assert idx.dtype == dtype
    np.testing.assert_array_equal(idx.sequence_lengths, ds.sequence_lengths)
    np.testing.assert_array_equal(idx.document_indices, ds.document_indices)
    np.testing.assert_array_equal(idx.document_lengths(), [len(t) for t, _ in docs])


def test_partial_shard_never_looks_finished(tmp_path):
    prefix = str(tmp_path / "lang" / "part")
    with pytest.raises(RuntimeError):
        with ShardWriter(prefix, np.uint16) as w:
            w.add_document([1, 2, 3])
            assert not shard_finished(prefix)
            raise RuntimeError("crash")
    assert not shard_finished(prefix)
    assert os.listdir(tmp_path / "lang") == []


def test_out_of_range_ids_rejected(tmp_path):
    with ShardWriter(str(tmp_path / "p"), np.uint16) as w:
        with pytest.raises(ValueError, match="does not fit"):
            w.add_document([1, 70000])


def test_manifest_roundtrip(tmp_path):
    tok = TokenizerIdentity("tiny", 4096, "ab" * 32, {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4},
                            [0, 1, 2, 3, 4])
    shard = str(tmp_path / "eng_Latn" / "part-0")
    m = Manifest(tok, "uint16", {"eng_Latn": LanguageEntry([shard], 3, 40, 120, ["/in/a.jsonl"])})
    write_manifest(m, str(tmp_path / "manifest.json"))
    raw = json.load(open(tmp_path / "manifest.json"))
    assert raw["format"] == "megatron-mmbert-manifest" and raw["version"] == 1
    assert raw["languages"]["eng_Latn"]["shards"] == ["eng_Latn/part-0"]
    assert set(raw) == {"format", "version", "tokenizer", "dtype", "languages"}
    back = load_manifest(str(tmp_path))
    assert back.tokenizer == tok and back.dtype == "uint16"
    assert back.languages["eng_Latn"].shards == [shard]
    assert back.languages["eng_Latn"].tokens == 40
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        load_manifest(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("bos, eos", [(2, 1), (None, 1), (2, None)])
def test_writer_counts_the_framing_the_index_reads(tmp_path, bos, eos):
    """ShardWriter.framing counts, as it writes, the documents the index's scan finds starting with
    <bos> / ending with <eos> (data/index/documents.py, the oracle here): empty documents, documents of
    several sequences with empty first or last ones, bos/eos inside the text, batches of several."""
    from megatron_mmbert.data.index import documents

    rng = np.random.default_rng(5)
    prefix = str(tmp_path / "x" / "part-0")
    w = ShardWriter(prefix, np.uint16, framing_ids=(bos, eos))
    for _ in range(7):
        toks, lengths, per_doc = [], [], []
        for _ in range(int(rng.integers(1, 30))):
            k = int(rng.integers(1, 4))
            seqs = [list(rng.integers(0, 6, size=int(rng.integers(0, 4)))) for _ in range(k)]
            toks += [t for s in seqs for t in s]
            lengths += [len(s) for s in seqs]
            per_doc.append(k)
        w.add_documents(np.array(toks, np.int64), np.array(lengths), np.array(per_doc))
    w.finalize()
    ds = IndexedDataset(prefix)
    first, last = documents._first_and_last_tokens(prefix, ds, np.asarray(ds.document_indices, np.int64))
    assert w.framing == DocumentFraming(bos, eos, int((first == bos).sum()) if bos is not None else 0,
                                        int((last == eos).sum()) if eos is not None else 0)
    assert 0 < w.framing.starts_bos + w.framing.ends_eos < 2 * w.documents  # neither none nor all: a real test
    unknown = ShardWriter(str(tmp_path / "x" / "part-1"), np.uint16, framing_ids=(bos, eos))
    unknown.add_documents(np.array([2, 5, 1]), np.array([3]), np.array([1, 0]))  # a document of no sequences
    assert unknown.framing is None and ShardWriter(str(tmp_path / "p2"), np.uint16).framing is None
    unknown.abort()


def test_manifest_framing_record_roundtrip_and_older_manifests(tmp_path):
    """The framing record round-trips; a manifest without it loads (framing None) and writes the same
    bytes as before it existed, so its digest (and the index cache key) is unchanged."""
    tok = TokenizerIdentity("tiny", 4096, "ab" * 32, {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4},
                            [0, 1, 2, 3, 4])
    shard = str(tmp_path / "eng_Latn" / "part-0")
    framed = DocumentFraming(bos=2, eos=1, starts_bos=3, ends_eos=3)
    m = Manifest(tok, "uint16", {"eng_Latn": LanguageEntry([shard], 3, 40, 120, [], 9, framed)})
    write_manifest(m, str(tmp_path / "manifest.json"))
    raw = json.load(open(tmp_path / "manifest.json"))
    assert raw["languages"]["eng_Latn"]["framing"] == {"bos": 2, "eos": 1, "starts_bos": 3, "ends_eos": 3}
    assert load_manifest(str(tmp_path)).languages["eng_Latn"].framing == framed
    del raw["languages"]["eng_Latn"]["framing"]
    json.dump(raw, open(tmp_path / "manifest.json", "w"))
    old = load_manifest(str(tmp_path))
    assert old.languages["eng_Latn"].framing is None
    assert "framing" not in old.to_json()["languages"]["eng_Latn"]


def test_manifest_framing_sums_its_units_and_is_unknown_with_an_older_unit(tmp_path):
    """finalize's manifest: a language's framing record is its units' counts summed; a unit written
    before framing was counted (no ``framing`` in its marker), or counting other ids, leaves it unknown."""
    from megatron_mmbert.data.preprocess.finalize import build_manifest

    tok = TokenizerIdentity("t", 4096, "0", {"bos": 2, "eos": 1}, [1, 2])

    def unit(name, framing):
        sh = {"prefix": f"x/{name}", "documents": 3, "tokens": 9, "bytes": 0, "sources": [], "max_token_id": 9}
        return {"shards": {"x": dict(sh, **({"framing": framing} if framing else {}))}}

    a = {"bos": 2, "eos": 1, "starts_bos": 3, "ends_eos": 3}
    b = {"bos": 2, "eos": 1, "starts_bos": 3, "ends_eos": 1}
    m = build_manifest(str(tmp_path), tok, "uint16", [unit("p0", a), unit("p1", b)])
    assert m.languages["x"].framing == DocumentFraming(2, 1, 6, 4)
    assert build_manifest(str(tmp_path), tok, "uint16", [unit("p0", a), unit("p1", None)]).languages["x"].framing is None
    other = dict(a, bos=None)
    assert build_manifest(str(tmp_path), tok, "uint16", [unit("p0", a), unit("p1", other)]).languages["x"].framing is None
