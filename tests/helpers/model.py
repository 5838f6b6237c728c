"""Helpers for model tests: random tiny HF ModernBERT models, packed batches, HF reference logits
(``torchrun``, re-exported here, is tests/helpers/launch.py's)."""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mmbert.convert.verify import hf_logits_per_document

# The launcher lives in tests/helpers/launch.py; these names stay importable from here.
from tests.helpers.launch import ROOT, free_port, torchrun  # noqa: F401



@contextlib.contextmanager
def world_of_one() -> Iterator[None]:
    """A gloo process group and megatron-core's parallel state for this one process (TP=PP=DP=1, on
    CPU through ``cpu_adapter``), for in-process tests of code that reads them; tears down only what it
    made, so it nests inside a test that has them already."""
    from megatron.core import parallel_state

    from megatron_mmbert import cpu_adapter

    cpu_adapter.install()
    own_group = not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    own_state = not parallel_state.model_parallel_is_initialized()
    if own_state:
        parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        if own_state:
            parallel_state.destroy_model_parallel()
        if own_group:
            torch.distributed.destroy_process_group()

# Tiny configurations that exercise what parity depends on.
HF_CONFIGS = {
    # window (16) shorter than documents, thetas differ, vocab not a multiple of 128, odd layers
    "odd": dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                num_attention_heads=4, local_attention=16, global_rope_theta=160000.0,
                local_rope_theta=10000.0, global_attn_every_n_layers=3),
    # even layers (pipeline-splittable), every second layer global, odd vocab; head_dim 16, the
    # least compiled FlexAttention runs on CUDA (model/backends.py FLEX_MIN_HEAD_DIM)
    "even": dict(vocab_size=333, hidden_size=64, intermediate_size=80, num_hidden_layers=4,
                 num_attention_heads=4, local_attention=8, global_rope_theta=10000.0,
                 local_rope_theta=500.0, global_attn_every_n_layers=2),
}


def make_hf_model(name, directory: str, seed: int = 0):
    """Save a randomly initialised ModernBertForMaskedLM (non-trivial norms and biases) to ``directory``.

    ``name``: a key of :data:`HF_CONFIGS`, or the ``ModernBertConfig`` arguments themselves."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(seed)
    config = ModernBertConfig(pad_token_id=0, bos_token_id=2, eos_token_id=1, cls_token_id=1,
                              sep_token_id=1, attn_implementation="eager",
                              **(HF_CONFIGS[name] if isinstance(name, str) else name))
    model = ModernBertForMaskedLM(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() == 1:  # norms start at 1 and the decoder bias at 0: randomise so mistakes show
                p.add_(0.1 * torch.randn_like(p))
            elif "Wqkv" in key:  # at init attention is nearly uniform, blind to RoPE and windows
                p.mul_(15.0)
    model.save_pretrained(directory)
    return model


def hf_model_and_checkpoint(root) -> None:
    """``root/hf``: a tiny HF ModernBERT model (the "even" config); ``root/ckpt``: its megatron
    checkpoint as ``convert_checkpoint import-hf`` writes it (with recorded digests)."""
    from megatron_mmbert import runtime
    from megatron_mmbert.convert.checkpoints import import_hf

    make_hf_model("even", os.path.join(str(root), "hf"))
    import_hf(os.path.join(str(root), "hf"), os.path.join(str(root), "ckpt"))
    runtime.shutdown()


def save_word_tokenizer(directory: str) -> None:
    """A small word-level fast tokenizer with ModernBERT-like special ids (``w5``..``w332``), saved
    with ``save_pretrained`` (the tiny HF models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[CLS]": 1, "[BOS]": 2, "[UNK]": 3, "[MASK]": 4}
    vocab.update({f"w{i}": i for i in range(5, 333)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[CLS]",
                            bos_token="[BOS]", eos_token="[CLS]", unk_token="[UNK]",
                            mask_token="[MASK]").save_pretrained(directory)

def packed_batch(doc_lengths: Sequence[Sequence[int]], vocab: int, seed: int = 0) -> Dict:
    """A Batch (docs/interfaces.md) of rows packed from the given per-row document lengths."""
    g = torch.Generator().manual_seed(seed)
    s = sum(doc_lengths[0])
    assert all(sum(r) == s for r in doc_lengths), "every row must be full"
    b = len(doc_lengths)
    tokens = torch.randint(5, vocab, (b, s), generator=g)
    positions = torch.cat([torch.arange(n) for row in doc_lengths for n in row]).view(b, s)
    bounds = [0]
    for row in doc_lengths:
        for n in row:
            bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"tokens": tokens, "positions": positions, "cu_seqlens": cu,
            "max_seqlen": max(n for row in doc_lengths for n in row)}


class HostReads(TorchDispatchMode):
    """Counts host reads: calls of ``aten::_local_scalar_dense`` (what ``.item()`` and ``bool()`` of
    a tensor dispatch to; on a GPU each is a device synchronisation)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            HostReads.count += 1
        return func(*args, **(kwargs or {}))


# HF logits for a packed batch, each document run on its own: the converter's own reference.
hf_reference_logits = hf_logits_per_document


def use_flash_reference(monkeypatch=None) -> None:
    """Let a ``flash`` model be built on CPU with flash-attn's kernel replaced by its TEST REFERENCE
    (tests/flash_reference.py): the backend choice is forced to ``flash`` (flash-attn needs CUDA and
    bf16, so the real choice would refuse) and ``flash_attn_varlen_func`` resolves to the reference.
    Everything else -- packing, cu_seqlens, max_seqlen, window_size, heads -- is the shipped code."""
    from tests.helpers.flash_reference import reference_flash_attn_varlen_func
    from megatron_mmbert.model import attention, build
    from megatron_mmbert.model.backends import BackendChoice

    def flash_choice(model, *args, **kwargs):
        return BackendChoice("flash", {"global": "flash-attn varlen (test reference)", "local": "flash-attn varlen (test reference)"})

    for owner, name, value in ((attention, "load_flash_varlen", lambda: reference_flash_attn_varlen_func),
                               (build, "select_backend", flash_choice)):
        if monkeypatch is not None:
            monkeypatch.setattr(owner, name, value)
        else:  # a worker process: for its whole life
            setattr(owner, name, value)
