"""An offline multilingual demo corpus from the gettext catalogs in ``/usr/share/locale``.

Debian/Ubuntu images carry ``*.mo`` translation catalogs for about 150 languages in roughly 30
scripts, with a realistic skew (megabytes for French, tens of characters for some). This module turns
them into the FineWeb2 layout (``OUT/data/{lang}_{Script}/train/000.parquet``, column ``text``) and
trains a small tokenizer on the result, so the whole pipeline can be exercised without network.

The text is UI strings (menus, errors, ``--help``), GPL/LGPL licensed: it is built at run time and
never committed. It is plumbing data (language buckets, skew, scripts), not prose for model quality.

Locale codes map to ``{iso639_3}_{Script}`` keys as FineWeb2 names them: ISO 639-1 -> 639-3 via
``/usr/share/iso-codes/json/iso_639-3.json``, macrolanguages to the individual codes FineWeb2 uses
(``zh`` -> ``cmn_Hani``, ``ar`` -> ``arb_Arab``...), scripts from a small table (default Latn) and the
locale's ``@modifier``. Codes the tables do not know keep a deterministic fallback ``{code}_Zzzz``.
"""

from __future__ import annotations

import logging
import dataclasses
import json
import os
import re
import struct
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_mmbert.fileio import atomic_write_json, atomic_write_with

logger = logging.getLogger(__name__)

LOCALE_DIR = "/usr/share/locale"
ISO_639_3_JSON = "/usr/share/iso-codes/json/iso_639-3.json"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # mmBERT's order: ids 0..4

# FineWeb2 keeps individual languages where ISO has a macrolanguage (FineWeb2 dataset card, HuggingFaceFW/fineweb-2).
_INDIVIDUAL = {
    "ara": "arb", "zho": "cmn", "msa": "zsm", "est": "ekk", "lav": "lvs", "swa": "swh", "aze": "azj",
    "uzb": "uzn", "mon": "khk", "nep": "npi", "pus": "pbt", "nor": "nob", "sqi": "als", "yid": "ydd",
    "ori": "ory", "kur": "kmr", "mlg": "plt", "kom": "kpv", "kok": "gom",
}
# Locales whose country part changes the language or script.
_LOCALE_OVERRIDES = {"az_IR": "azb_Arab", "pa_PK": "pnb_Arab"}
_MODIFIER_SCRIPTS = {"latin": "Latn", "Latn": "Latn", "iqtelif": "Latn", "cyrillic": "Cyrl", "shaw": "Shaw"}
_SKIP_MODIFIERS = {"quot", "boldquot"}  # artificial English variants (quotes rewritten)
_SCRIPTS = {}
for _script, _codes in {
    "Cyrl": "rus ukr bel bul mkd srp kaz kir tgk khk tat bak chv oss abk che kpv mhr udm sah ava",
    "Arab": "arb fas urd pbt uig snd ckb kas azb pnb",
    "Ethi": "amh tir gez byn tig wal",
    "Deva": "hin mar npi san gom mai bho doi brx",
    "Beng": "ben asm",
    "Hebr": "heb ydd",
    "Gujr": "guj", "Guru": "pan", "Orya": "ory", "Sinh": "sin", "Khmr": "khm", "Jpan": "jpn",
    "Hang": "kor", "Thaa": "div", "Mymr": "mya", "Cher": "chr", "Knda": "kan", "Telu": "tel",
    "Grek": "ell", "Tibt": "bod dzo", "Taml": "tam", "Laoo": "lao", "Thai": "tha", "Geor": "kat",
    "Mlym": "mal", "Hani": "cmn", "Cans": "iku", "Armn": "hye", "Tfng": "tzm",
}.items():
    for _c in _codes.split():
        _SCRIPTS[_c] = _script


class DemoCorpusError(RuntimeError):
    """The catalogs are missing or unusable; the message says how to get them."""


def _iso_tables() -> Tuple[Dict[str, str], set]:
    """(ISO 639-1 -> 639-3, set of 639-3 codes) from iso-codes, or from pycountry if installed."""
    path = ISO_639_3_JSON
    if not os.path.isfile(path):
        try:
            import pycountry

            path = os.path.join(os.path.dirname(pycountry.__file__), "databases", "iso639-3.json")
        except ImportError:
            raise DemoCorpusError(
                f"{ISO_639_3_JSON} is missing: apt-get install -y iso-codes (or pip install pycountry)"
            ) from None
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["639-3"]
    two = {e["alpha_2"]: e["alpha_3"] for e in entries if "alpha_2" in e}
    return two, {e["alpha_3"] for e in entries}


