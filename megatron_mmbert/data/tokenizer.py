"""Tokenizers for preprocessing: HF fast tokenizers and SentencePiece, with identity and framing.

``load_tokenizer(path)`` accepts a Hugging Face tokenizer folder (with ``tokenizer.json``), a bare
``tokenizer.json``, a SentencePiece ``.model`` or a folder holding only ``tokenizer.model``. It returns
a ``TextTokenizer`` that knows its identity (name, vocab size, sha256 of its files, special ids) and
encodes batches without special tokens; ``Framing`` then adds the document framing (mmBERT:
``<bos> ... <eos>``) exactly once per document, never per sentence.

Encoding is single-threaded per process on purpose: preprocessing parallelises over worker
processes, and HF tokenizers' own thread pool would oversubscribe the cores
(``TOKENIZERS_PARALLELISM=false`` is set before the tokenizer is used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_mmbert.config_base import ConfigError
from megatron_mmbert.data.shards import TokenizerIdentity

SPECIAL_ROLES = ("pad", "eos", "bos", "unk", "mask")
# Token strings tried, in order, when a bare tokenizer.json has no special-token config beside it.
_ROLE_CANDIDATES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "eos": ("<eos>", "</s>", "[SEP]", "<|endoftext|>"),
    "bos": ("<bos>", "<s>", "[CLS]", "<|startoftext|>"),
    "unk": ("<unk>", "[UNK]"),
    "mask": ("<mask>", "[MASK]"),
}
# Files that define an HF tokenizer's behaviour; their bytes make up its hash.
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ConfigError):
    """A tokenizer path or framing that cannot be used; the message says what to set instead.

    ``field`` is the config field to blame (``framing.bos``) when one is, so a command line can name
    the option that sets it."""


def _sha256_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


class TextTokenizer:
    """A loaded tokenizer: ``identity`` plus ``encode_batch(texts) -> list of id lists``."""

    identity: TokenizerIdentity

    def encode_batch(self, texts: List[str]) -> List[List[int]]:  # pragma: no cover - interface
        raise NotImplementedError


class HFTokenizer(TextTokenizer):
    """A Hugging Face fast tokenizer (``tokenizers.Tokenizer``) from ``tokenizer.json``."""

    def __init__(self, json_path: str, name: str) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(json_path)
        folder = os.path.dirname(json_path)
        files = [os.path.join(folder, f) for f in _HF_FILES if os.path.isfile(os.path.join(folder, f))]
        tokens = self._configured_special_tokens(folder)
        special_ids = {}
        for role in SPECIAL_ROLES:
            candidates = [tokens[role]] if role in tokens else list(_ROLE_CANDIDATES[role])
            special_ids[role] = next(
                (self._tok.token_to_id(t) for t in candidates if self._tok.token_to_id(t) is not None), None
            )
        added = self._tok.get_added_tokens_decoder()
        all_special = {i for i, t in added.items() if t.special} | {i for i in special_ids.values() if i is not None}
        self.identity = TokenizerIdentity(
            name=name,
            vocab_size=self._tok.get_vocab_size(with_added_tokens=True),
            hash=_sha256_files(files),
            special_ids=special_ids,
            all_special_ids=sorted(all_special),
        )
        # encode_batch_fast skips offset tracking (tokenizers >= 0.21); same ids.
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    @staticmethod
    def _configured_special_tokens(folder: str) -> Dict[str, str]:
        """Role -> token string from special_tokens_map.json / tokenizer_config.json, if present."""
        found: Dict[str, str] = {}
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            for role in SPECIAL_ROLES:
                value = cfg.get(f"{role}_token")
                if isinstance(value, dict):  # AddedToken serialisation
                    value = value.get("content")
                if isinstance(value, str):
                    found[role] = value
        return found

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]


class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece ``.model``."""

    def __init__(self, model_path: str, name: str) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        sp = self._sp

        def valid(i: int) -> Optional[int]:
            return i if i is not None and i >= 0 else None

        mask = None
        for cand in _ROLE_CANDIDATES["mask"]:
            i = sp.piece_to_id(cand)
            if i != sp.unk_id():
                mask = i
                break
        special_ids = {
            "pad": valid(sp.pad_id()), "eos": valid(sp.eos_id()), "bos": valid(sp.bos_id()),
            "unk": valid(sp.unk_id()), "mask": mask,
        }
        n = sp.get_piece_size()
        control = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self.identity = TokenizerIdentity(
            name=name,
            vocab_size=n,
            hash=_sha256_files([model_path]),
            special_ids=special_ids,
            all_special_ids=sorted(control | {i for i in special_ids.values() if i is not None}),
        )

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._sp.encode(texts)


