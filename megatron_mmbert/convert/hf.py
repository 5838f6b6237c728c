"""Hugging Face ModernBERT <-> megatron-mmbert: configs and state dicts, one tensor at a time.

The one place that knows both namings. Megatron-side tensors are in the *canonical* layout: the
full (unsharded) tensor under its checkpoint key, which is what a TP1/PP1 model's ``state_dict`` holds
and what megatron-core's ``dist_checkpointing`` stores for every layout. Two layout changes exist:

* QKV: HF's ``Wqkv`` rows are ``[q heads | k heads | v heads]``; megatron groups rows per head
  (``[q_h, k_h, v_h]`` for each head h) so that tensor parallelism splits whole heads.
* Vocabulary: megatron pads the embedding and decoder bias to a multiple of 128 x TP; padded rows
  are zero on import and dropped on export.

GeGLU needs no change: both activate the first half of fc1 (HF ``Wi``). The decoder weight is the
embedding in both (HF usually does not store ``decoder.weight``).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from megatron_mmbert.config import ConfigError, ModelConfig

# ------------------------------------------------------------------------------------------------
# Configs


def model_config_from_hf(hf_config) -> ModelConfig:
    """A ModelConfig from a ``transformers.ModernBertConfig`` (or its dict), refusing what we
    cannot represent exactly, with the offending key named."""
    from transformers import ModernBertConfig

    if isinstance(hf_config, Mapping):
        model_type = hf_config.get("model_type")
        if model_type != "modernbert":
            raise ConfigError(
                f"config model_type is {model_type!r}, not 'modernbert': only ModernBERT / mmBERT "
                "checkpoints (ModernBertForMaskedLM) can be converted"
            )
        hf_config = ModernBertConfig(**{k: v for k, v in hf_config.items() if k != "model_type"})
    requirements = {
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "decoder_bias": True,
        "classifier_bias": False,
        "tie_word_embeddings": True,
    }
    for key, expected in requirements.items():
        value = getattr(hf_config, key, expected)
        if value != expected:
            raise ConfigError(
                f"HF config {key}={value!r} is not supported (megatron-mmbert builds ModernBERT "
                f"with {key}={expected!r})"
            )
    for key in ("hidden_activation", "classifier_activation"):
        if getattr(hf_config, key, "gelu") != "gelu":
            raise ConfigError(f"HF config {key}={getattr(hf_config, key)!r} is not supported (only exact gelu)")
    layer_types = list(hf_config.layer_types)
    every_n = _global_every_n(layer_types)
    rope = hf_config.rope_parameters
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        global_attn_every_n_layers=every_n,
        local_attention=hf_config.local_attention,
        global_rope_theta=float(rope["full_attention"]["rope_theta"]),
        local_rope_theta=float(rope["sliding_attention"]["rope_theta"]),
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.norm_eps,
        embedding_dropout=float(hf_config.embedding_dropout),
        attention_dropout=float(hf_config.attention_dropout),
        attention_output_dropout=0.0,  # HF has none; mmBERT's 0.1 was a training setting
        mlp_dropout=float(hf_config.mlp_dropout),
        init_std=hf_config.initializer_range,
        init_cutoff_factor=hf_config.initializer_cutoff_factor,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
    )


def _global_every_n(layer_types) -> int:
    if not layer_types or layer_types[0] != "full_attention":
        raise ConfigError(f"HF config layer_types must start with full_attention, got {layer_types[:4]}")
    later = [i for i, t in enumerate(layer_types) if t == "full_attention" and i > 0]
    every_n = later[0] if later else len(layer_types) + 1
    expected = ["full_attention" if i % every_n == 0 else "sliding_attention" for i in range(len(layer_types))]
    if layer_types != expected:
        raise ConfigError(
            f"HF config layer_types {layer_types} is not ModernBERT's every-N pattern "
            "(global on layers i % N == 0)"
        )
    return every_n


def hf_config_from_model_config(model: ModelConfig, special_ids: Optional[Dict[str, int]] = None):
    """A ``transformers.ModernBertConfig`` for ``model`` with both RoPE thetas written explicitly."""
    from transformers import ModernBertConfig

    # ModernBERT's ids, used only when no tokenizer is known (export-hf warns then).
    ids = {"pad": model.pad_token_id, "eos": 1, "bos": 2, "cls": 1, "sep": 1, "mask": 4}
    ids.update(special_ids or {})
    config = ModernBertConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        hidden_activation="gelu",
        max_position_embeddings=model.max_position_embeddings,
        initializer_range=model.init_std,
        initializer_cutoff_factor=model.init_cutoff_factor,
        norm_eps=model.norm_eps,
        norm_bias=False,
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        bos_token_id=ids["bos"],
        cls_token_id=ids["cls"],
        sep_token_id=ids["sep"],
        attention_bias=False,
        attention_dropout=model.attention_dropout,
        global_attn_every_n_layers=model.global_attn_every_n_layers,
        global_rope_theta=model.global_rope_theta,
        local_rope_theta=model.local_rope_theta,
        local_attention=model.local_attention,
        embedding_dropout=model.embedding_dropout,
        mlp_bias=False,
        mlp_dropout=model.mlp_dropout,
        decoder_bias=True,
        # The classifier head fields as mmBERT's released config.json has them: fine-tuning with
        # ModernBertForSequenceClassification pools by the mean over tokens (HF's default is "cls").
        classifier_pooling="mean",
        classifier_dropout=0.0,
        classifier_bias=False,
        classifier_activation="gelu",
        tie_word_embeddings=True,
    )
    config.mask_token_id = ids["mask"]  # not a ModernBertConfig field; kept so the config names it too
    return config


# ------------------------------------------------------------------------------------------------
# Tensors

_LAYER = r"(\d+)"
# (HF pattern, megatron template, kind); kinds select the tensor transform below.
_RULES = [
    (r"model\.embeddings\.tok_embeddings\.weight", "embedding.word_embeddings.weight", "vocab"),
    (r"model\.embeddings\.norm\.weight", "embedding.norm.weight", "copy"),
    (rf"model\.layers\.{_LAYER}\.attn_norm\.weight", "encoder.layers.{}.input_layernorm.weight", "copy"),
    (rf"model\.layers\.{_LAYER}\.attn\.Wqkv\.weight", "encoder.layers.{}.self_attention.linear_qkv.weight", "qkv"),
    (rf"model\.layers\.{_LAYER}\.attn\.Wo\.weight", "encoder.layers.{}.self_attention.linear_proj.weight", "copy"),
    (rf"model\.layers\.{_LAYER}\.mlp_norm\.weight", "encoder.layers.{}.pre_mlp_layernorm.weight", "copy"),
    (rf"model\.layers\.{_LAYER}\.mlp\.Wi\.weight", "encoder.layers.{}.mlp.linear_fc1.weight", "copy"),
    (rf"model\.layers\.{_LAYER}\.mlp\.Wo\.weight", "encoder.layers.{}.mlp.linear_fc2.weight", "copy"),
    (r"model\.final_norm\.weight", "encoder.final_layernorm.weight", "copy"),
    (r"head\.dense\.weight", "lm_head.dense.weight", "copy"),
    (r"head\.norm\.weight", "lm_head.norm.weight", "copy"),
    (r"decoder\.bias", "output_layer.bias", "vocab"),
]
_HF_TIED = "decoder.weight"  # the embedding, when stored at all


def _template_regex(template: str) -> str:
    return re.escape(template).replace(r"\{\}", _LAYER)


def megatron_key(hf_key: str) -> Tuple[str, str]:
    """(megatron key, transform kind) for an HF key; KeyError names unknown keys."""
    for pattern, template, kind in _RULES:
        m = re.fullmatch(pattern, hf_key)
        if m:
            return template.format(*m.groups()), kind
    raise KeyError(f"HF tensor {hf_key!r} has no megatron-mmbert counterpart")


def hf_key(megatron_key_: str) -> Tuple[str, str]:
    """(HF key, transform kind) for a megatron key; KeyError names unknown keys."""
    for pattern, template, kind in _RULES:
        m = re.fullmatch(_template_regex(template), megatron_key_)
        if m:
            return pattern.replace(_LAYER, "{}").replace("\\.", ".").format(*m.groups()), kind
    raise KeyError(f"megatron tensor {megatron_key_!r} has no HF ModernBERT counterpart")


def expected_hf_keys(model: ModelConfig):
    """Every HF key a ModernBertForMaskedLM of ``model`` stores (decoder.weight is tied, omitted)."""
    keys = ["model.embeddings.tok_embeddings.weight", "model.embeddings.norm.weight"]
    for i in range(model.num_layers):
        if i > 0:
            keys.append(f"model.layers.{i}.attn_norm.weight")
        keys += [
            f"model.layers.{i}.attn.Wqkv.weight",
            f"model.layers.{i}.attn.Wo.weight",
            f"model.layers.{i}.mlp_norm.weight",
            f"model.layers.{i}.mlp.Wi.weight",
            f"model.layers.{i}.mlp.Wo.weight",
        ]
    keys += ["model.final_norm.weight", "head.dense.weight", "head.norm.weight", "decoder.bias"]
    return keys


def _qkv_hf_to_megatron(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_h, h = w.shape
    return w.view(3, heads, three_h // (3 * heads), h).transpose(0, 1).reshape(three_h, h)


def _qkv_megatron_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_h, h = w.shape
    return w.view(heads, 3, three_h // (3 * heads), h).transpose(0, 1).reshape(three_h, h)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def tensor_to_megatron(hf_key_: str, tensor: torch.Tensor, model: ModelConfig, padded_vocab: int):
    """(megatron key, tensor) for one HF tensor."""
    key, kind = megatron_key(hf_key_)
    if kind == "qkv":
        tensor = _qkv_hf_to_megatron(tensor, model.num_attention_heads)
    elif kind == "vocab":
        tensor = _pad_rows(tensor, padded_vocab)
    return key, tensor


def tensor_to_hf(megatron_key_: str, tensor: torch.Tensor, model: ModelConfig):
    """(HF key, tensor) for one canonical megatron tensor."""
    key, kind = hf_key(megatron_key_)
    if kind == "qkv":
        tensor = _qkv_megatron_to_hf(tensor, model.num_attention_heads)
    elif kind == "vocab":
        tensor = tensor[: model.vocab_size]
    return key, tensor


def _expected_shape(hf_key_: str, model: ModelConfig) -> Tuple[int, ...]:
    h, i, v = model.hidden_size, model.intermediate_size, model.vocab_size
    if hf_key_.endswith("tok_embeddings.weight"):
        return (v, h)
    if hf_key_ == "decoder.bias":
        return (v,)
    if hf_key_.endswith("Wqkv.weight"):
        return (3 * h, h)
    if hf_key_.endswith("mlp.Wi.weight"):
        return (2 * i, h)
    if hf_key_.endswith("mlp.Wo.weight"):
        return (h, i)
    if hf_key_.endswith(("attn.Wo.weight", "dense.weight")):
        return (h, h)
    return (h,)


def hf_to_megatron(
    state: Mapping[str, torch.Tensor], model: ModelConfig, padded_vocab: int
) -> Dict[str, torch.Tensor]:
    """A canonical megatron state dict from a full HF ``ModernBertForMaskedLM`` state dict.

    Missing, unexpected or mis-shaped tensors raise ConfigError naming the key and both shapes.
    """
    expected = expected_hf_keys(model)
    present = set(state)
    missing = [k for k in expected if k not in present]
    if missing:
        raise ConfigError(f"HF checkpoint is missing {len(missing)} tensor(s), first: {missing[:3]}")
    unexpected = sorted(present - set(expected) - {_HF_TIED})
    if unexpected:
        raise ConfigError(f"HF checkpoint has tensors ModernBERT does not: {unexpected[:3]}")
    if _HF_TIED in state and not torch.equal(
        state[_HF_TIED], state["model.embeddings.tok_embeddings.weight"]
    ):
        raise ConfigError(
            "HF decoder.weight differs from model.embeddings.tok_embeddings.weight: the decoder "
            "must be tied to the embedding"
        )
    out = {}
    for key in expected:
        tensor = state[key]
        shape = _expected_shape(key, model)
        if tuple(tensor.shape) != shape:
            raise ConfigError(
                f"HF tensor {key} has shape {tuple(tensor.shape)}, expected {shape} from config.json"
            )
        mkey, mtensor = tensor_to_megatron(key, tensor, model, padded_vocab)
        out[mkey] = mtensor
    return out


def megatron_to_hf(state: Mapping[str, torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """A full HF state dict (without the tied ``decoder.weight``) from a canonical megatron one."""
    out = {}
    for key, tensor in state.items():
        if tensor is None or key.endswith("_extra_state"):
            continue
        hkey, htensor = tensor_to_hf(key, tensor, model)
        out[hkey] = htensor.contiguous()
    missing = [k for k in expected_hf_keys(model) if k not in out]
    if missing:
        raise ConfigError(f"megatron checkpoint lacks tensors for {missing[:3]}")
    return out


__all__ = [
    "model_config_from_hf",
    "hf_config_from_model_config",
    "megatron_key",
    "hf_key",
    "tensor_to_megatron",
    "tensor_to_hf",
    "hf_to_megatron",
    "megatron_to_hf",
    "expected_hf_keys",
    "Callable",
]
