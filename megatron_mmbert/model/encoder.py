"""The mmBERT encoder: embedding + norm, megatron-core TransformerBlock, final norm, sparse MLM head.

Read top to bottom, the forward pass is ModernBERT's (HF ``ModernBertForMaskedLM``):

    x = LayerNorm(Embedding(tokens))                 # first pipeline stage
    x = TransformerBlock(x)                          # this stage's layers, final norm on the last
    h = x[masked positions]                          # sparse prediction: only labelled tokens
    logits = LayerNorm(GELU(Dense(h))) @ Embedding^T + decoder_bias   # vocab-parallel
    loss = cross_entropy(logits, labels)             # fused with the decoder, chunked

Activations are ``[s, b, h]`` as everywhere in megatron-core (``[s/tp, b, h]`` under sequence
parallelism). The head never sees unlabelled tokens, so no ``[tokens x vocab]`` tensor exists: with a
256k vocabulary that is the difference between fitting and not. Nor does ``[labelled x vocab]``: the
decoder and the (vocab-parallel) cross-entropy run a chunk of labelled tokens at a time
(``model/mlm_loss.py``). The decoder weight is the
embedding (tied through megatron's LanguageModule, which also keeps the copy on the last pipeline
stage in sync). Padded vocabulary rows are masked out of the softmax, so the loss equals HF's.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron_mmbert.config import ModelConfig
from megatron_mmbert.data.mlm import IGNORE_INDEX
from megatron_mmbert.model.attention import (
    FLEX_BLOCK,
    AttentionInputs,
    document_block_mask,
    flex_padded_tokens,
    local_kv_block,
    segment_masks,
)
from megatron_mmbert.model.layers import BiasFreeLayerNorm, RotaryTable
from megatron_mmbert.model.mlm_loss import VocabShard, chunked_cross_entropy
from megatron_mmbert.model.recompute import MMBertTransformerBlock
from megatron_mmbert.model.specs import PACKED_BACKENDS, Backend, block_spec


class MMBertEmbedding(MegatronModule):
    """Vocab-parallel token embedding followed by a bias-free LayerNorm (no position embedding).

    A MegatronModule so that its sharded state dict defers to VocabParallelEmbedding's (sharded
    over TP, padding-tolerant) instead of treating the table as one replicated tensor.
    """

    def __init__(self, config, padded_vocab_size: int, eps: float, dropout: float):
        super().__init__(config=config)
        self.sequence_parallel = config.sequence_parallel
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            padded_vocab_size,
            config.hidden_size,
            init_method=config.embedding_init_method,
            reduce_scatter_embeddings=config.sequence_parallel,
            config=config,
        )
        self.norm = BiasFreeLayerNorm(config, config.hidden_size, eps)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens)  # [b, s, h], or [s/tp, b, h] reduce-scattered under SP
        if not self.sequence_parallel:
            x = x.transpose(0, 1).contiguous()
        x = self.norm(x)
        if self.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.dropout(x)
        return self.dropout(x)


class MMBertLMHead(torch.nn.Module):
    """dense (no bias) -> exact GELU -> bias-free LayerNorm; replicated on every TP rank."""

    def __init__(self, config, eps: float):
        super().__init__()
        self.dense = torch.nn.Linear(
            config.hidden_size, config.hidden_size, bias=False, dtype=config.params_dtype
        )
        config.init_method(self.dense.weight)
        self.norm = BiasFreeLayerNorm(copy.copy(config), config.hidden_size, eps)
        self.norm.weight.sequence_parallel = False  # applied after the sequence gather

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(hidden)))


class MMBertModel(LanguageModule):
    """One pipeline chunk of the encoder (the whole model when pipeline_parallel == 1)."""

    def __init__(
        self,
        config,
        model_config: ModelConfig,
        backend: Backend = "sdpa",
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(config=config)
        self.model_config = model_config
        # amp_bf16 (mmBERT's Composer amp_bf16): fp32 parameters, the forward under autocast, so
        # GEMMs/attention run in bf16 while the residual stream (embedding norm output + every
        # residual add) stays fp32. None: the parameters' dtype throughout (fp32, or bf16 under
        # megatron's Float16Module).
        self.autocast_dtype = autocast_dtype
        self.backend = backend
        self.flex_tokens: Optional[int] = None  # set_flex_tokens
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = True
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look for
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.padded_vocab_size = model_config.padded_vocab_size(self.tp_size)
        self.vocab_size = model_config.vocab_size

        if pre_process:
            self.embedding = MMBertEmbedding(
                config, self.padded_vocab_size, model_config.norm_eps, model_config.embedding_dropout
            )
        self.global_rotary = RotaryTable(model_config.head_dim, model_config.global_rope_theta)
        self.local_rotary = RotaryTable(model_config.head_dim, model_config.local_rope_theta)
        self.encoder = MMBertTransformerBlock(  # megatron-core's, with full recompute around our masks
            config=config,
            spec=block_spec(config, backend, model_config.mlp_dropout, vp_stage),
            post_layer_norm=True,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.lm_head = MMBertLMHead(config, model_config.norm_eps)
            head_config = copy.copy(config)
            head_config.sequence_parallel = False  # the head runs on gathered, selected tokens
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.padded_vocab_size,
                config=head_config,
                init_method=config.init_method,
                bias=True,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process,
            )
            with torch.no_grad():
                self.output_layer.bias.zero_()
        self.loss_chunk_rows: Optional[int] = None
        """Labelled tokens per chunk of the fused decoder + cross-entropy (None: about 32 Mi logits
        per chunk, ``model/mlm_loss.py``)."""
        self.setup_embeddings_and_output_layer()
        self._mark_vocab_padding()

    def _mark_vocab_padding(self) -> None:
        """Record on each vocab-parallel parameter how many of its elements are real vocabulary
        rows (``unpadded_numel``): StableAdamW's per-tensor statistic leaves the always-zero padded
        rows out, so it is the same at every TP size (``training/stable_adamw.py``)."""
        per_rank = self.padded_vocab_size // self.tp_size
        rank = parallel_state.get_tensor_model_parallel_rank()
        valid_rows = max(0, min(per_rank, self.vocab_size - rank * per_rank))
        params = [self.embedding.word_embeddings.weight] if self.pre_process else []
        if self.post_process:
            params.append(self.output_layer.bias)
            if self.output_layer.weight is not None:  # the last stage's copy of the tied table (PP > 1)
                params.append(self.output_layer.weight)
        for p in params:
            p.unpadded_numel = valid_rows * (p.numel() // per_rank)

    def _set_attention_backend(self) -> None:
        """Only a TE model sets TE's ``NVTE_*`` kernel switches (SDPA reads none of them).

        megatron-core's version writes them for every model and asserts against values an earlier
        model set, so building an SDPA model and then a TE one in one process (verify, tests) fails.
        """
        from megatron.core.transformer.enums import AttnBackend

        from megatron_mmbert.model.backends import set_te_environment

        if self.config.attention_backend != AttnBackend.local:
            set_te_environment(self.config.attention_backend.name)

    # -- settings that change between phases ------------------------------------------------
    def set_rope_theta(self, global_theta: float, local_theta: float) -> None:
        """Switch RoPE bases (mmBERT: 10k in pre-training, 160k from mid-training on)."""
        self.global_rotary.set_theta(global_theta)
        self.local_rotary.set_theta(local_theta)

    def set_flex_tokens(self, tokens: Optional[int]) -> None:
        """FlexAttention runs every micro-batch at ``tokens`` packed tokens (or a multiple): the
        training loop sets its micro-batch (``micro_batch_size * seq_len``) per phase, so evaluation
        and short micro-batches reuse the training kernels (``attention.flex_padded_tokens``). Other
        backends ignore it."""
        self.flex_tokens = tokens

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.encoder.set_input_tensor(input_tensor)

    # -- forward ----------------------------------------------------------------------------
    def attention_inputs(self, positions, cu_seqlens, max_seqlen) -> tuple:
        """Masks and rotary angles for SDPA, or ``PackedSeqParams`` and angles for the THD path (TE,
        flash-attn, FlexAttention; flex also gets one ``BlockMask`` per layer kind, built here once
        per micro-batch and shared by every layer of that kind)."""
        if self.backend in PACKED_BACKENDS:
            packed_positions = positions.reshape(1, -1)  # THD token order: row after row
            cu = cu_seqlens.to(device=positions.device, dtype=torch.int32)
            masks = (None, None)
            if self.backend == "flex":
                total = positions.numel()
                padded = flex_padded_tokens(total, self.flex_tokens)
                # Local layers: 128-query x 64-key blocks where verified (256 keys read per query
                # block for a +-64 window instead of 384); model.local_attention_block chooses.
                local_block = (FLEX_BLOCK, local_kv_block(self.model_config.local_attention_block, positions.device))
                masks = (
                    document_block_mask(cu, total, None, padded_total=padded),
                    document_block_mask(cu, total, self.model_config.local_attention // 2, block=local_block,
                                        padded_total=padded),
                )
            inputs = AttentionInputs(
                *masks, self.global_rotary(packed_positions), self.local_rotary(packed_positions)
            )
            packed = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                max_seqlen_q=int(max_seqlen),
                max_seqlen_kv=int(max_seqlen),
            )
            return inputs, packed
        global_mask, local_mask = segment_masks(cu_seqlens, positions, self.model_config.local_attention)
        inputs = AttentionInputs(
            global_mask, local_mask, self.global_rotary(positions), self.local_rotary(positions)
        )
        return inputs, None

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        labels: Optional[torch.Tensor] = None,
        return_logits: bool = False,
        mlm_stats: Optional[Dict[str, torch.Tensor]] = None,
        label_index: Optional[torch.Tensor] = None,
        loss_reduction: str = "none",
    ) -> torch.Tensor:
        """Run this chunk on a micro-batch (see docs/interfaces.md "Batch").

        Returns, on the last pipeline stage: the per-token cross-entropy of the labelled tokens
        (``[n]``, in ``s``-major order) when ``labels`` is given, or its sum with
        ``loss_reduction="sum"`` (training: the head's gradient is then computed in the forward,
        ``model/mlm_loss.py``); with ``return_logits`` the logits of every token ``[b, s, vocab]``
        (TP-gathered, padding removed; for parity checks and export verification only). Other
        stages return their hidden states for the next stage. ``label_index`` (:func:`labelled_token_index`
        of the CPU labels, on the device) saves finding the labelled tokens on the device, a host
        sync. ``mlm_stats``, if given, receives ``correct``: the number of labelled tokens whose
        argmax prediction equals the label (no gradient).
        """
        args = (tokens, positions, cu_seqlens, max_seqlen, labels, return_logits, mlm_stats, label_index,
                loss_reduction)
        if self.autocast_dtype is None:
            return self._forward(*args)
        device_type = self.global_rotary.inv_freq.device.type
        with torch.autocast(device_type=device_type, dtype=self.autocast_dtype):
            return self._forward(*args)

    def _forward(self, tokens, positions, cu_seqlens, max_seqlen, labels, return_logits, mlm_stats,
                 label_index, loss_reduction):
        inputs, packed = self.attention_inputs(positions, cu_seqlens, max_seqlen)
        hidden = None
        if self.pre_process:
            # THD (TE) runs on one packed "row" of all b*s tokens: [t, 1, h].
            hidden = self.embedding(tokens.reshape(1, -1) if packed is not None else tokens)
        hidden = self.encoder(
            hidden_states=hidden, attention_mask=inputs, packed_seq_params=packed
        )
        if not self.post_process:
            return hidden

        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        b, s = tokens.shape
        hidden = hidden.reshape(s, b, -1) if packed is None else hidden.reshape(b, s, -1).transpose(0, 1)
        hidden = hidden.reshape(s * b, -1)  # s-major token order
        if return_logits:
            logits, _ = self.output_layer(
                self.lm_head(hidden), weight=self.shared_embedding_or_output_weight()
            )
            logits = self._mask_vocab_padding(logits)
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return full[:, : self.vocab_size].reshape(s, b, -1).transpose(0, 1)

        if labels is None:
            raise ValueError("forward needs labels (training) or return_logits=True")
        if label_index is None:
            label_index = labelled_token_index(labels)  # on a device: a host sync
        selected = hidden.index_select(0, label_index)  # [n, h]: the only tokens the head ever sees
        target = labels.t().reshape(-1).index_select(0, label_index)
        head_in = tensor_parallel.copy_to_tensor_model_parallel_region(self.lm_head(selected))
        per_rank = self.padded_vocab_size // self.tp_size
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        shard = VocabShard(
            start=start,
            valid=max(0, min(per_rank, self.vocab_size - start)),
            group=parallel_state.get_tensor_model_parallel_group() if self.tp_size > 1 else None,
        )
        loss, correct = chunked_cross_entropy(
            head_in, self.shared_embedding_or_output_weight(), self.output_layer.bias, target, shard,
            chunk_rows=self.loss_chunk_rows, reduction=loss_reduction, count_correct=mlm_stats is not None,
        )
        if mlm_stats is not None:
            mlm_stats["correct"] = correct
        return loss

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Give the padded vocabulary rows (only on the last TP rank) no probability."""
        per_rank = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        if start + per_rank <= self.vocab_size:
            return logits
        ids = torch.arange(start, start + per_rank, device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, torch.finfo(logits.dtype).min)


def labelled_token_index(labels: torch.Tensor) -> torch.Tensor:
    """Indices of the labelled tokens of ``labels [b, s]`` in the model's ``s``-major token order
    (what :meth:`MMBertModel.forward` takes as ``label_index``). Run it on the CPU batch: on a
    device it is a host sync."""
    return (labels.t().reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
