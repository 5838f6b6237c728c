"""Whole-checkpoint conversions between HF ModernBERT directories and our dist checkpoints.

Used by ``tools/convert_checkpoint.py``; the tensor-level mapping lives in :mod:`.hf`.
Both directions go through a real model at TP1/PP1 in a world of one process, so what is
written is exactly what the trainer saves and loads (at any layout).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Dict, Optional

import torch

from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.checkpoints.layout import HF_CONFIG, has_tokenizer_files, store_tokenizer, tokenizer_dir
from megatron_mmbert.checkpoints.tensors import HFSource
from megatron_mmbert.config import ConfigError, ModelConfig, ParallelConfig
from megatron_mmbert.convert import hf as hf_map
from megatron_mmbert.fileio import check_output_dir, publish_directory, raise_disk_error, write_output_marker

logger = logging.getLogger(__name__)


def read_hf_state_dict(hf_dir: str) -> Dict[str, torch.Tensor]:
    """All stored tensors of an HF directory (``*.safetensors``, sharded by its index or not)."""
    return HFSource(hf_dir).read_state_dict()


def read_hf_config(hf_dir: str) -> ModelConfig:
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir} has no {HF_CONFIG}: not a Hugging Face model directory")
    with open(path) as f:
        return hf_map.model_config_from_hf(json.load(f))


def _single_process_model(model: ModelConfig):
    from megatron_mmbert import runtime
    from megatron_mmbert.model.build import build_model

    parallel = ParallelConfig()
    runtime.initialize(model, parallel)
    (chunk,) = build_model(model, parallel)
    return chunk


def import_hf(hf_dir: str, save_dir: str, overwrite: bool = False) -> ModelConfig:
    """HF ModernBertForMaskedLM directory -> megatron dist checkpoint (loads at any layout).
    ``save_dir`` must be new, or (``overwrite``) a previous import-hf output. ``hf_dir`` may be a
    Hub id (``org/name[@revision]``, :func:`megatron_mmbert.hub.resolve`)."""
    from megatron_mmbert.hub import resolve

    hf_dir = resolve(hf_dir)
    check_output_dir(save_dir, "import-hf", inputs=[hf_dir], overwrite=overwrite)
    model = read_hf_config(hf_dir)
    state = read_hf_state_dict(hf_dir)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"{hf_dir}: tensor {key} holds NaN or inf values; refusing to import a broken model")
    canonical = hf_map.hf_to_megatron(state, model, model.padded_vocab_size(1))
    chunk = _single_process_model(model)
    result = chunk.load_state_dict(canonical, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"import mapping mismatch: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    ckpt.save_model(save_dir, [chunk], model, extra={"source": os.path.abspath(hf_dir)}, tokenizer=hf_dir)
    write_output_marker(save_dir, "import-hf", source=os.path.abspath(hf_dir))
    return model


def load_canonical(load_dir: str, verify: bool = True) -> tuple:
    """(ModelConfig, canonical megatron state dict) of a checkpoint saved at any layout."""
    model = ckpt.read_model_config(load_dir)
    chunk = _single_process_model(model)
    ckpt.load_model(load_dir, [chunk], verify=verify)
    state = {k: v for k, v in chunk.state_dict().items() if torch.is_tensor(v)}
    return model, state


def export_hf(
    load_dir: str, out_dir: str, special_ids: Optional[Dict[str, int]] = None, verify: bool = True,
    overwrite: bool = False, tokenizer: Optional[str] = None,
) -> ModelConfig:
    """megatron dist checkpoint -> HF directory that ``AutoModelForMaskedLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load. The tokenizer is the checkpoint's own (its tokenizer
    folder), or ``tokenizer`` (a folder, ``tokenizer.json`` or ``.model``) when given; the config's
    special ids are read from it. ``out_dir`` must be new, or (``overwrite``) a previous export-hf
    output; never the input."""
    from safetensors.torch import save_file

    check_output_dir(out_dir, "export-hf", inputs=[load_dir], overwrite=overwrite)
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConfigError(f"tokenizer={tokenizer!r}: no such file or folder", field="tokenizer")
    model = ckpt.read_model_config(load_dir)  # a clear error before anything is written
    tmp = f"{os.path.abspath(out_dir)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tok_dir = _export_tokenizer(tokenizer, tmp, load_dir)
        if tok_dir is not None and special_ids is None:
            special_ids = _special_ids_from_tokenizer(tok_dir)
            _check_vocab(special_ids, model, tok_dir)
        model, state = load_canonical(load_dir, verify=verify)
        hf_state = hf_map.megatron_to_hf(state, model)
        write_hf_config(model, tmp, special_ids=special_ids)
        save_file({k: v.contiguous() for k, v in hf_state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        write_output_marker(tmp, "export-hf", source=os.path.abspath(load_dir))
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: nothing half-written is left behind
        raise_disk_error(exc, out_dir, "the export")
        raise
    publish_directory(tmp, out_dir)
    return model


def write_hf_config(
    model: ModelConfig, out_dir: str, tokenizer_dir: Optional[str] = None, special_ids: Optional[Dict[str, int]] = None
) -> None:
    """``config.json`` of a ModernBertForMaskedLM for ``model`` in ``out_dir``.

    Special ids come from ``special_ids``, else from the tokenizer in ``tokenizer_dir`` if any
    (else the ModelConfig's pad id and ModernBERT's defaults). Both
    RoPE thetas are written explicitly, in transformers' current form (``rope_parameters``) and in
    the legacy keys older releases read (whose default local theta, 10k, would be wrong for mmBERT).
    """
    special_ids = special_ids or (_special_ids_from_tokenizer(tokenizer_dir) if tokenizer_dir else None)
    config = hf_map.hf_config_from_model_config(model, special_ids)
    config.architectures = ["ModernBertForMaskedLM"]
    config.save_pretrained(out_dir)
    path = os.path.join(out_dir, HF_CONFIG)
    with open(path) as f:
        data = json.load(f)
    data.update(
        global_rope_theta=model.global_rope_theta,
        local_rope_theta=model.local_rope_theta,
        global_attn_every_n_layers=model.global_attn_every_n_layers,
    )
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def _export_tokenizer(override: Optional[str], out_dir: str, load_dir: str) -> Optional[str]:
    """Write the tokenizer (``override``, else the checkpoint's own) into ``out_dir`` the way
    ``AutoTokenizer`` reads it back (``save_pretrained``: tokenizer files plus a
    ``tokenizer_config.json`` naming the special tokens, ``mask_token`` included); returns
    ``out_dir``, or None (with a loud warning) when there is no tokenizer."""
    source = override if override is not None else tokenizer_dir(load_dir)
    staged = os.path.join(out_dir, ".tokenizer-source")
    if not store_tokenizer(source, staged, follow_symlinks=override is not None) or not has_tokenizer_files(tokenizer_dir(staged)):
        shutil.rmtree(staged, ignore_errors=True)
        logger.warning(
            "\n" + "!" * 78 + "\n%s holds no tokenizer: the export has none, so AutoTokenizer cannot load it and "
            "its config's special ids are the ModelConfig's defaults. Set the export's tokenizer (a folder, "
            "tokenizer.json or .model: the tokenizer the model was trained with) to include it.\n" + "!" * 78, load_dir,
        )
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(staged))
    if tok.mask_token is None:
        shutil.rmtree(staged, ignore_errors=True)
        raise ConfigError(
            f"tokenizer {source} defines no mask token; a masked-LM export needs one (set mask_token "
            "in its tokenizer_config.json, or set tokenizer to another one)", field="tokenizer",
        )
    tok.save_pretrained(out_dir)
    shutil.rmtree(staged)
    return out_dir


def _check_vocab(special_ids: Dict[str, int], model: ModelConfig, tok_dir: str) -> None:
    """A tokenizer whose special ids lie outside the model's vocabulary is the wrong one."""
    for role, i in special_ids.items():
        if not 0 <= i < model.vocab_size:
            raise ConfigError(
                f"tokenizer in {tok_dir}: its {role} id {i} is outside the model's vocabulary "
                f"({model.vocab_size}); it is not the tokenizer this model was trained with"
            )


def _special_ids_from_tokenizer(tokenizer_dir: str) -> Optional[Dict[str, int]]:
    """The special ids the tokenizer in ``tokenizer_dir`` defines (cls/sep fall back to eos, as in
    mmBERT's tokenizer, which has none of its own)."""
    if not has_tokenizer_files(tokenizer_dir):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {
        "pad": tok.pad_token_id,
        "eos": tok.eos_token_id,
        "bos": tok.bos_token_id,
        "cls": tok.cls_token_id if tok.cls_token_id is not None else tok.eos_token_id,
        "sep": tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id,
        "mask": tok.mask_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}
