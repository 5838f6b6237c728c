"""The released language list of mmBERT, FineWeb2's folder names, and what a manifest covers.

mmBERT's decay phase "Decay-All" trains on 1,833 languages. The released statistics of the
mmBERT repository (github.com/JHU-CLSP/mmBERT, ``statistics/language_counts.csv``, commit
23bec66) list them: one row per bare ISO 639-3 code with the tokens of every phase mixture
(columns ``pretrain, decay-eng, decay-all, decay-mid, ext``), plus the pseudo-language ``code``.
The 1,833 codes with tokens in ``decay-all`` are the released list; the file ships unchanged as
``languages/mmbert_language_counts.csv``.

Manifest keys are FineWeb2 folder names, ``{iso639_3}_{Script}`` (``srp_Cyrl``, ``srp_Latn``):
FineWeb2 keeps scripts apart where mmBERT's statistics collapse them to the code. The map from
folder names to codes is FineWeb2's own language table (github.com/huggingface/fineweb-2,
``fineweb2-language-distribution.csv``, commit d0defb2): its ``train`` subsets (``_removed``
folders excluded) ship as ``languages/fineweb2_subsets.csv`` (subset, code, script, name, words).
Measured from the two files: 1,800 of the 1,833 codes have FineWeb2 folders; 33 do not
(``eng`` -- FineWeb2 has no English, mmBERT's English comes from DCLM and the other English
sources of ``data/mixture.py`` -- and 32 small languages, ``ald`` to ``yas``, absent from that
FineWeb2 table: whether an earlier FineWeb2 revision or another source held them, the released
files do not say); 14 FineWeb2 codes are not in the list (``und`` and 13 others).
:func:`coverage` reports both directions for any manifest.

Any other list can be checked instead (:func:`load_language_list`): a text file of one code (or
folder name) per line, ``#`` comments allowed, or a CSV with a ``language`` (or ``code``) column.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_mmbert.config_base import ConfigError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "languages")
RELEASED_COUNTS = os.path.join(DATA_DIR, "mmbert_language_counts.csv")
"""mmBERT's released ``statistics/language_counts.csv`` (JHU-CLSP/mmBERT, commit 23bec66), unchanged."""
FINEWEB2_SUBSETS = os.path.join(DATA_DIR, "fineweb2_subsets.csv")
"""FineWeb2's train subsets (huggingface/fineweb-2 ``fineweb2-language-distribution.csv``, commit d0defb2)."""
RELEASED_LIST_NAME = "mmbert-1833"
"""The name that selects the released list wherever a language list is asked for."""
CODE = "code"
"""The pseudo-language of the released statistics that counts source code."""

_FOLDER = re.compile(r"^([a-z]{2,3})_([A-Z][a-z]{3})(?:_removed)?$")
_BARE = re.compile(r"^[a-z]{2,3}$")


class LanguageListError(ConfigError):
    """A language list that cannot be read (names the file and what is wrong): a config value refused."""


@lru_cache(maxsize=1)
def released_counts() -> Dict[str, Dict[str, int]]:
    """code -> {phase column -> tokens} of the released statistics (``code`` included)."""
    with open(RELEASED_COUNTS, newline="", encoding="utf-8") as f:
        return {r["language"]: {k: int(v) for k, v in r.items() if k != "language"} for r in csv.DictReader(f)}


def released_languages(column: str = "decay-all") -> List[str]:
    """The codes with tokens in one released mixture column (sorted; ``code`` excluded).

    ``decay-all``: the 1,833 languages; ``ext`` / ``decay-mid`` / ``decay-eng``: the 109 of
    mid-training; ``pretrain``: the 60 of pre-training.
    """
    counts = released_counts()
    if column not in next(iter(counts.values())):
        raise LanguageListError(f"{RELEASED_COUNTS}: no column {column!r}")
    return sorted(c for c, row in counts.items() if row[column] > 0 and c != CODE)


@lru_cache(maxsize=1)
def fineweb2_subsets() -> Dict[str, str]:
    """FineWeb2 folder name (``srp_Cyrl``) -> ISO 639-3 code (``srp``), from FineWeb2's table."""
    with open(FINEWEB2_SUBSETS, newline="", encoding="utf-8") as f:
        return {r["subset"]: r["code"] for r in csv.DictReader(f)}


def fineweb2_folders(code: str) -> List[str]:
    """FineWeb2's folders holding ``code`` (one per script; empty where FineWeb2 has none)."""
    return sorted(s for s, c in fineweb2_subsets().items() if c == code)


def language_code(key: str) -> Optional[str]:
    """The ISO code a manifest key stands for: FineWeb2 folder names (``srp_Latn``, with or without
    ``_removed``) and bare codes map to their code, named sources (``dclm``, ``starcoder``: see
    ``data/mixture.py``) to the language they carry (``eng``, ``code``; None for multilingual
    sources), anything else to None."""
    from megatron_mmbert.data.mixture import SOURCES

    if key in SOURCES:
        return SOURCES[key].language
    if key == CODE:
        return CODE
    known = fineweb2_subsets().get(key)
    if known is not None:
        return known
    m = _FOLDER.match(key)
    if m:
        return m.group(1)
    if _BARE.match(key):
        return key
    return None