def locale_to_key(locale: str, tables=None) -> Optional[str]:
    """``fr`` -> ``fra_Latn``, ``sr@latin`` -> ``srp_Latn``, ``zh_TW`` -> ``cmn_Hani``; None to skip.

    Unknown codes give ``{code}_Zzzz`` (ISO 15924 "unknown script"), deterministic and visible.
    """
    two_to_three, known = tables or _iso_tables()
    m = re.fullmatch(r"([a-z]{2,3})(?:_([A-Za-z]{2,4}))?(?:\.[^@]*)?(?:@(\w+))?", locale)
    if not m:
        return None
    lang, region, modifier = m.groups()
    if modifier in _SKIP_MODIFIERS:
        return None
    if region and f"{lang}_{region}" in _LOCALE_OVERRIDES:
        return _LOCALE_OVERRIDES[f"{lang}_{region}"]
    code = two_to_three.get(lang, lang if len(lang) == 3 else None)
    if code is None or code not in known:
        return f"{lang}_Zzzz"
    code = _INDIVIDUAL.get(code, code)
    script = _MODIFIER_SCRIPTS.get(modifier or "", _SCRIPTS.get(code, "Latn"))
    return f"{code}_{script}"


def read_mo(path: str) -> List[Tuple[str, str]]:
    """(msgid, msgstr) pairs of a GNU ``.mo`` file, decoded with the charset its header declares.

    Plural forms become one pair per form; message contexts are dropped from the msgid. Messages
    that do not decode are skipped (some catalogs mislabel their charset).
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 28:
        raise ValueError(f"{path}: too short for a .mo file")
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if endian is None:
        raise ValueError(f"{path}: not a GNU .mo file (magic {magic:#x})")
    _, count, orig_off, trans_off = struct.unpack_from(endian + "4I", data, 4)
    raw = []
    for i in range(count):
        olen, opos = struct.unpack_from(endian + "2I", data, orig_off + 8 * i)
        tlen, tpos = struct.unpack_from(endian + "2I", data, trans_off + 8 * i)
        raw.append((data[opos : opos + olen], data[tpos : tpos + tlen]))
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            m = re.search(rb"charset=([A-Za-z0-9_.:-]+)", msgstr)
            if m and m.group(1).lower() not in (b"charset", b"cset"):
                charset = m.group(1).decode("ascii")
    try:
        "".encode(charset)
    except LookupError:
        charset = "utf-8"
    pairs = []
    for msgid, msgstr in raw:
        if msgid == b"" or not msgstr:
            continue
        msgid = msgid.split(b"\x04", 1)[-1].split(b"\x00", 1)[0]
        for form in msgstr.split(b"\x00"):
            try:
                pairs.append((msgid.decode(charset), form.decode(charset)))
            except UnicodeDecodeError:
                continue
    return pairs


@dataclasses.dataclass
class DemoCorpusOptions:
    """What to extract from the catalogs."""

    locale_dir: str = LOCALE_DIR
    """Folder with ``{locale}/LC_MESSAGES/*.mo``."""
    languages: Optional[Sequence[str]] = None
    """Only these ``{iso639_3}_{Script}`` keys (None: all)."""
    doc_chars: int = 1500
    """A document is closed once it holds this many characters (messages of one catalog, one per line)."""
    max_chars_per_language: Optional[int] = None
    """Stop a language after this many characters (keeps test corpora small)."""
    min_chars_per_language: int = 1
    """Languages with less text are left out."""
    include_iso_codes: bool = True
    """Include the iso-codes catalogs (country/language names: the only text for some languages)."""
    row_group_docs: int = 256
    """Parquet row-group size in documents (preprocessing splits big files at row groups)."""


@dataclasses.dataclass
class LanguageStats:
    """What was written for one language."""

    documents: int
    """Documents (parquet rows)."""
    chars: int
    """Characters of text."""
    locales: List[str]
    """Locale folders that contributed."""


def _catalogs(opts: DemoCorpusOptions) -> Dict[str, List[Tuple[str, str]]]:
    """Language key -> [(locale, .mo path)], deduplicated by real path, in sorted order."""
    if not os.path.isdir(opts.locale_dir):
        raise DemoCorpusError(_missing_message(opts.locale_dir))
    tables = _iso_tables()
    seen = set()
    out: Dict[str, List[Tuple[str, str]]] = {}
    for locale in sorted(os.listdir(opts.locale_dir)):
        folder = os.path.join(opts.locale_dir, locale, "LC_MESSAGES")
        if not os.path.isdir(folder):
            continue
        key = locale_to_key(locale, tables)
        if key is None or (opts.languages is not None and key not in opts.languages):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".mo") or (not opts.include_iso_codes and name.startswith("iso_")):
                continue
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen:
                continue
            seen.add(real)
            out.setdefault(key, []).append((locale, real))
    if not out:
        raise DemoCorpusError(_missing_message(opts.locale_dir))
    return out


def _missing_message(locale_dir: str) -> str:
    return (
        f"no gettext catalogs (*.mo) under {locale_dir}. The demo corpus is built from installed "
        "translations: apt-get install -y iso-codes gettext coreutils libglib2.0-data locales "
        "(and make sure the image does not strip /usr/share/locale, e.g. a dpkg path-exclude rule)"
    )


def iter_language_documents(paths: List[Tuple[str, str]], opts: DemoCorpusOptions) -> Iterator[str]:
    """Documents of one language: unique translated messages of one catalog, one per line."""
    seen = set()
    for _, path in paths:
        try:
            pairs = read_mo(path)
        except (OSError, ValueError, struct.error) as e:
            logger.warning(f"demo corpus: skipping unreadable catalog {path}: {e}")
            continue
        lines, size = [], 0
        for msgid, msgstr in pairs:
            text = msgstr.strip()
            if not text or text == msgid.strip() or text in seen:
                continue  # untranslated copies of the English msgid are not this language's text
            seen.add(text)
            lines.append(text)
            size += len(text) + 1
            if size >= opts.doc_chars:
                yield "\n".join(lines)
                lines, size = [], 0
        if lines:
            yield "\n".join(lines)


def build_gettext_corpus(out_dir: str, opts: Optional[DemoCorpusOptions] = None) -> Dict[str, LanguageStats]:
    """Write ``out_dir/data/{lang}_{Script}/train/000.parquet`` for every language with text.

    Deterministic: the same catalogs give byte-identical parquet files. Returns per-language stats.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    opts = opts or DemoCorpusOptions()
    stats: Dict[str, LanguageStats] = {}
    for key, paths in sorted(_catalogs(opts).items()):
        docs, chars = [], 0
        for doc in iter_language_documents(paths, opts):
            if opts.max_chars_per_language is not None and chars >= opts.max_chars_per_language:
                break
            docs.append(doc)
            chars += len(doc)
        if chars < max(1, opts.min_chars_per_language):
            continue
        code, script = key.split("_", 1)
        folder = os.path.join(out_dir, "data", key, "train")
        os.makedirs(folder, exist_ok=True)
        table = pa.table({
            "text": docs,
            "id": [f"{key}/{i:07d}" for i in range(len(docs))],
            "language": [code] * len(docs),
            "language_script": [script] * len(docs),
        })
        atomic_write_with(os.path.join(folder, "000.parquet"),
                          lambda tmp: pq.write_table(table, tmp, row_group_size=opts.row_group_docs))
        stats[key] = LanguageStats(len(docs), chars, sorted({loc for loc, _ in paths}))
    return stats


def iter_corpus_texts(corpus_dir: str, max_chars_per_language: Optional[int] = None) -> Iterator[str]:
    """Texts of a FineWeb2-layout corpus, language by language in sorted order (capped per language)."""
    import pyarrow.parquet as pq

    data = os.path.join(corpus_dir, "data")
    for key in sorted(os.listdir(data)):
        folder = os.path.join(data, key, "train")
        chars = 0
        for name in sorted(f for f in os.listdir(folder) if f.endswith(".parquet")):
            for text in pq.read_table(os.path.join(folder, name), columns=["text"]).column("text").to_pylist():
                if max_chars_per_language is not None and chars >= max_chars_per_language:
                    break
                chars += len(text)
                yield text


def train_tokenizer(
    corpus_dir: str,
    out_dir: str,
    vocab_size: int = 4096,
    max_chars_per_language: Optional[int] = 200_000,
) -> str:
    """Train a byte-level BPE on a FineWeb2-layout corpus and save an HF tokenizer folder.

    Byte-level BPE never produces ``<unk>`` whatever the script. Special tokens take ids 0..4 in
    mmBERT's order (``<pad> <eos> <bos> <unk> <mask>``). Capping the text per language keeps training
    fast and stops French and Russian from taking the whole vocabulary. Returns ``out_dir``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(iter_corpus_texts(corpus_dir, max_chars_per_language), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    # AutoTokenizer(text) frames like the preprocessed shards: <bos> ... <eos>.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        mask_token="<mask>",
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    special_map = {f"{r}_token": t for r, t in zip(("pad", "eos", "bos", "unk", "mask"), SPECIAL_TOKENS)}
    path = os.path.join(out_dir, "special_tokens_map.json")
    if not os.path.isfile(path):  # transformers 5 no longer writes it; readers still look for it
        atomic_write_json(path, special_map, indent=2, sort_keys=False)
    return out_dir
