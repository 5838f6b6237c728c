"""Named data sources beside the languages, and mmBERT's released mixture of them per phase.

mmBERT does not pre-train on FineWeb2 alone: FineWeb2 (no English) is ~60% of pre-training, and
English, code and reference text come from named sources -- DCLM, StarCoder, ArXiv,
StackExchange, Tulu Flan, Dolmino math, PeS2o, MegaWika, books -- each with a fixed share per
phase. Here each source is a manifest entry of its own (preprocess it into the key ``dclm``,
``starcoder``, ...; docs/data.md "Named sources" says how, from its public dataset), and a
phase gives it a fixed share (``PhaseConfig.fixed_shares``); the FineWeb2 languages share the
rest by temperature.

The released numbers (token counts per source, billions):

* **Pre-training**: the ``jhu-clsp/mmBERT-pretrain-p3-others`` dataset card (Hugging Face):
  FineWeb2 1,196.6B, DCLM 600.0B, StarCoder 100.6B, ArXiv 27.8B, StackExchange 18.6B, Tulu Flan
  15.3B, Dolmino math 11.2B, PeS2o 8.4B, Wikipedia/MegaWika 4.7B, books 4.3B. Shares are these over
  the pre-training total of the released statistics (JHU-CLSP/mmBERT
  ``statistics/language_counts.csv``, column ``pretrain``: 1,989.0B); the ~1.5B (0.08%) the card's
  table does not itemise (a StackExchange-from-Dolmino line) stays with the FineWeb2 languages.
* **Decay-Cont** (the 110-language decay): the ``jhu-clsp/mmBERT-decay-data`` card: FineWeb2 78.5B,
  MegaWika 9.5B, ArXiv 3.3B, ProLong textbooks 3.1B, ProLong code 2.8B, books 2.2B, DCLM (Dolmino)
  2.0B, Tulu Flan 1.0B, StarCoder 0.5B, Dolmino math 0.5B, over the ``decay-mid`` total 103.3B.
* **Mid-training, Decay-Eng, Decay-All**: no per-source table is released. The released
  statistics give only the English and code totals (``eng``: 12.1%, 17.9%, 10.2%; ``code``: 3.3%,
  3.1%, 5.5%). The shipped configs give the English share to ``dclm`` and the code share to
  ``starcoder`` (a deviation, listed in docs/training.md).

:func:`check_sources` stops a run at start-up when its manifest lacks a source a phase names
(naming the source and its public dataset); ``data.without_sources`` in the run config is the
explicit override, which removes those shares from every phase (:func:`drop_sources`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence

from megatron_mmbert.config_base import ConfigError


@dataclasses.dataclass(frozen=True)
class Source:
    """A named data source: what it is, where its public dataset is, how to read it."""

    name: str
    """Manifest key (``dclm``)."""
    language: Optional[str]
    """ISO 639-3 code of its text (``eng``), ``code`` for source code, None if multilingual."""
    dataset: str
    """The public dataset to preprocess (Hugging Face id and subset)."""
    text_key: str
    """Field / column holding the text (``--read.text_key``)."""
    notes: str = ""
    """What to know when preprocessing it."""


SOURCES: Dict[str, Source] = {s.name: s for s in [
    Source("dclm", "eng", "mlfoundations/dclm-baseline-1.0 (pre-training); allenai/dolmino-mix-1124 "
           "'dclm' (filtered DCLM, mid-training and decay)", "text",
           "JSONL.zst shards; the largest source (600B tokens in pre-training)"),
    Source("starcoder", "code", "bigcode/starcoderdata (one folder per programming language)", "content",
           "Parquet; the text column is 'content', not 'text'"),
    Source("arxiv", "eng", "allenai/dolma, subset 'arxiv' (RedPajama ArXiv)", "text", "Dolma JSONL.gz"),
    Source("stackexchange", "eng", "allenai/dolma, subset 'stackexchange' (RedPajama StackExchange)", "text",
           "Dolma JSONL.gz"),
    Source("tulu_flan", "eng", "allenai/dolmino-mix-1124, subset 'flan' (Tulu Flan)", "text", "JSONL.gz"),
    Source("dolmino_math", "eng", "allenai/dolmino-mix-1124, subset 'math'", "text", "JSONL.gz"),
    Source("pes2o", "eng", "allenai/peS2o (Dolma 'pes2o')", "text", "JSONL.gz"),
    Source("megawika", None, "jhu-clsp/megawika-2 (Wikipedia articles, 50 languages)", "text",
           "ISO 639-1 language codes; one source key for all of its languages"),
    Source("books", "eng", "allenai/dolma, subset 'books' (Project Gutenberg)", "text", "Dolma JSONL.gz"),
    Source("prolong_textbooks", "eng", "princeton-nlp/prolong-data-64K, subset 'textbooks'", "input_ids",
           "MDS shards already tokenized with the Llama-3 tokenizer: decode to text first"),
    Source("prolong_code", "code", "princeton-nlp/prolong-data-64K, subset "
           "'thestackv1_concat_by_repo-65536'", "input_ids",
           "MDS shards already tokenized with the Llama-3 tokenizer: decode to text first"),
]}
"""The named sources of mmBERT's mixtures (arXiv 2509.06888 and the dataset cards cited above)."""


