"""A tiny multilingual corpus for the data tests: random documents written with megatron-core's own
``IndexedDatasetBuilder`` (the reference writer), plus a manifest as in docs/interfaces.md."""

import json
import os

import numpy as np

SPECIAL = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4}
VOCAB = 500


def write_corpus(root, docs_per_lang, seed=0, max_len=60, shards_per_lang=1, record_framing=False):
    """Languages ``l0, l1, ...`` with the given document counts; documents framed ``<bos> ... <eos>``;
    ``record_framing``: the manifest records that framing as preprocessing does (``framing``).

    Returns ``(manifest_path, {lang: [document token arrays in global document order]})``.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    langs, texts = {}, {}
    for li, n_docs in enumerate(docs_per_lang):
        lang = f"l{li}"
        os.makedirs(os.path.join(root, lang), exist_ok=True)
        docs = []
        for d in range(n_docs):
            body = rng.integers(5, VOCAB, size=int(rng.integers(1, max_len)))
            docs.append(np.concatenate([[SPECIAL["bos"]], body, [SPECIAL["eos"]]]).astype(np.int32))
        prefixes = []
        bounds = np.linspace(0, n_docs, shards_per_lang + 1).astype(int)
        for k in range(shards_per_lang):
            prefix = os.path.join(root, lang, f"part-{k:05d}")
            b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
            for doc in docs[bounds[k]:bounds[k + 1]]:
                b.add_document(doc, [len(doc)])
            b.finalize(prefix + ".idx")
            prefixes.append(os.path.relpath(prefix, root))
        langs[lang] = {"shards": prefixes, "documents": n_docs, "tokens": int(sum(len(d) for d in docs)),
                       "bytes": 0, "sources": []}
        if record_framing:
            langs[lang]["framing"] = {"bos": SPECIAL["bos"], "eos": SPECIAL["eos"], "starts_bos": n_docs,
                                      "ends_eos": n_docs}
        texts[lang] = docs
    manifest = {
        "format": "megatron-mmbert-manifest", "version": 1,
        "tokenizer": {"name": "test", "vocab_size": VOCAB, "hash": "0" * 64, "special_ids": SPECIAL,
                      "all_special_ids": sorted(SPECIAL.values())},
        "dtype": "int32", "languages": langs,
    }
    path = os.path.join(root, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path, texts
