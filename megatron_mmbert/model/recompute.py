"""Activation recompute with megatron-core's own checkpoint, around our non-tensor attention inputs.

megatron-core offers two granularities (``TransformerConfig.recompute_granularity``; Megatron-LM
``--recompute-granularity``), both available as ``model.recompute``:

* ``selective``: each layer's core attention keeps no activations and runs again in the backward
  (``MMBertSelfAttention._checkpointed_attention_forward`` in ``model/attention.py``);
* ``full``: whole layers run again in the backward; only the input hidden states of each
  checkpointed chunk of layers are kept (:class:`MMBertTransformerBlock`). Which layers:
  ``recompute_method`` ``uniform`` (chunks of ``recompute_num_layers`` layers) or ``block`` (the
  first ``recompute_num_layers`` layers of each pipeline stage), megatron-core's names and meaning
  (``TransformerConfig.recompute_method`` / ``recompute_num_layers``; Megatron-LM
  ``--recompute-method`` / ``--recompute-num-layers``).

Both run ``megatron.core.tensor_parallel.checkpoint`` (``CheckpointFunction``: saves and replays the
CPU, CUDA and model-parallel RNG tracker states, so dropout masks repeat exactly), or TE's checkpoint
for FP8 layers, as megatron-core does. What differs from megatron-core's ``TransformerBlock``:

* megatron passes the attention mask (and rotary embedding) through the checkpoint as arguments,
  which ``CheckpointFunction`` keeps with ``save_for_backward`` -- tensors only. Ours is an
  :class:`~megatron_mmbert.model.attention.AttentionInputs` (per-kind masks, FlexAttention
  ``BlockMask`` s, rotary angles), built once per micro-batch and shared by every layer, so here it
  travels in the checkpointed function's closure; the only argument (and the only tensor kept) is
  the chunk's input hidden states. The closure holds the micro-batch's own inputs, so 1F1B pipeline
  schedules with several micro-batches in flight recompute each with its own.
* the recompute runs in the backward, outside the forward's ``torch.autocast`` (amp_bf16), which
  megatron's ``CheckpointFunction`` does not record: :func:`replaying_autocast` re-enters it, so the
  recomputed activations are bitwise the forward's.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_block import TransformerBlock


def replaying_autocast(fn: Callable, device_type: str) -> Callable:
    """``fn`` run under the autocast state in force now (on ``device_type``), whenever it is called:
    a checkpointed function recomputed in the backward then computes in the forward's dtypes."""
    enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

    def run(*args):
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return fn(*args)

    return run


class MMBertTransformerBlock(TransformerBlock):
    """megatron-core's ``TransformerBlock`` whose ``full`` recompute keeps the attention inputs in
    the checkpoint's closure (see the module docstring); everything else is megatron-core's."""

    def _checkpointed_forward(self, hidden_states, attention_mask, context, context_mask, rotary_pos_emb,
                              attention_bias, packed_seq_params, use_inner_quantization_context,
                              padding_mask=None):
        if context is not None or context_mask is not None:
            raise ValueError("MMBertTransformerBlock is an encoder: it has no cross-attention context")
        config = self.config

        def layers(start: int, end: int):
            def run(hidden):
                for index in range(start, end):
                    layer = self._get_layer(index)
                    with self._quantization_context(layer, use_inner_quantization_context):
                        hidden, _ = layer(
                            hidden_states=hidden, attention_mask=attention_mask, context=None,
                            context_mask=None, rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
                            inference_context=None, packed_seq_params=packed_seq_params,
                            padding_mask=padding_mask,
                        )
                return hidden

            return replaying_autocast(run, hidden_states.device.type)

        def checkpointed(run, hidden):
            if config.fp8 or config.fp4:  # megatron-core's choice: TE's checkpoint for FP8/FP4 layers
                from megatron.core.extensions.transformer_engine import te_checkpoint

                return te_checkpoint(run, config.distribute_saved_activations,
                                     tensor_parallel.random.get_cuda_rng_tracker, self.pg_collection.tp, hidden)
            return tensor_parallel.checkpoint(run, config.distribute_saved_activations, hidden)

        count, per = self.num_layers_per_pipeline_rank, config.recompute_num_layers
        if config.recompute_method == "uniform":
            # Chunks of ``per`` layers, each keeping only its input (the last chunk may be shorter:
            # megatron-core would index past the stage's layers there).
            for start in range(0, count, per):
                hidden_states = checkpointed(layers(start, min(start + per, count)), hidden_states)
        elif config.recompute_method == "block":
            # The first ``per`` layers of the stage recomputed, the rest keep their activations.
            # Under FP8/FP4 a layer whose input needs no gradient is not checkpointed (TE's
            # reentrant checkpoint needs one), as in megatron-core.
            skip = 0
            for index in range(count):
                if (config.fp8 or config.fp4) and not hidden_states.requires_grad:
                    skip += 1
                if skip <= index < per + skip:
                    hidden_states = checkpointed(layers(index, index + 1), hidden_states)
                else:
                    hidden_states = layers(index, index + 1)(hidden_states)
        else:
            raise ValueError(f"recompute_method {config.recompute_method!r}: uniform or block")
        return hidden_states

    def _quantization_context(self, layer, inner: bool):
        """The per-layer FP8/FP4 context megatron-core's block enters (non-delayed recipes)."""
        if not inner:
            return nullcontext()
        if self.config.fp8:
            from megatron.core.fp8_utils import get_fp8_context

            return get_fp8_context(self.config, layer.layer_number - 1)
        if self.config.fp4:
            from megatron.core.fp4_utils import get_fp4_context

            return get_fp4_context(self.config, layer.layer_number - 1)
        return nullcontext()