@dataclasses.dataclass(frozen=True)
class ReleasedMixture:
    """One phase's released source mixture."""

    phase: str
    """``pretrain``, ``mid``, ``decay_cont``, ``decay_eng`` or ``decay_all``."""
    total_tokens: int
    """The phase mixture's total tokens (the released statistics' column total)."""
    source_billions: Dict[str, float]
    """Source -> tokens (billions) as released."""
    citation: str
    """Where the numbers are published."""

    def shares(self, digits: int = 4) -> Dict[str, float]:
        """Source -> share of the phase's tokens, rounded to ``digits`` (what the configs carry)."""
        return {s: round(b * 1e9 / self.total_tokens, digits) for s, b in self.source_billions.items()}


_STATS = "JHU-CLSP/mmBERT statistics/language_counts.csv"
RELEASED_MIXTURES: Dict[str, ReleasedMixture] = {m.phase: m for m in [
    ReleasedMixture("pretrain", 1_989_020_158_322, {
        "dclm": 600.0, "starcoder": 100.6, "arxiv": 27.8, "stackexchange": 18.6, "tulu_flan": 15.3,
        "dolmino_math": 11.2, "pes2o": 8.4, "megawika": 4.7, "books": 4.3},
        f"jhu-clsp/mmBERT-pretrain-p3-others dataset card; total: {_STATS} (pretrain)"),
    ReleasedMixture("decay_cont", 103_308_072_307, {
        "megawika": 9.5, "arxiv": 3.3, "prolong_textbooks": 3.1, "prolong_code": 2.8, "books": 2.2,
        "dclm": 2.0, "tulu_flan": 1.0, "starcoder": 0.5, "dolmino_math": 0.5},
        f"jhu-clsp/mmBERT-decay-data dataset card; total: {_STATS} (decay-mid)"),
    # No per-source tables: English -> dclm, code -> starcoder (the statistics' eng / code rows).
    ReleasedMixture("mid", 600_815_468_128, {"dclm": 72.961332002, "starcoder": 19.985806557},
                    f"{_STATS} (ext: eng and code)"),
    ReleasedMixture("decay_eng", 104_398_382_373, {"dclm": 18.672161190, "starcoder": 3.258637340},
                    f"{_STATS} (decay-eng: eng and code)"),
    ReleasedMixture("decay_all", 114_226_161_784, {"dclm": 11.593552336, "starcoder": 6.292766328},
                    f"{_STATS} (decay-all: eng and code)"),
]}
"""mmBERT's released mixtures by phase (module docstring)."""


def named_sources(phases: Sequence) -> List[str]:
    """The registered sources the phases name (in ``fixed_shares`` or ``languages``), sorted."""
    names = set()
    for p in phases:
        names.update(n for n in p.fixed_shares if n in SOURCES)
        if isinstance(p.languages, (list, tuple)):
            names.update(n for n in p.languages if n in SOURCES)
    return sorted(names)


def drop_sources(phases: Sequence, without: Iterable[str]) -> None:
    """Train without the sources ``without``: remove them from every phase's ``fixed_shares`` and
    language list (the FineWeb2 languages then share their mass by temperature). Every name must
    be a registered source or one some phase gives a share, so a misspelt override is an error, not a
    silent no-op (a resolved config, already without them, loads again)."""
    without = list(without)
    named = {n for p in phases for n in p.fixed_shares}
    unknown = [n for n in without if n not in named and n not in SOURCES]
    if unknown:
        raise ConfigError(f"data.without_sources names {unknown}, which no phase's fixed_shares names "
                          f"(they name {sorted(named) or 'nothing'})", field="data.without_sources")
    for p in phases:
        for n in without:
            p.fixed_shares.pop(n, None)
        if isinstance(p.languages, list):
            p.languages = [n for n in p.languages if n not in without]


def check_sources(phases: Sequence, have: Iterable[str], manifest_path: str = "the manifest") -> None:
    """Stop when a phase gives a named source a share and the manifest (``have``: keys with tokens)
    lacks it: the error names the source, its public dataset and the override."""
    have = set(have)
    for p in phases:
        missing = [n for n in p.fixed_shares if n in SOURCES and n not in have]
        if missing:
            lines = [f"  {n}: {SOURCES[n].dataset} (text field {SOURCES[n].text_key!r}; {SOURCES[n].notes})"
                     for n in missing]
            raise ConfigError(
                f"phase {p.name!r} gives the named source(s) {missing} a share "
                f"({', '.join(f'{n} {p.fixed_shares[n]:g}' for n in missing)}) but {manifest_path} has no "
                "such key. Preprocess each into the manifest under that key (docs/data.md \"Named sources\"):\n"
                + "\n".join(lines)
                + f"\nor train without them on purpose: data.without_sources: {missing} (their shares go to "
                "the other languages by temperature)", field="data.without_sources")


__all__ = ["Source", "SOURCES", "ReleasedMixture", "RELEASED_MIXTURES", "named_sources", "drop_sources",
           "check_sources"]