def resolve_tokenizer_path(path: str) -> str:
    """``path`` as it is, or for a Hub id (``org/name[@revision]``) its cached snapshot folder."""
    from megatron_mmbert import hub
    from megatron_mmbert.checkpoints.layout import TOKENIZER_FILES  # what checkpoints copy: fetch those

    try:
        return hub.resolve(path, list(TOKENIZER_FILES), what="tokenizer")
    except hub.HubError as exc:
        raise TokenizerError(str(exc)) from None


def load_tokenizer(path: str) -> TextTokenizer:
    """Load an HF tokenizer folder / ``tokenizer.json`` or a SentencePiece ``.model``; a Hub id
    (``org/name[@revision]``, not a local path) is fetched into the HF cache (:mod:`megatron_mmbert.hub`)."""
    path = os.path.abspath(resolve_tokenizer_path(path))
    if os.path.isdir(path):
        name = os.path.basename(path.rstrip("/"))
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return HFTokenizer(os.path.join(path, "tokenizer.json"), name)
        models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
        if models:
            return SentencePieceTokenizer(os.path.join(path, models[0]), name)
        raise TokenizerError(
            f"{path} holds neither tokenizer.json nor a SentencePiece *.model; for a slow-only HF tokenizer "
            "save a fast one first: AutoTokenizer.from_pretrained(path).save_pretrained(path)"
        )
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer path {path} does not exist")
    if path.endswith(".json"):
        return HFTokenizer(path, os.path.basename(os.path.dirname(path)) or os.path.basename(path))
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, os.path.splitext(os.path.basename(path))[0])
    raise TokenizerError(f"{path}: expected a tokenizer folder, a tokenizer.json or a SentencePiece .model")


@dataclasses.dataclass(frozen=True)
class Framing:
    """Tokens added around every document (mmBERT: ``<bos> ... <eos>``)."""

    bos: bool = True
    """Prepend the tokenizer's bos id to each document."""
    eos: bool = True
    """Append the tokenizer's eos id to each document."""

    def ids(self, identity: TokenizerIdentity) -> tuple:
        """(prefix ids, suffix ids); an error naming the missing token if the tokenizer lacks it."""
        out = []
        for role, on in (("bos", self.bos), ("eos", self.eos)):
            if not on:
                out.append(())
                continue
            i = identity.special_ids.get(role)
            if i is None:
                raise TokenizerError(
                    f"tokenizer {identity.name} has no {role} token but the framing adds one; "
                    f"set framing.{role} to false or use a tokenizer with a {role} token", field=f"framing.{role}"
                )
            out.append((i,))
        return tuple(out)

    def to_json(self) -> dict:
        return {"bos": self.bos, "eos": self.eos}


def frame_documents(encoded: List[List[List[int]]], prefix: tuple, suffix: tuple) -> tuple:
    """Flatten encoded documents (each a list of sentences' ids) with framing.

    Returns ``(tokens, sequence_lengths, sequences_per_document)`` as numpy arrays ready for
    ``ShardWriter.add_documents``. Empty sentences are dropped (as megatron's preprocess does); the
    bos goes into the first sequence of a document and the eos into its last.
    """
    lengths: List[int] = []
    per_doc: List[int] = []
    pieces: List[Sequence[int]] = []  # framing and sentence id lists, in file order
    for sentences in encoded:
        sentences = [s for s in sentences if s] or [[]]
        last = len(sentences) - 1
        for j, ids in enumerate(sentences):
            n = len(ids)
            if j == 0 and prefix:
                pieces.append(prefix)
                n += len(prefix)
            pieces.append(ids)
            if j == last and suffix:
                pieces.append(suffix)
                n += len(suffix)
            lengths.append(n)
        per_doc.append(last + 1)
    total = sum(lengths)
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=total)
    return flat, np.asarray(lengths, dtype=np.int64), np.asarray(per_doc, dtype=np.int64)


class SentenceSplitter:
    """Optional NLTK punkt sentence splitting (off by default; MLM packing does not need it)."""

    def __init__(self, language: str = "english") -> None:
        try:
            import nltk  # noqa: F401
            from nltk.tokenize import PunktTokenizer
        except ImportError:
            raise TokenizerError(
                "split_sentences needs nltk: pip install 'nltk>=3.8' (or pip install .[nltk]), then "
                "python -m nltk.downloader punkt_tab", field="split_sentences"
            ) from None
        try:
            self._punkt = PunktTokenizer(language)
        except LookupError:
            raise TokenizerError(
                f"nltk punkt data for {language!r} is missing: run python -m nltk.downloader punkt_tab "
                "(or set NLTK_DATA to a folder that has tokenizers/punkt_tab)"
            ) from None

    def split(self, text: str) -> List[str]:
        return self._punkt.tokenize(text)
