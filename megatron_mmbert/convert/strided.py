"""A smaller model's weights from a larger one's by strided sampling (mmBERT-small from mmBERT-base).

The mmBERT paper (arXiv 2509.06888) initialises mmBERT-small from mmBERT-base "by strided
sampling" of the weights but does not publish the rule. **The rule here is this project's own**:

Let the larger model have L layers, hidden size h, H heads, FFN width I (per GLU half), and the
smaller one L', h', H', I', with the same vocabulary and head size (h / H == h' / H'). Each of
h / h', H / H', I / I' must be a whole number s (the stride); then

* **hidden units**: units ``0, s_h, 2 s_h, ...`` of every hidden-size axis (the token embedding's
  columns, every LayerNorm weight, the inputs of QKV / FFN-in / head dense, the outputs of
  attention-out / FFN-out / head dense);
* **attention heads**: whole heads ``0, s_H, 2 s_H, ...``, each with all its Q, K and V rows and
  its attention-out columns (the head size is kept, so a kept head computes with its own weights);
* **FFN units**: units ``0, s_I, 2 s_I, ...`` of each GLU half (the same units of the activated
  and the linear half) and the matching FFN-out columns;
* **layers**: with L' == L every layer; with L' < L the layers ``round(j (L - 1) / (L' - 1))``
  (first and last kept, evenly spaced);
* the vocabulary axis and the decoder bias are copied whole; nothing is rescaled.

mmBERT-base -> mmBERT-small (768 -> 384 hidden, 12 -> 6 heads, 1152 -> 1152 FFN, 22 -> 22 layers)
keeps the even hidden units, the even heads, every FFN unit and every layer.

The rule works on the canonical (TP1/PP1) megatron-core state dict, whose layouts it states:
``linear_qkv`` rows are grouped per head, ``[head, (q|k|v), head_dim]``; ``linear_fc1`` rows are
``[activated half; linear half]``. ``strided_checkpoint`` reads a checkpoint saved at any layout and
writes the smaller model as a checkpoint that loads at any layout (``init.checkpoint`` of a run).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Dict, List

import torch

from megatron_mmbert.config import ConfigError, ModelConfig

RULE = "strided-v1"
"""The name of the rule above, recorded in the checkpoints it writes."""


def _stride(big: int, small: int, what: str) -> torch.Tensor:
    if small > big or big % small:
        raise ConfigError(f"strided init: the larger model's {what} ({big}) must be a whole multiple of the "
                          f"smaller one's ({small})")
    return torch.arange(0, big, big // small)


def layer_map(big_layers: int, small_layers: int) -> List[int]:
    """The larger model's layer that each smaller-model layer is taken from."""
    if small_layers > big_layers or small_layers < 1:
        raise ConfigError(f"strided init: cannot take {small_layers} layers from {big_layers}")
    if small_layers == 1:
        return [0]
    return [round(j * (big_layers - 1) / (small_layers - 1)) for j in range(small_layers)]


def check_models(big: ModelConfig, small: ModelConfig) -> None:
    """The two models the rule can map (same vocabulary and head size, whole strides)."""
    if big.vocab_size != small.vocab_size:
        raise ConfigError(f"strided init: vocabularies differ ({big.vocab_size} vs {small.vocab_size}); the "
                          "embedding rows are copied whole")
    if big.hidden_size // big.num_attention_heads != small.hidden_size // small.num_attention_heads:
        raise ConfigError("strided init: the head size must be the same in both models (hidden / heads: "
                          f"{big.hidden_size // big.num_attention_heads} vs "
                          f"{small.hidden_size // small.num_attention_heads})")
    _stride(big.hidden_size, small.hidden_size, "hidden_size")
    _stride(big.num_attention_heads, small.num_attention_heads, "num_attention_heads")
    _stride(big.intermediate_size, small.intermediate_size, "intermediate_size")
    layer_map(big.num_layers, small.num_layers)


