"""Input readers for preprocessing: find the documents, split big files into work segments, and
account for bad input.

Inputs (``discover``):
* JSONL: ``.jsonl``/``.json``/``.ndjson``, optionally ``.gz`` or ``.zst``; one JSON object per line,
  text under ``--read.text_key`` (default ``text``). Blank lines are skipped silently.
* Parquet (``.parquet``), read a batch at a time with pyarrow; Arrow IPC files (``.arrow``, what
  Hugging Face ``datasets`` writes).
* Plain text (``.txt``, optionally ``.gz``/``.zst``): by default documents are separated by one or
  more blank lines (paragraph blocks, the shape of most text dumps); ``text_mode="line"`` makes every
  non-empty line a document.
* A folder in the FineWeb2 layout, ``data/{lang}_{Script}/{split}/*.parquet`` (the folder holding
  ``data/``, ``data/`` itself, or a single ``{lang}_{Script}`` folder): the language comes from the
  folder name; ``*_removed`` folders are skipped.
* A Hugging Face ``datasets`` folder written by ``save_to_disk`` (read with ``load_from_disk``; a
  ``DatasetDict`` uses ``split``).
* Any other folder: the supported files under it, recursively, in sorted order.

Language of a document: the FineWeb2 folder, else the ``--read.lang_key`` field, else ``--read.lang``.

Work segments (``plan_segments``): plain JSONL is split into byte ranges (a line belongs to the range
its first byte lies in), Parquet into runs of row groups and ``save_to_disk`` datasets into row
ranges, each about ``chunk_bytes`` on disk; compressed and text files are read whole. The plan
depends only on the inputs and ``chunk_bytes``, never on the number of workers, so the output does
not either.

Bad input (``BadInputLog``): a malformed JSON line, missing/empty/non-string text, invalid UTF-8, a
missing language, an unreadable file or an empty language folder is counted per file with the first
few ``file:N`` locations (N is the 1-based line, or the 1-based row for columnar files); the document
is skipped. With ``strict`` the first one raises ``BadInputError``.

One subject, reading raw input (one reader per format, segmenting, bad-input accounting), hence the
length.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.shards import RESERVED_LANGS, valid_lang

JSONL_EXTS = (".jsonl", ".json", ".ndjson")
TEXT_EXTS = (".txt",)
COMPRESSED = (".gz", ".zst")
LANG_FOLDER = re.compile(r"^[a-z]{2,3}_[A-Z][a-z]{3}$")  # FineWeb2 subset names, e.g. fra_Latn


def source_keys(path: str, kind: str, split: str = "train") -> Optional[List[str]]:
    """The field / column names a source's records have (its first JSON object, or its schema), to say
    what exists when the wanted key does not; None when they cannot be read (text files have none)."""
    try:
        if kind == "jsonl":
            with _open_binary(path) as f:
                for raw in f:
                    if raw.strip():
                        obj = json.loads(raw.decode("utf-8"))
                        return sorted(obj) if isinstance(obj, dict) else None
            return []
        if kind == "parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        if kind == "arrow":
            import pyarrow as pa

            try:
                return list(pa.ipc.open_stream(pa.memory_map(path)).schema.names)
            except pa.ArrowInvalid:
                return list(pa.ipc.open_file(pa.memory_map(path)).schema.names)
        if kind == "hf_disk":
            return list(_load_hf_disk(path, split).column_names)
    except Exception:  # noqa: BLE001 - only a hint for an error message; the record errors say the rest
        return None
    return None

BAD_KINDS = {
    "malformed_json": "malformed JSON line",
    "missing_text": "missing text field",
    "non_string_text": "text is not a string",
    "empty_text": "empty text",
    "invalid_utf8": "invalid UTF-8",
    "missing_language": "missing or invalid language",
    "unreadable_file": "unreadable file",
    "empty_language_folder": "empty language folder",
}


class InputError(ConfigError):
    """An input that cannot be used (missing, unsupported, of no known language); the message says what
    to set. A :class:`ConfigError` (the project's one error type for "your config or input is wrong"):
    ``field`` is the config field to blame (``read.lang``) when one is, so a command line can name the
    option that sets it."""


class BadInputError(InputError):
    """Bad input under ``strict``: the first bad record, named by file and line."""


@dataclasses.dataclass
class BadInputLog:
    """Per-file counts of bad input and the first few locations of each file."""

    strict: bool = False
    """Raise on the first bad input instead of counting it."""
    max_locations: int = 5
    """Locations kept per file."""
    files: Dict[str, dict] = dataclasses.field(default_factory=dict)
    """path -> {"counts": {kind: n}, "locations": ["path:N: kind (detail)"]}."""

    def add(self, path: str, where: Optional[int], kind: str, detail: str = "") -> None:
        loc = f"{path}:{where}" if where is not None else path
        message = f"{loc}: {BAD_KINDS[kind]}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise BadInputError(f"bad input (strict): {message}")
        entry = self.files.setdefault(path, {"counts": {}, "locations": []})
        entry["counts"][kind] = entry["counts"].get(kind, 0) + 1
        if len(entry["locations"]) < self.max_locations:
            entry["locations"].append(message)

    def merge(self, other: dict) -> None:
        for path, entry in other.items():
            mine = self.files.setdefault(path, {"counts": {}, "locations": []})
            for kind, n in entry["counts"].items():
                mine["counts"][kind] = mine["counts"].get(kind, 0) + n
            room = self.max_locations - len(mine["locations"])
            mine["locations"].extend(entry["locations"][: max(room, 0)])

    @property
    def total(self) -> int:
        return sum(sum(e["counts"].values()) for e in self.files.values())

    def report(self) -> str:
        """Human-readable summary, files in sorted order."""
        if not self.files:
            return "bad input: none"
        lines = [f"bad input: {self.total} record(s) skipped in {len(self.files)} file(s)"]
        for path in sorted(self.files):
            e = self.files[path]
            counts = ", ".join(f"{BAD_KINDS[k]}: {n}" for k, n in sorted(e["counts"].items()))
            lines.append(f"  {path}: {counts}")
            lines.extend(f"    {loc}" for loc in e["locations"])
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How documents are read out of the inputs."""

    text_key: str = "text"
    """Field / column holding the document text."""
    lang_key: Optional[str] = None
    """Field / column holding the language (for inputs that mix languages)."""
    lang: Optional[str] = None
    """Language of inputs that carry none (no FineWeb2 folder, no ``lang_key``)."""
    text_mode: str = "blank"
    """Plain text: ``blank`` (documents separated by blank lines) or ``line`` (one per line)."""
    split: str = "train"
    """FineWeb2 split folder / ``DatasetDict`` split to read."""

    def validate(self) -> None:
        """Its own rules (``config_base.from_dict`` and ``check`` run it; the text reader too)."""
        if self.text_mode not in ("blank", "line"):
            raise ConfigError(f"text_mode must be 'blank' or 'line', not {self.text_mode!r}", field="text_mode")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file (or dataset folder) and what is known about it before reading."""

    path: str
    """Absolute path."""
    kind: str
    """``jsonl``, ``parquet``, ``arrow``, ``text`` or ``hf_disk``."""
    lang: Optional[str]
    """Language from the FineWeb2 folder or ``lang``; None when it comes from ``lang_key``."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """A contiguous piece of one source, the unit of work splitting."""

    path: str
    """Absolute path of the source."""
    kind: str
    """Source kind (see ``Source``)."""
    lang: Optional[str]
    """Fixed language, or None (per-record ``lang_key``)."""
    start: int
    """First byte (jsonl), row group (parquet) or row (hf_disk); 0 for whole files."""
    end: int
    """End (exclusive) in the same unit; -1 for whole files."""
    size: int
    """Bytes on disk this segment covers (progress and ETA)."""
    stamp: str
    """File size and mtime: a changed input gets a new identity and is never mistaken for done."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Discovery


def _kind_of(path: str) -> Optional[str]:
    base = path
    for ext in COMPRESSED:
        if base.endswith(ext):
            base = base[: -len(ext)]
    if base.endswith(JSONL_EXTS):
        return "jsonl"
    if base.endswith(TEXT_EXTS):
        return "text"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    return None


def _is_hf_disk(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _fineweb_lang_folders(path: str) -> Optional[List[str]]:
    """Language folders if ``path`` is a FineWeb2 root, its ``data/`` folder or one language folder."""
    if LANG_FOLDER.match(os.path.basename(path.rstrip("/"))):
        return [path]
    root = os.path.join(path, "data") if os.path.isdir(os.path.join(path, "data")) else path
    folders = sorted(
        os.path.join(root, d)
        for d in os.listdir(root)
        if LANG_FOLDER.match(d) and os.path.isdir(os.path.join(root, d))
    )
    return folders or None


def discover(inputs: List[str], opts: ReadOptions, log: BadInputLog) -> List[Source]:
    """Expand input paths into sources, sorted and deduplicated; empty language folders are logged."""
    sources: List[Source] = []
    for raw in inputs:
        path = os.path.abspath(raw)
        if not os.path.exists(path):
            raise InputError(f"input {raw} does not exist")
        if not os.path.isfile(path) and not os.path.isdir(path):  # a FIFO or device would block or never end
            raise InputError(f"input {raw} is neither a regular file nor a folder")
        if os.path.isfile(path):
            kind = _kind_of(path)
            if kind is None:
                raise InputError(
                    f"input {raw}: unsupported file type; expected .jsonl/.json/.ndjson[.gz|.zst], "
                    ".parquet, .arrow or .txt[.gz|.zst]"
                )
            sources.append(Source(path, kind, opts.lang))
        elif _is_hf_disk(path):
            sources.append(Source(path, "hf_disk", opts.lang))
        elif (folders := _fineweb_lang_folders(path)) is not None:
            for folder in folders:
                lang = os.path.basename(folder)
                split_dir = os.path.join(folder, opts.split)
                files = (
                    sorted(f for f in os.listdir(split_dir) if f.endswith(".parquet"))
                    if os.path.isdir(split_dir) else []
                )
                if not files:
                    log.add(split_dir, None, "empty_language_folder", f"no *.parquet in {opts.split}/")
                sources.extend(Source(os.path.join(split_dir, f), "parquet", lang) for f in files)
        else:
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                             if _kind_of(f) and os.path.isfile(os.path.join(dirpath, f)))
            if not found:
                raise InputError(f"input folder {raw} holds no supported files (jsonl, parquet, arrow, txt)")
            sources.extend(Source(f, _kind_of(f), opts.lang) for f in found)
    unique = {}
    for s in sources:  # one file reached twice (a symlink, overlapping inputs) is read once
        unique.setdefault(os.path.realpath(s.path), s)
    out = sorted(unique.values(), key=lambda s: s.path)
    for s in out:
        if s.lang is None and opts.lang_key is None:
            raise InputError(
                f"cannot tell the language of {s.path}: set read.lang for single-language inputs or "
                "read.lang_key for inputs with a language column (FineWeb2 folders name it themselves)",
                field="read.lang",
            )
        if s.lang is not None and not valid_lang(s.lang):
            raise InputError(f"language {s.lang!r} is not a usable folder name (letters, digits, _ - @ . +, "
                             f"no leading dot, at most 64 characters; not {', '.join(sorted(RESERVED_LANGS))})")
    return out


def plan_segments(sources: List[Source], chunk_bytes: int, opts: ReadOptions, log: BadInputLog) -> List[Segment]:
    """Split sources into segments of about ``chunk_bytes``; unreadable Parquet/datasets are logged."""
    segments: List[Segment] = []
    for s in sources:
        try:
            st = os.stat(s.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
            if s.kind == "jsonl" and not s.path.endswith(COMPRESSED) and st.st_size > chunk_bytes:
                for a in range(0, st.st_size, chunk_bytes):
                    b = min(a + chunk_bytes, st.st_size)
                    segments.append(Segment(s.path, s.kind, s.lang, a, b, b - a, stamp))
            elif s.kind == "parquet":
                segments.extend(_parquet_segments(s, chunk_bytes, stamp))
            elif s.kind == "hf_disk":
                segments.extend(_hf_disk_segments(s, chunk_bytes, opts.split))
            else:
                segments.append(Segment(s.path, s.kind, s.lang, 0, -1, st.st_size, stamp))
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            log.add(s.path, None, "unreadable_file", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return segments


def _parquet_segments(s: Source, chunk_bytes: int, stamp: str) -> List[Segment]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(s.path).metadata
    sizes = [
        sum(meta.row_group(i).column(j).total_compressed_size for j in range(meta.num_columns))
        for i in range(meta.num_row_groups)
    ]
    out, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= chunk_bytes or i == len(sizes) - 1:
            out.append(Segment(s.path, s.kind, s.lang, start, i + 1, acc, stamp))
            start, acc = i + 1, 0
    return out


def _load_hf_disk(path: str, split: str):
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path} is a Hugging Face datasets folder: pip install 'datasets>=2.16'") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{path} has splits {sorted(ds)}; set read.split to one of them", field="read.split")
        ds = ds[split]
    return ds


def _hf_disk_segments(s: Source, chunk_bytes: int, split: str) -> List[Segment]:
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(s.path) for f in fs if f.endswith(".arrow") or f.endswith(".json")
    )
    stamp = ";".join(f"{os.path.relpath(f, s.path)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
    total_bytes = sum(os.stat(f).st_size for f in files if f.endswith(".arrow"))
    rows = _load_hf_disk(s.path, split).num_rows  # all splits' bytes: a rough rows-per-chunk bound
    per = max(1, rows * chunk_bytes // max(total_bytes, 1))
    return [
        Segment(s.path, s.kind, s.lang, a, min(a + per, rows), total_bytes * (min(a + per, rows) - a) // max(rows, 1), stamp)
        for a in range(0, rows, per)
    ] or [Segment(s.path, s.kind, s.lang, 0, 0, 0, stamp)]


# ----------------------------------------------------------------------------------------------
# Reading


ProgressFn = Callable[[int], None]  # called with on-disk bytes consumed since the last call
Record = Tuple[str, str]  # (language, text)


def read_segment(seg: Segment, opts: ReadOptions, log: BadInputLog, progress: ProgressFn) -> Iterator[Record]:
    """The valid documents of one segment, in file order; bad records go to ``log``."""
    try:
        if seg.kind == "jsonl":
            yield from _read_jsonl(seg, opts, log, progress)
        elif seg.kind == "text":
            yield from _read_text(seg, opts, log, progress)
        else:
            yield from _read_columnar(seg, opts, log, progress)
    except ConfigError:  # a refusal (bad input under strict, options that cannot work): not a damaged stream
        raise
    except (OSError, EOFError, ValueError, UnicodeError) as e:
        # A corrupt stream (truncated gzip, bad zstd frame, broken parquet page): keep what was read.
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.add(seg.path, None, "unreadable_file", detail)


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb", buffering=1 << 20)


class _LineCounter:
    """1-based line numbers for a byte range that starts mid-file, computed only when needed
    (a bad line): counting newlines before the range costs a read of that prefix."""

    def __init__(self, path: str, start: int) -> None:
        self.path, self.start, self._base = path, start, None

    def line(self, lines_in_range: int) -> int:
        if self._base is None:
            self._base = 0
            if self.start > 0:
                with open(self.path, "rb") as f:
                    left = self.start
                    while left > 0:
                        block = f.read(min(left, 1 << 24))
                        self._base += block.count(b"\n")
                        left -= len(block)
        return self._base + lines_in_range


def _lines(seg: Segment, progress: ProgressFn) -> Iterator[Tuple[int, bytes]]:
    """(index within the segment, raw line) for the lines whose first byte lies in the segment.

    Progress is reported in on-disk bytes: as the read advances for plain files, at the end for
    compressed ones (their on-disk position is not known while decompressing)."""
    compressed = seg.path.endswith(COMPRESSED)
    base = max(seg.start, 0)
    with _open_binary(seg.path) as f:
        pos = 0
        if seg.end >= 0 and seg.start > 0:
            f.seek(seg.start - 1)
            pos = seg.start - 1 + len(f.readline())  # finish the line the previous segment owns
        reported = pos if not compressed else base
        for i, line in enumerate(f):
            if seg.end >= 0 and pos >= seg.end:
                break
            pos += len(line)
            yield i, line
            if not compressed and pos - reported >= 1 << 20:
                progress(pos - reported)
                reported = pos
    progress(max(seg.size - (reported - base), 0))


def _problem(obj, opts: ReadOptions, fixed_lang: Optional[str]) -> Tuple[Optional[str], str, Optional[Record]]:
    """(bad kind, detail, None) for a bad record, (None, "", (lang, text)) for a good one."""
    if not isinstance(obj, dict):
        return "malformed_json", f"a JSON {type(obj).__name__}, not an object", None
    text = obj.get(opts.text_key)
    if text is None:
        return "missing_text", f"no {opts.text_key!r} field", None
    return _check_text(text, obj.get(opts.lang_key) if opts.lang_key else None, fixed_lang)


def _check_text(text, lang, fixed_lang: Optional[str]) -> Tuple[Optional[str], str, Optional[Record]]:
    if not isinstance(text, str):
        return "non_string_text", f"got a {type(text).__name__}", None
    if not text.strip():
        return "empty_text", "", None
    if fixed_lang is None:
        if not valid_lang(lang):
            return "missing_language", f"got {lang!r}", None
        fixed_lang = lang
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from \\ud800-style JSON escapes
        return "invalid_utf8", str(e), None
    return None, "", (fixed_lang, text)


def _read_jsonl(seg: Segment, opts: ReadOptions, log: BadInputLog, progress: ProgressFn) -> Iterator[Record]:
    lines = _LineCounter(seg.path, max(seg.start, 0))
    for i, raw in _lines(seg, progress):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            log.add(seg.path, lines.line(i + 1), "invalid_utf8", f"byte {e.start} of the line")
            continue
        except json.JSONDecodeError as e:
            log.add(seg.path, lines.line(i + 1), "malformed_json", e.msg)
            continue
        kind, detail, rec = _problem(obj, opts, seg.lang)
        if kind is not None:
            log.add(seg.path, lines.line(i + 1), kind, detail)
        else:
            yield rec


def _read_text(seg: Segment, opts: ReadOptions, log: BadInputLog, progress: ProgressFn) -> Iterator[Record]:
    opts.validate()  # text_mode, for a caller that built ReadOptions in Python
    block: List[str] = []
    block_bad = False  # a block with an undecodable line is dropped whole
    for i, raw in _lines(seg, progress):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            log.add(seg.path, i + 1, "invalid_utf8", f"byte {e.start} of the line")
            line, block_bad = "", True
            if opts.text_mode == "line":
                continue
        if opts.text_mode == "line":
            if line.strip():
                yield seg.lang, line.rstrip("\r\n")
            continue
        if line.strip():
            block.append(line)
        elif block or block_bad:
            if block and not block_bad:
                yield seg.lang, "".join(block).rstrip("\r\n")
            block, block_bad = [], False
    if block and not block_bad:
        yield seg.lang, "".join(block).rstrip("\r\n")


def _column_batches(seg: Segment, opts: ReadOptions, columns: List[str]):
    """(first 0-based row, pyarrow Table/RecordBatch, on-disk bytes) for the segment's rows."""
    if seg.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(seg.path)
        meta = pf.metadata
        row = sum(meta.row_group(i).num_rows for i in range(seg.start))
        names = set(pf.schema_arrow.names)
        cols = [c for c in columns if c in names]
        for rg in range(seg.start, seg.end):
            rg_rows = meta.row_group(rg).num_rows
            rg_size = sum(meta.row_group(rg).column(j).total_compressed_size for j in range(meta.num_columns))
            for batch in pf.iter_batches(batch_size=2048, row_groups=[rg], columns=cols):
                yield row, batch, rg_size * batch.num_rows // max(rg_rows, 1)
                row += batch.num_rows
    elif seg.kind == "arrow":
        import pyarrow as pa

        source = pa.memory_map(seg.path)
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source = pa.memory_map(seg.path)
            reader = pa.ipc.open_file(source)
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        row = 0
        for batch in reader:
            yield row, batch, batch.nbytes
            row += batch.num_rows
    else:  # hf_disk
        ds = _load_hf_disk(seg.path, opts.split)
        cols = [c for c in columns if c in ds.column_names]
        ds = ds.select_columns(cols).with_format("arrow")
        step = 2048
        for a in range(seg.start, seg.end, step):
            table = ds[a : min(a + step, seg.end)]
            yield a, table, seg.size * table.num_rows // max(seg.end - seg.start, 1)


def _read_columnar(seg: Segment, opts: ReadOptions, log: BadInputLog, progress: ProgressFn) -> Iterator[Record]:
    import pyarrow as pa

    wanted = [opts.text_key] + ([opts.lang_key] if opts.lang_key and seg.lang is None else [])
    for row, batch, disk in _column_batches(seg, opts, wanted):
        names = batch.schema.names
        if opts.text_key not in names:
            for r in range(batch.num_rows):
                log.add(seg.path, row + r + 1, "missing_text", f"no {opts.text_key!r} column")
            progress(disk)
            continue
        col = batch.column(names.index(opts.text_key))
        is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        texts = col.to_pylist()
        langs = (
            batch.column(names.index(opts.lang_key)).to_pylist()
            if len(wanted) > 1 and opts.lang_key in names
            else [None] * len(texts)
        )
        for r, (text, lang) in enumerate(zip(texts, langs)):
            where = row + r + 1
            if text is None:
                log.add(seg.path, where, "missing_text", "null")
            elif not is_text:
                log.add(seg.path, where, "non_string_text", f"column type {col.type}")
            else:
                kind, detail, rec = _check_text(text, lang, seg.lang)
                if kind is not None:
                    log.add(seg.path, where, kind, detail)
                else:
                    yield rec
        progress(disk)