def load_language_list(spec: Optional[str]) -> Optional[Tuple[str, List[str]]]:
    """``(description, codes)`` of a language list, or None for ``spec`` ``none``/empty.

    ``spec``: ``mmbert-1833`` (the released list), or a file: one code or folder name per line
    (``#`` comments), or a CSV with a ``language`` or ``code`` column (the released statistics'
    own format: there only codes with tokens in some column count). Folder names become codes.
    """
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    if spec == RELEASED_LIST_NAME:
        return (f"the released mmBERT list ({RELEASED_LIST_NAME}: JHU-CLSP/mmBERT "
                "statistics/language_counts.csv, decay-all)", released_languages("decay-all"))
    if not os.path.isfile(spec):
        raise LanguageListError(
            f"language list {spec!r}: no such file; give {RELEASED_LIST_NAME!r} (the released list), "
            "'none' (no check) or a file of one code per line")
    with open(spec, newline="", encoding="utf-8") as f:
        text = f.read()
    first = text.lstrip().split("\n", 1)[0]
    codes: List[str] = []
    if "," in first:
        rows = list(csv.DictReader(text.splitlines()))
        col = next((c for c in ("language", "code", "subset") if rows and c in rows[0]), None)
        if col is None:
            raise LanguageListError(f"language list {spec}: a CSV needs a 'language' or 'code' column, "
                                    f"got {first.strip()!r}")
        for r in rows:
            numbers = [v for k, v in r.items() if k != col and v not in (None, "")]
            if numbers and all(v.isdigit() for v in numbers) and not any(int(v) for v in numbers):
                continue  # a counts table: codes without tokens are not listed languages
            codes.append(r[col].strip())
    else:
        codes = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    out = set()
    for c in codes:
        if not c or c == CODE:
            continue
        code = language_code(c)
        if code is None:
            raise LanguageListError(f"language list {spec}: {c!r} is neither an ISO 639 code nor a "
                                    "FineWeb2 folder name ({iso639_3}_{Script})")
        out.add(code)
    if not out:
        raise LanguageListError(f"language list {spec}: no languages in it")
    return f"{spec} ({len(out)} languages)", sorted(out)


@dataclasses.dataclass
class Coverage:
    """Which languages of a list a manifest holds, lacks, and holds beyond it."""

    list_name: str
    """Where the list came from."""
    listed: int
    """Languages in the list."""
    covered: Dict[str, List[str]]
    """Listed code -> the manifest keys that provide it."""
    missing: List[str]
    """Listed codes no manifest key provides."""
    extra: List[str]
    """Manifest keys whose language is not in the list (unknown keys included)."""
    sources: List[str]
    """Manifest keys that are named sources or ``code`` (not languages of the list)."""

    def format(self, limit: int = 40) -> str:
        """The report: counts, then the missing codes (with the FineWeb2 folders that hold them)
        and the extra keys, cut to ``limit`` names each."""
        lines = [f"language-list coverage against {self.list_name}: {len(self.covered)} of {self.listed} listed "
                 f"languages present, {len(self.missing)} missing, {len(self.extra)} manifest key(s) beyond "
                 f"the list" + (f", {len(self.sources)} named source(s)" if self.sources else "")]
        if self.missing:
            shown = []
            for c in self.missing[:limit]:
                folders = fineweb2_folders(c)
                shown.append(f"{c} ({'/'.join(folders)})" if folders else f"{c} (no FineWeb2 folder)")
            more = f" ... and {len(self.missing) - limit} more" if len(self.missing) > limit else ""
            lines.append("  missing: " + ", ".join(shown) + more)
        if self.extra:
            more = f" ... and {len(self.extra) - limit} more" if len(self.extra) > limit else ""
            lines.append("  beyond the list: " + ", ".join(self.extra[:limit]) + more)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"list": self.list_name, "listed": self.listed, "covered": len(self.covered),
                "missing": self.missing, "extra": self.extra, "sources": self.sources}


def coverage(keys: Iterable[str], listed: Sequence[str], list_name: str = "the list") -> Coverage:
    """How the manifest ``keys`` cover the ``listed`` codes (both directions, see :class:`Coverage`)."""
    from megatron_mmbert.data.mixture import SOURCES

    want = set(listed)
    covered: Dict[str, List[str]] = {}
    extra, sources = [], []
    for key in sorted(keys):
        code = language_code(key)
        if key in SOURCES or key == CODE:
            sources.append(key)
        if code is not None and code in want:
            covered.setdefault(code, []).append(key)
        elif key not in SOURCES and key != CODE:
            extra.append(key)
    return Coverage(list_name=list_name, listed=len(want), covered=covered,
                    missing=sorted(want - set(covered)), extra=extra, sources=sources)


def manifest_coverage(manifest, spec: Optional[str] = RELEASED_LIST_NAME) -> Optional[Coverage]:
    """The coverage of a loaded manifest's languages (those with tokens) against the list ``spec``
    (see :func:`load_language_list`); None when ``spec`` is ``none``."""
    loaded = load_language_list(spec)
    if loaded is None:
        return None
    name, codes = loaded
    keys = [k for k, e in manifest.languages.items() if e.tokens > 0]
    return coverage(keys, codes, name)


__all__ = [
    "RELEASED_COUNTS",
    "FINEWEB2_SUBSETS",
    "RELEASED_LIST_NAME",
    "LanguageListError",
    "released_counts",
    "released_languages",
    "fineweb2_subsets",
    "fineweb2_folders",
    "language_code",
    "load_language_list",
    "Coverage",
    "coverage",
    "manifest_coverage",
]