_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def strided_state_dict(state: Dict[str, torch.Tensor], big: ModelConfig, small: ModelConfig) -> Dict[str, torch.Tensor]:
    """The smaller model's canonical state dict from the larger one's (module docstring)."""
    check_models(big, small)
    hid = _stride(big.hidden_size, small.hidden_size, "hidden_size")
    heads = _stride(big.num_attention_heads, small.num_attention_heads, "num_attention_heads")
    ffn = _stride(big.intermediate_size, small.intermediate_size, "intermediate_size")
    hd = big.hidden_size // big.num_attention_heads
    H, h, I = big.num_attention_heads, big.hidden_size, big.intermediate_size

    def take(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(("layernorm.weight", "norm.weight")):  # every norm: [h]
            return t[hid]
        if name.endswith("linear_qkv.weight"):  # [H * 3 * hd, h], grouped per head
            return t.view(H, 3, hd, h)[heads][..., hid].reshape(-1, small.hidden_size)
        if name.endswith("linear_proj.weight"):  # [h, H * hd]
            return t[hid].view(small.hidden_size, H, hd)[:, heads].reshape(small.hidden_size, -1)
        if name.endswith("linear_fc1.weight"):  # [2 I, h]: activated half, linear half
            return t.view(2, I, h)[:, ffn][..., hid].reshape(-1, small.hidden_size)
        if name.endswith("linear_fc2.weight"):  # [h, I]
            return t[hid][:, ffn]
        if name == "embedding.word_embeddings.weight":  # [V, h]
            return t[:, hid]
        if name == "lm_head.dense.weight":  # [h, h]
            return t[hid][:, hid]
        if name == "output_layer.bias":  # [V]
            return t
        raise ConfigError(f"strided init: no rule for tensor {name!r} {tuple(t.shape)}")

    layers = layer_map(big.num_layers, small.num_layers)
    out: Dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not torch.is_tensor(t) or name.endswith("_extra_state"):
            continue
        m = _LAYER.match(name)
        if m is None:
            out[name] = take(name, t).clone()
            continue
        i, rest = int(m.group(1)), m.group(2)
        for j, src in enumerate(layers):
            if src == i:
                out[f"encoder.layers.{j}.{rest}"] = take(rest, t).clone()
    return out


def strided_checkpoint(src: str, save_dir: str, small: ModelConfig, overwrite: bool = False) -> Dict[str, object]:
    """Write ``save_dir``: the model ``small`` taken from the checkpoint ``src`` (any layout) by the
    strided rule, whole tensors at TP1/PP1 that load at any layout (a run's ``init.checkpoint``).
    Builds no model: tensors are read one at a time. Collective when torch.distributed is
    initialised (every rank calls it; rank 0 writes). Returns what it did."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_mmbert.checkpoints import dcp_io
    from megatron_mmbert.checkpoints.dcp_io import write_config
    from megatron_mmbert.checkpoints.layout import copy_tokenizer_files, tokenizer_dir
    from megatron_mmbert.checkpoints.tensors import DistSession, MegatronSource
    from megatron_mmbert.config_base import from_dict, to_dict
    from megatron_mmbert.fileio import check_output_dir, publish_directory, write_output_marker

    session = DistSession()  # the run's process group when there is one, else a private one
    rank = dist.get_rank()
    try:
        if rank == 0:
            save_dir = check_output_dir(save_dir, "strided-init", inputs=[src], overwrite=overwrite)
        save_dir = os.path.abspath(save_dir)
        source = MegatronSource(src, session)
        if not isinstance(source.config, dict) or "model" not in source.config:
            raise ConfigError(f"strided init: {src} records no model config (not a checkpoint of this project)")
        big = from_dict(ModelConfig, source.config["model"])
        check_models(big, small)
        state = {name: source.read(name) for name in source.infos}
        small_state = strided_state_dict(state, big, small)
        del state
        info = {"rule": RULE, "source": os.path.abspath(src), "layers": layer_map(big.num_layers, small.num_layers),
                "hidden_stride": big.hidden_size // small.hidden_size,
                "head_stride": big.num_attention_heads // small.num_attention_heads,
                "ffn_stride": big.intermediate_size // small.intermediate_size}
        tmp = f"{save_dir}.tmp-strided"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        sharded = {k: ShardedTensor.from_rank_offsets(k, t.contiguous(), replica_id=rank) for k, t in small_state.items()}
        dcp_io.install()
        dist_checkpointing.save(sharded, tmp)
        dist.barrier()
        if rank == 0:
            copy_tokenizer_files(tokenizer_dir(src), tokenizer_dir(tmp))
            write_config(tmp, {"model": to_dict(small), "strided_init": info})  # last: digests of every file
            write_output_marker(tmp, "strided-init", source=os.path.abspath(src))
            publish_directory(tmp, save_dir)
        dist.barrier()
        return info
    finally:
        session.close()


__all__ = ["RULE", "layer_map", "check_models", "strided_state_dict", "strided_checkpoint"]
