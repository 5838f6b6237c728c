"""Evaluation rows: per language, packed rows of ``seq_len`` tokens masked exactly as training masks
them (``data.mlm.MLMStream``), from a generator keyed by (seed, language) with the row as its
counter. Rows and masks are built on the CPU and depend on nothing else, so every model and every
parallel layout sees the same inputs."""

from __future__ import annotations

import logging
import dataclasses
import hashlib
import os
from typing import Dict, List, Tuple

import numpy as np

from megatron_mmbert.config import PhaseConfig
from megatron_mmbert.config_base import ConfigError

logger = logging.getLogger(__name__)


def load(manifest: str, field: str = "manifest"):
    """The manifest (a ``manifest.json`` or its folder), with a clear error naming ``field`` (the
    option that gave it) when it is not one."""
    from megatron_mmbert.data.shards import load_manifest

    try:
        return load_manifest(os.fspath(manifest))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConfigError(f"{field}={manifest!r}: {exc}", field=field) from None


def resolve_languages(manifest, spec: str) -> List[str]:
    """``all`` / ``top:N`` / ``a,b,c`` over the manifest's languages with tokens, by the schedule's
    own rule (``data.schedule.active_languages``); listed names keep their order."""
    from megatron_mmbert.data.schedule import active_languages

    names = sorted(manifest.languages)
    tokens = np.array([manifest.languages[n].tokens for n in names], dtype=np.int64)
    spec = spec.strip()
    value = spec if spec == "all" or spec.startswith("top:") else [s.strip() for s in spec.split(",") if s.strip()]
    if isinstance(value, str) and value.startswith("top:") and not value[4:].isdigit():
        raise ConfigError(f"languages={spec!r}: top:N needs a whole number N", field="languages")
    if not value:
        raise ConfigError("languages is empty: give 'all', 'top:N' or names separated by commas", field="languages")
    if isinstance(value, list):
        unknown = [n for n in value if n not in manifest.languages]
        if unknown:
            raise ConfigError(f"languages: {unknown[:5]} are not in the manifest (it has {len(names)} languages, "
                              f"e.g. {names[:5]})", field="languages")
    phase = PhaseConfig(name="evaluate", tokens=1, languages=value)
    active = active_languages(phase, names, tokens)
    if isinstance(value, list):
        empty = [n for n in value if manifest.languages[n].tokens <= 0]
        if empty:
            raise ConfigError(f"languages: {empty[:5]} have no tokens in the manifest", field="languages")
        return list(dict.fromkeys(value))
    chosen = [n for n, a in zip(names, active) if a]
    return sorted(chosen, key=lambda n: (-manifest.languages[n].tokens, n))


def language_seed(seed: int, language: str) -> int:
    """63-bit key of a language's mask and row generator: the same for every model and layout, and
    unrelated between languages (rows of two languages never share random numbers)."""
    digest = hashlib.sha256(f"mmbert-evaluate/{int(seed)}/{language}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclasses.dataclass
class LanguageRows:
    """One language's evaluation rows (the Batch dicts of docs/interfaces.md)."""

    language: str
    rows: int
    batches: List[Dict]


def language_rows(manifest, language: str, seq_len: int, mask_rate: float, tokens_per_language: int,
                  seed: int, micro_batch_rows: int, mask_special_tokens: bool = False) -> LanguageRows:
    """``tokens_per_language // seq_len`` rows of ``language`` (at least one, at most the language's
    tokens // seq_len) in batches of ``micro_batch_rows``, masked by training's ``MLMStream``."""
    from megatron_mmbert.data.mlm import MLMStream

    entry = manifest.languages[language]
    rows = max(1, min(tokens_per_language // seq_len, entry.tokens // seq_len))
    if entry.tokens < seq_len:
        logger.warning(f"{language} has {entry.tokens} tokens, fewer than one row of {seq_len}; its row "
                       "repeats documents")
    # One language, one phase: row r's masks use the Philox counter r under the language's key.
    only = dataclasses.replace(manifest, languages={language: entry})
    phase = PhaseConfig(name="evaluate", tokens=rows * seq_len, seq_len=seq_len, mask_rate=mask_rate,
                        languages=[language], temperature=1.0, global_batch_size=rows)
    stream = MLMStream(only, [phase], language_seed(seed, language), cache_dir=None,
                       mask_special_tokens=mask_special_tokens, is_builder=True)
    if stream.phase_num_samples("evaluate") != rows:  # the plan rounds to whole batches
        raise RuntimeError(f"evaluation plan of {language} has {stream.phase_num_samples('evaluate')} rows, not {rows}")
    batches = [stream.batch("evaluate", range(start, min(start + micro_batch_rows, rows)))
               for start in range(0, rows, micro_batch_rows)]
    return LanguageRows(language, rows, batches)


def check_vocab(manifest, vocab_size: int, where: str) -> None:
    """Refuse a model whose vocabulary is smaller than the manifest's tokenizer."""
    have = int(manifest.tokenizer.vocab_size)
    if have > vocab_size:
        raise ConfigError(
            f"{where} has a vocabulary of {vocab_size} but the manifest's tokenizer {manifest.tokenizer.name!r} "
            f"has {have} ids: evaluate it on data preprocessed with its own tokenizer"
        )


def split_rows(batches: List[Dict], rank: int, size: int) -> Tuple[List[Dict], int]:
    """This data-parallel rank's share of a language's batches (round robin)."""
    mine = batches[rank::size]
    return mine, len(mine)
