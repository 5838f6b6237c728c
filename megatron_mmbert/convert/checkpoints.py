"""Whole-checkpoint conversions between HF ModernBERT directories and our dist checkpoints.

Used by ``tools/convert_checkpoint.py``; the tensor-level mapping lives in :mod:`.hf`.
Both directions go through a real model at TP1/PP1 in a world of one process, so what is
written is exactly what the trainer saves and loads (at any layout).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional

import torch

from megatron_mmbert.config import ConfigError, ModelConfig, ParallelConfig
from megatron_mmbert.convert import hf as hf_map
from megatron_mmbert.fileio import check_output_dir, publish_directory, write_output_marker
from megatron_mmbert.training import checkpoint as ckpt

HF_FILES_TO_COPY = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
)


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> List[str]:
    """Copy the tokenizer files of ``src_dir`` (only the names in :data:`HF_FILES_TO_COPY`, only
    regular files) into ``dst_dir``: a checkpoint's ``tokenizer/`` cannot replace an output's
    ``config.json`` or weights, nor point a symlink outside."""
    copied = []
    if not os.path.isdir(src_dir):
        return copied
    for name in HF_FILES_TO_COPY:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and not os.path.islink(src):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def read_hf_state_dict(hf_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of an HF directory (``*.safetensors``, sharded or not, or ``pytorch_model.bin``)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    state: Dict[str, torch.Tensor] = {}
    if files:
        for name in files:
            with safe_open(os.path.join(hf_dir, name), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
    elif os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
        state = torch.load(os.path.join(hf_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{hf_dir} has no *.safetensors or pytorch_model.bin weights")
    return state


def read_hf_config(hf_dir: str) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
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
    ckpt.save_model(save_dir, [chunk], model, extra={"source": os.path.abspath(hf_dir)})
    copy_tokenizer_files(hf_dir, os.path.join(save_dir, "tokenizer"))  # keep it beside the weights
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
    overwrite: bool = False,
) -> ModelConfig:
    """megatron dist checkpoint -> HF directory that ``AutoModelForMaskedLM.from_pretrained`` loads.
    ``out_dir`` must be new, or (``overwrite``) a previous export-hf output; never the input."""
    from safetensors.torch import save_file

    check_output_dir(out_dir, "export-hf", inputs=[load_dir], overwrite=overwrite)
    model, state = load_canonical(load_dir, verify=verify)
    hf_state = hf_map.megatron_to_hf(state, model)
    tokenizer_dir = os.path.join(load_dir, "tokenizer")
    tmp = f"{os.path.abspath(out_dir)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_hf_config(model, tmp, tokenizer_dir, special_ids)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer_files(tokenizer_dir, tmp)
    write_output_marker(tmp, "export-hf", source=os.path.abspath(load_dir))
    publish_directory(tmp, out_dir)
    return model


def write_hf_config(
    model: ModelConfig, out_dir: str, tokenizer_dir: Optional[str] = None, special_ids: Optional[Dict[str, int]] = None
) -> None:
    """``config.json`` of a ModernBertForMaskedLM for ``model`` in ``out_dir``.

    Special ids come from ``special_ids``, else from the tokenizer in ``tokenizer_dir`` if any. Both
    RoPE thetas are written explicitly, in transformers' current form (``rope_parameters``) and in
    the legacy keys older releases read (whose default local theta, 10k, would be wrong for mmBERT).
    """
    special_ids = special_ids or (_special_ids_from_tokenizer(tokenizer_dir) if tokenizer_dir else None)
    config = hf_map.hf_config_from_model_config(model, special_ids)
    config.architectures = ["ModernBertForMaskedLM"]
    config.save_pretrained(out_dir)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        data = json.load(f)
    data.update(
        global_rope_theta=model.global_rope_theta,
        local_rope_theta=model.local_rope_theta,
        global_attn_every_n_layers=model.global_attn_every_n_layers,
    )
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def _special_ids_from_tokenizer(tokenizer_dir: str) -> Optional[Dict[str, int]]:
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
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
