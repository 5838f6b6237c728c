"""Per-language Megatron MMIDIDX shards (``.bin``/``.idx``) and the preprocessing manifest.

On-disk format (megatron-core 0.16.1, ``megatron/core/datasets/indexed_dataset.py``): ``P.bin`` holds
the token ids of all sequences back to back in the shard dtype; ``P.idx`` is the 9-byte magic
``MMIDIDX\\0\\0``, version ``<Q`` = 1, dtype code ``<B``, sequence count ``<Q``, document-index count
``<Q`` (documents + 1), then int32 sequence lengths, int64 byte pointers and int64 document indices.
``ShardWriter`` writes exactly the bytes megatron-core's ``IndexedDatasetBuilder`` writes for the same
documents (tests compare them), but keeps lengths in growing numpy arrays instead of Python lists and
takes whole batches of documents at once.

Shards become visible atomically: data goes to ``P.bin.partial``/``P.idx.partial``, both are fsynced,
then renamed ``.bin`` first and ``.idx`` last. A prefix is finished exactly when its ``.idx`` exists
under its final name (``shard_finished``).

Merging design: each preprocessing work unit writes its own shard, and a language's shard set is the
*list* of those prefixes in the manifest. Nothing is ever concatenated, so the data is written once;
readers (megatron-core's ``IndexedDataset``, the index builder) open each prefix on its own.

This module imports neither torch nor megatron-core (workers start fast); the dtype codes below are the
file format's table, checked against megatron-core's ``DType`` in tests.

One subject, the preprocessed data on disk (shard files and the manifest that lists them), hence
the length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_mmbert.data.document_framing import DocumentFraming, count_framed

from megatron_mmbert.checkpoints.layout import TOKENIZER_DIR
from megatron_mmbert.fileio import atomic_write_text, replace_synced

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# File format dtype codes (megatron-core ``DType``): code <-> numpy dtype.
DTYPE_CODES: Dict[str, int] = {
    "uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8,
}
_CODE_TO_DTYPE = {code: name for name, code in DTYPE_CODES.items()}

MANIFEST_FORMAT = "megatron-mmbert-manifest"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
HELDOUT_DIR = "heldout"
"""Folder of a preprocessing output that holds its held-out documents (``holdout_docs``/``holdout_fraction``):
``OUT/heldout/{lang}/*.bin/.idx`` and ``OUT/heldout/manifest.json``, in the training manifest's format and never in
the training shards. No language may be named like it (``RESERVED_LANGS``)."""


def heldout_manifest_for(manifest_path: str) -> Optional[str]:
    """The held-out manifest written beside a training manifest (``manifest.json`` or its folder) by the same
    preprocessing run, or None when that run held nothing out. Training evaluates on it by default."""
    root = manifest_path if os.path.isdir(manifest_path) else os.path.dirname(os.path.abspath(manifest_path))
    candidate = os.path.join(os.path.abspath(root), HELDOUT_DIR, MANIFEST_NAME)
    return candidate if os.path.isfile(candidate) else None


VALID_LANG = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9_@+.-]{0,63}\Z")
"""A language tag is a single safe path component (it names the output folder): letters, digits and
``_ - @ . +`` (BCP 47 ``zh-Hans``, gettext/glibc ``sr@latin``, ``ca@valencia``), not hidden (no leading
dot), at most 64 characters; no separator or ``..`` can form."""
# Names the output folder uses for itself: a language of that name would collide with them.
RESERVED_LANGS = frozenset({MANIFEST_NAME, TOKENIZER_DIR, HELDOUT_DIR})


def valid_lang(lang) -> bool:
    """A language tag usable as a folder name of the output (and not one of its own files)."""
    return isinstance(lang, str) and bool(VALID_LANG.match(lang)) and lang.lower() not in RESERVED_LANGS


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype megatron's preprocess picks for a vocabulary (``DType.optimal_dtype``):
    uint16 below 65500 ids, int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def shard_finished(prefix: str) -> bool:
    """True when the shard was completely written (its ``.idx`` is renamed last)."""
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


class _GrowingArray:
    """An append-only numpy array (amortised doubling): lengths of millions of sequences cost
    bytes, not Python ints."""

    def __init__(self, dtype) -> None:
        self._data = np.empty(1024, dtype=dtype)
        self._size = 0

    def extend(self, values: np.ndarray) -> None:
        n = len(values)
        if self._size + n > len(self._data):
            grown = np.empty(max(2 * len(self._data), self._size + n), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : self._size + n] = values
        self._size += n

    def array(self) -> np.ndarray:
        return self._data[: self._size]

    def __len__(self) -> int:
        return self._size


class ShardWriter:
    """Writes one MMIDIDX shard; use as a context manager (an exception discards the partial files).

    ``add_documents(tokens, sequence_lengths, sequences_per_document)`` appends a batch: ``tokens``
    is the flat concatenation, ``sequence_lengths`` one entry per sequence and
    ``sequences_per_document`` one entry per document (omit it for one sequence per document, the
    unsplit case). ``finalize()`` publishes the shard atomically.
    """

    def __init__(self, prefix: str, dtype, framing_ids: Optional[Tuple[Optional[int], Optional[int]]] = None) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPE_CODES:
            raise ValueError(f"unsupported shard dtype {self.dtype}; use one of {sorted(DTYPE_CODES)}")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin_tmp = bin_path(prefix) + ".partial"
        self._idx_tmp = idx_path(prefix) + ".partial"
        self._bin = open(self._bin_tmp, "wb", buffering=1 << 22)
        self._lengths = _GrowingArray(np.int32)
        self._doc_ends = _GrowingArray(np.int64)  # cumulative sequence count after each document
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1
        """Largest token id written (recorded in the manifest; checked against the model's vocabulary)."""
        self.framing_ids = framing_ids
        """``(bos, eos)`` ids (either None: the tokenizer has none) whose documents :attr:`framing` counts;
        None: not counted."""
        self.starts_bos = 0
        self.ends_eos = 0
        self._framing_known = framing_ids is not None
        self._finalized = False

    def add_documents(
        self,
        tokens: np.ndarray,
        sequence_lengths: np.ndarray,
        sequences_per_document: Optional[np.ndarray] = None,
    ) -> None:
        tokens = np.asarray(tokens)
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())} but {len(tokens)} tokens given")
        if len(tokens) and tokens.dtype != self.dtype:
            # Range check before narrowing: a wrong-vocabulary id must never wrap around silently.
            info = np.iinfo(self.dtype)
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token id range [{lo}, {hi}] does not fit shard dtype {self.dtype}")
            tokens = tokens.astype(self.dtype)
        per_doc = (
            np.ones(len(lengths), dtype=np.int64)
            if sequences_per_document is None
            else np.asarray(sequences_per_document, dtype=np.int64)
        )
        if int(per_doc.sum()) != len(lengths):
            raise ValueError("sequences_per_document does not sum to the number of sequences")
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        if self._framing_known and len(per_doc):
            self._count_framing(tokens, lengths, per_doc)
        self._bin.write(tokens.tobytes(order="C"))
        start = self._doc_ends.array()[-1] if len(self._doc_ends) else 0
        self._lengths.extend(lengths.astype(np.int32))
        self._doc_ends.extend(start + np.cumsum(per_doc))
        self.documents += len(per_doc)
        self.tokens += len(tokens)

    def _count_framing(self, tokens: np.ndarray, lengths: np.ndarray, per_doc: np.ndarray) -> None:
        counted = count_framed(tokens, lengths, per_doc, *self.framing_ids)
        if counted is None:
            self._framing_known = False
        else:
            self.starts_bos += counted[0]
            self.ends_eos += counted[1]

    @property
    def framing(self) -> Optional["DocumentFraming"]:
        """What holds of the documents written so far (:class:`DocumentFraming`); None when not counted."""
        if not self._framing_known:
            return None
        bos, eos = self.framing_ids
        return DocumentFraming(bos=bos, eos=eos, starts_bos=self.starts_bos, ends_eos=self.ends_eos)

    def add_document(self, tokens: Sequence[int], sequence_lengths: Optional[Sequence[int]] = None) -> None:
        """One document; ``sequence_lengths`` defaults to a single sequence."""
        arr = np.asarray(tokens, dtype=np.int64)
        lengths = np.asarray([len(arr)] if sequence_lengths is None else sequence_lengths, dtype=np.int64)
        self.add_documents(arr, lengths, np.asarray([len(lengths)]))

    def finalize(self) -> None:
        self._bin.close()
        lengths = self._lengths.array()
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.concatenate([np.zeros(1, dtype=np.int64), self._doc_ends.array()])
        with open(self._idx_tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype.name]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_indices.tobytes(order="C"))
        replace_synced(self._bin_tmp, bin_path(self.prefix))
        replace_synced(self._idx_tmp, idx_path(self.prefix))
        self._finalized = True

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._finalized:
            self.abort()


@dataclasses.dataclass
class ShardIndex:
    """The parsed ``.idx`` of one shard (numpy views; no megatron-core import needed)."""

    dtype: np.dtype
    """Token dtype of the ``.bin``."""
    sequence_lengths: np.ndarray
    """int32 [S]: tokens per sequence."""
    sequence_pointers: np.ndarray
    """int64 [S]: byte offset of each sequence in the ``.bin``."""
    document_indices: np.ndarray
    """int64 [D+1]: document ``i`` covers sequences ``[document_indices[i], document_indices[i+1])``."""

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (sums of its sequences)."""
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return ends[self.document_indices[1:]] - ends[self.document_indices[:-1]]


def read_index(prefix: str) -> ShardIndex:
    """Parse ``prefix.idx`` with the same checks megatron-core applies on open."""
    path = idx_path(prefix)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:9] != INDEX_HEADER:
        raise ValueError(f"{path}: not an MMIDIDX index (bad magic {raw[:9]!r})")
    (version,) = struct.unpack_from("<Q", raw, 9)
    if version != INDEX_VERSION:
        raise ValueError(f"{path}: index version {version}, expected {INDEX_VERSION}")
    (code,) = struct.unpack_from("<B", raw, 17)
    if code not in _CODE_TO_DTYPE:
        raise ValueError(f"{path}: unknown dtype code {code}")
    seq_count, doc_count = struct.unpack_from("<QQ", raw, 18)
    off = 34
    lengths = np.frombuffer(raw, dtype=np.int32, count=seq_count, offset=off)
    off += 4 * seq_count
    pointers = np.frombuffer(raw, dtype=np.int64, count=seq_count, offset=off)
    off += 8 * seq_count
    docs = np.frombuffer(raw, dtype=np.int64, count=doc_count, offset=off)
    if doc_count < 1 or docs[-1] != seq_count:
        raise ValueError(f"{path}: document indices end at {docs[-1] if doc_count else None}, not {seq_count}")
    return ShardIndex(np.dtype(_CODE_TO_DTYPE[code]), lengths, pointers, docs)


INDEX_HEADER_BYTES = 34
"""Bytes of an ``.idx`` header; the int32 sequence lengths start there (then int64 pointers, int64
document indices)."""


def index_header(head: bytes, path: str) -> Tuple[np.dtype, int, int]:
    """``(token dtype, sequence count, document-index count)`` of an ``.idx`` header (its first
    :data:`INDEX_HEADER_BYTES` bytes), refused naming ``path`` unless it is MMIDIDX version 1."""
    if len(head) < INDEX_HEADER_BYTES or head[:9] != INDEX_HEADER:
        raise ValueError(f"{path}: not an MMIDIDX index (bad magic {head[:9]!r}); the shard is damaged")
    (version,) = struct.unpack_from("<Q", head, 9)
    (code,) = struct.unpack_from("<B", head, 17)
    seq_count, doc_count = struct.unpack_from("<QQ", head, 18)
    if version != INDEX_VERSION or code not in _CODE_TO_DTYPE:
        raise ValueError(f"{path}: index version {version} / dtype code {code} unknown; the shard is damaged")
    return np.dtype(_CODE_TO_DTYPE[code]), seq_count, doc_count


def check_shard(prefix: str, dtype) -> None:
    """Cheap structural check of one shard before hours are spent on it: both files exist, the
    ``.idx`` has the MMIDIDX magic, version and a size matching its counts, its dtype is ``dtype``
    (the manifest's), and the ``.bin`` holds exactly the bytes the index points at. Reads the
    header and two entries, not the arrays. Raises ``ValueError`` naming the file."""
    dtype = np.dtype(dtype)
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    for path in (ipath, bpath):
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (the manifest lists shard {prefix}); rerun preprocessing")
    with open(ipath, "rb") as f:
        stored, seq_count, doc_count = index_header(f.read(INDEX_HEADER_BYTES), ipath)
        if stored != dtype:
            raise ValueError(
                f"{ipath}: tokens stored as {stored.name}, but the manifest says {dtype.name}; reading it "
                "would train on garbage ids. Rerun preprocessing for this shard"
            )
        expected = 34 + 12 * seq_count + 8 * doc_count
        size = os.fstat(f.fileno()).st_size
        if size != expected:
            raise ValueError(f"{ipath}: {size} bytes but its counts need {expected}; the index is truncated or damaged")
        bin_bytes = 0
        if seq_count:
            f.seek(34 + 4 * (seq_count - 1))
            (last_len,) = struct.unpack("<i", f.read(4))
            f.seek(34 + 4 * seq_count + 8 * (seq_count - 1))
            (last_ptr,) = struct.unpack("<q", f.read(8))
            bin_bytes = last_ptr + last_len * dtype.itemsize
    actual = os.path.getsize(bpath)
    if actual != bin_bytes:
        raise ValueError(f"{bpath}: {actual} bytes, but its index points at {bin_bytes}; the shard is truncated or damaged")


def check_manifest_shards(manifest: "Manifest", languages, vocab_size: int) -> None:
    """:func:`check_shard` for every shard of ``languages``, and each language's recorded largest
    token id below ``vocab_size``."""
    for lang in languages:
        entry = manifest.languages[lang]
        if entry.max_token_id is not None and entry.max_token_id >= vocab_size:
            raise ValueError(
                f"language {lang}: its shards hold token id {entry.max_token_id}, but the model's vocabulary "
                f"has {vocab_size} ids (model.vocab_size); the shards were made with another tokenizer"
            )
        for prefix in entry.shards:
            check_shard(prefix, manifest.numpy_dtype)


# ----------------------------------------------------------------------------------------------
# Manifest (docs/interfaces.md, "Manifest (preprocess -> schedule)")


@dataclasses.dataclass
class TokenizerIdentity:
    """Who made the token ids; shards from different tokenizers must never be mixed."""

    name: str
    """Human-readable name (the tokenizer folder or file name)."""
    vocab_size: int
    """Number of ids the tokenizer can emit (including added special tokens)."""
    hash: str
    """sha256 over the tokenizer files (the identity that is compared)."""
    special_ids: Dict[str, Optional[int]]
    """Ids of ``pad``, ``eos``, ``bos``, ``unk``, ``mask`` (None when the tokenizer has no such token)."""
    all_special_ids: List[int]
    """Every special (control) id, sorted."""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": int(self.vocab_size),
            "hash": self.hash,
            "special_ids": dict(self.special_ids),
            "all_special_ids": sorted(int(i) for i in self.all_special_ids),
        }

    @classmethod
    def from_json(cls, obj: dict) -> "TokenizerIdentity":
        return cls(
            name=obj["name"],
            vocab_size=int(obj["vocab_size"]),
            hash=obj["hash"],
            special_ids={k: (None if v is None else int(v)) for k, v in obj["special_ids"].items()},
            all_special_ids=[int(i) for i in obj["all_special_ids"]],
        )


@dataclasses.dataclass
class LanguageEntry:
    """One language's shards and counts."""

    shards: List[str]
    """Shard prefixes (absolute after ``load_manifest``; relative to the manifest folder on disk)."""
    documents: int
    """Documents over all shards."""
    tokens: int
    """Tokens over all shards, framing tokens included."""
    bytes: int
    """UTF-8 bytes of the source text of those documents."""
    sources: List[str]
    """Input files the documents came from."""
    max_token_id: Optional[int] = None
    """Largest token id in its shards, recorded at preprocessing (None: an older manifest); must be
    below the model's vocabulary."""
    framing: Optional[DocumentFraming] = None
    """Documents starting with ``<bos>`` / ending with ``<eos>``, counted at preprocessing (None: an older
    manifest, or shards another tool wrote); lets the index build skip reading them from the shards."""


@dataclasses.dataclass
class Manifest:
    """The preprocessing output: tokenizer identity, shard dtype and per-language shards."""

    tokenizer: TokenizerIdentity
    """The tokenizer every shard was made with."""
    dtype: str
    """Numpy name of the token dtype of every shard (``uint16`` or ``int32``)."""
    languages: Dict[str, LanguageEntry]
    """Language key (e.g. ``eng_Latn``) -> its entry."""
    root: str = ""
    """Folder holding the manifest (shard prefixes are relative to it on disk)."""

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_json(self) -> dict:
        langs = {}
        for lang in sorted(self.languages):
            e = self.languages[lang]
            langs[lang] = {
                "shards": [_relative(p, self.root) for p in e.shards],
                "documents": int(e.documents),
                "tokens": int(e.tokens),
                "bytes": int(e.bytes),
                "sources": list(e.sources),
            }
            if e.max_token_id is not None:
                langs[lang]["max_token_id"] = int(e.max_token_id)
            if e.framing is not None:  # absent when unknown: an older manifest's digest is unchanged
                langs[lang]["framing"] = e.framing.to_json()
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "tokenizer": self.tokenizer.to_json(),
            "dtype": self.dtype,
            "languages": langs,
        }


def _relative(prefix: str, root: str) -> str:
    return os.path.relpath(prefix, root) if os.path.isabs(prefix) and root else prefix


def write_manifest(manifest: Manifest, path: str) -> None:
    """Write ``manifest`` to ``path`` atomically; shard prefixes are stored relative to its folder."""
    root = os.path.dirname(os.path.abspath(path))
    text = json.dumps(dataclasses.replace(manifest, root=root).to_json(), indent=1, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def load_manifest(path: str) -> Manifest:
    """Read a manifest (``path`` is the file or its folder); shard prefixes come back absolute."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        # The folder preprocessing would write it into: the file's folder, or ``path`` itself when it names
        # neither an existing folder nor a manifest file (``/data/shards`` before preprocessing ran).
        folder = os.path.dirname(path) if os.path.basename(path) == MANIFEST_NAME else path
        folder = os.path.abspath(folder or ".")
        if os.path.basename(folder) == HELDOUT_DIR:  # OUT/heldout is written by preprocessing OUT
            how = (f"run tools/preprocess_data.py --output {os.path.dirname(folder)} --holdout_docs N "
                   f"(it writes {folder})")
        else:
            how = f"run tools/preprocess_data.py --output {folder}"
        raise FileNotFoundError(f"no manifest at {path}: {how} first") from None
    if obj.get("format") != MANIFEST_FORMAT or obj.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} is not a {MANIFEST_FORMAT} version {MANIFEST_VERSION} file "
            f"(format={obj.get('format')!r}, version={obj.get('version')!r})"
        )
    root = os.path.dirname(os.path.abspath(path))
    languages = {
        lang: LanguageEntry(
            shards=[os.path.normpath(os.path.join(root, p)) for p in e["shards"]],
            documents=int(e["documents"]),
            tokens=int(e["tokens"]),
            bytes=int(e.get("bytes", 0)),
            sources=list(e.get("sources", [])),
            max_token_id=None if e.get("max_token_id") is None else int(e["max_token_id"]),
            framing=None if e.get("framing") is None else DocumentFraming.from_json(e["framing"]),
        )
        for lang, e in obj["languages"].items()
    }
    return Manifest(
        tokenizer=TokenizerIdentity.from_json(obj["tokenizer"]),
        dtype=obj["dtype"],
        languages=languages,
        root=root,
    )


SOURCE_SEPARATOR = "/"
"""Between a phase manifest's source id and a language key in a stream name."""


def source_id(manifest: "Manifest", path: str) -> str:
    """Stream prefix of a phase manifest: its folder name and the start of its content hash, so a
    changed manifest is a new set of streams (and a branch check names it)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)) if path.endswith(".json") else os.path.abspath(path))
    return f"{folder}~{digest[:8]}"


def phase_sources(manifest: "Manifest", phases: Sequence) -> tuple:
    """``(manifest, phases)`` with the manifests that phases name (``PhaseConfig.manifest``) merged in.

    Each language of a phase manifest becomes the stream ``{source_id}/{language}`` of the merged
    manifest; the phase is rewritten to name those streams (``all`` / ``top:N`` resolved over its own
    manifest) and no longer names a manifest. Phases without one keep the run manifest's streams
    (``all`` / ``top:N`` resolved over the run manifest, so they never draw from a phase manifest).
    Idempotent: phases already rewritten pass through. The tokenizer and token dtype must match."""
    from megatron_mmbert.config_base import ConfigError

    if not any(getattr(p, "manifest", None) for p in phases):
        return manifest, list(phases)
    languages = dict(manifest.languages)
    loaded: Dict[str, tuple] = {}
    out = []
    for p in phases:
        if not p.manifest:
            if isinstance(p.languages, str):  # all / top:N over the run manifest only
                have = {lang: e.tokens for lang, e in manifest.languages.items() if e.tokens > 0}
                names = sorted(have) if p.languages == "all" else sorted(
                    have, key=lambda lang: (-have[lang], lang))[: int(p.languages[4:])]
                p = dataclasses.replace(p, languages=names)
            out.append(p)
            continue
        path = os.path.abspath(p.manifest)
        if path not in loaded:
            m = load_manifest(path)
            if m.tokenizer.hash != manifest.tokenizer.hash or m.dtype != manifest.dtype:
                raise ConfigError(
                    f"phase {p.name!r}: manifest {p.manifest!r} was made with tokenizer {m.tokenizer.name!r} "
                    f"({m.tokenizer.hash[:12]}, {m.dtype}) but data.manifest with {manifest.tokenizer.name!r} "
                    f"({manifest.tokenizer.hash[:12]}, {manifest.dtype}); preprocess it with the run's tokenizer"
                )
            sid = source_id(m, path)
            for lang, entry in m.languages.items():
                languages[f"{sid}{SOURCE_SEPARATOR}{lang}"] = entry
            loaded[path] = (sid, m)
        sid, m = loaded[path]
        have = {lang: e.tokens for lang, e in m.languages.items() if e.tokens > 0}
        spec = p.languages
        if isinstance(spec, str) and spec == "all":
            names = sorted(have)
        elif isinstance(spec, str) and spec.startswith("top:"):
            names = sorted(have, key=lambda lang: (-have[lang], lang))[: int(spec[4:])]
        else:
            names = list(spec)
        unknown = [lang for lang in list(names) + list(p.fixed_shares) if lang not in have]
        if unknown:
            raise ConfigError(
                f"phase {p.name!r}: language(s) {unknown[:5]} have no tokens in its manifest {p.manifest!r} "
                f"({len(have)} languages there, e.g. {sorted(have)[:5]}); preprocess them or drop them"
            )
        out.append(dataclasses.replace(
            p, manifest=None, languages=[f"{sid}{SOURCE_SEPARATOR}{lang}" for lang in names],
            fixed_shares={f"{sid}{SOURCE_SEPARATOR}{lang}": v for lang, v in p.fixed_shares.items()},
        ))
    return dataclasses.replace(manifest, languages=languages), out


def split_sources(manifest: "Manifest") -> Dict[str, "Manifest"]:
    """The merged manifest of :func:`phase_sources` by source: ``""`` (the run's manifest) and each
    phase manifest's source id, each with its own languages (keys without the prefix)."""
    groups: Dict[str, Dict[str, LanguageEntry]] = {}
    for name, entry in manifest.languages.items():
        sid, _, lang = name.rpartition(SOURCE_SEPARATOR)
        groups.setdefault(sid, {})[lang] = entry
    groups.setdefault("", {})
    return {sid: dataclasses.replace(manifest, languages=langs) for sid, langs in groups.items()}
