"""Which documents are held out: the content hash, the rule, the ``holdout_docs`` selection and its checks.

A document is chosen by the sha256 of its normalised text (:func:`normalize_text`: NFC, whitespace runs
as one space, stripped), a property of the text alone. ``holdout_fraction`` f holds out a document iff
its hash, read as a number in [0, 1), is below f. ``holdout_docs`` N holds out, per language, the texts
of the N smallest hashes whose documents (every copy counted) fit in min(N, half of the language's
documents), chosen from the units' candidates (:func:`select_heldout`; the pass that gathers them is
``holdout_scan.py``). Every copy of a held-out text is held out, in every language it appears in, so a
duplicate never leaks it into training; a language that would so lose more than half of its documents
is an error naming it. Pure functions: no files, no processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import unicodedata
from typing import Dict, List, Optional

from megatron_mmbert.data.preprocess.errors import PreprocessError

HASH_RULE = "sha256(NFC, whitespace runs as one space, stripped)"
"""How a document's text is normalised before hashing (recorded in the unit fingerprint): near-duplicates
that differ only in Unicode composition or whitespace (a trailing newline, CRLF, doubled spaces) hash alike,
so no copy of a held-out text trains."""


def normalize_text(text: str) -> str:
    """The text the held-out hash is taken of: Unicode NFC, every run of whitespace (``str.split``'s
    definition) replaced by one space, none at either end. Case and punctuation are kept."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def doc_hash(text: str) -> str:
    """What selects held-out documents: the sha256 (hex) of the document's normalised UTF-8 text."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class HoldoutRule:
    """Which documents are held out: a hash below ``fraction`` (as a number in [0, 1)), or one of ``hashes``
    (whatever the document's language: a text held out in one language is held out in every language)."""

    fraction: float = 0.0
    hashes: Optional[frozenset] = None
    """The selected hashes (``holdout_docs``), the union over languages."""

    def held_out(self, lang: str, digest: str) -> bool:
        if self.hashes is not None:
            return digest in self.hashes
        return self.fraction > 0 and int(digest[:16], 16) < self.fraction * (1 << 64)


def select_heldout(candidates: Dict[str, Dict[str, int]], documents: Dict[str, int], holdout_docs: int
                   ) -> Dict[str, List[str]]:
    """language -> its held-out hashes: the smallest of its candidate texts (hash -> documents) whose
    documents fit in ``min(holdout_docs, documents // 2)``. The cap counts documents, every copy of a
    text included, so training keeps at least half of every language. Then every selected text is held
    out in every language it appears in; a language that would so lose more than half of its documents
    is an error naming it."""
    selection: Dict[str, List[str]] = {}
    for lang, counts in sorted(candidates.items()):
        cap, taken, chosen = min(holdout_docs, documents[lang] // 2), 0, []
        for h in sorted(counts):
            if taken + counts[h] <= cap:
                chosen.append(h)
                taken += counts[h]
        selection[lang] = chosen
    union = {h for hs in selection.values() for h in hs}
    over = []
    for lang, counts in sorted(candidates.items()):
        held = sum(c for h, c in counts.items() if h in union)
        if held * 2 > documents[lang]:
            over.append(f"{lang} ({held} of {documents[lang]})")
    if over:
        raise_over_half(over)
    return selection


def raise_over_half(over: List[str]) -> None:
    raise PreprocessError(
        f"held-out data would take more than half of the documents of {', '.join(over[:10])}"
        f"{' ...' if len(over) > 10 else ''}: a held-out text is held out in every language it appears in, and "
        "these languages share texts with others' held-out selections. Lower holdout_docs / holdout_fraction, "
        "or remove the duplicated texts from the inputs", field="holdout_docs")


def check_heldout_share(markers: List[dict]) -> None:
    """After all units: no language lost more than half of its documents to the held-out split (a text
    held out for another language also counts; with ``holdout_fraction`` a small language can draw it)."""
    train: Dict[str, int] = {}
    held: Dict[str, int] = {}
    for m in markers:
        for lang, sh in m.get("shards", {}).items():
            train[lang] = train.get(lang, 0) + sh["documents"]
        for lang, sh in m.get("heldout", {}).items():
            held[lang] = held.get(lang, 0) + sh["documents"]
    over = [f"{lang} ({n} of {n + train.get(lang, 0)})" for lang, n in sorted(held.items())
            if n > train.get(lang, 0)]
    if over:
        raise_over_half(over)
