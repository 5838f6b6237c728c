"""Model sources for evaluation: a megatron-mmbert checkpoint at any TP/PP layout, or a Hugging
Face ModernBERT directory. Both return full-vocabulary logits per batch, scored by
``metrics.mlm_sums``."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from megatron_mmbert.config_base import ConfigError


def checkpoint_kind(path: str) -> str:
    """``"megatron"`` (a checkpoint of ours) or ``"hf"`` (a Hugging Face model directory)."""
    from megatron_mmbert.checkpoints import layout

    if os.path.isdir(path) and layout.is_complete(path):
        return "megatron"
    return layout.detect_format(path)


def check_modernbert(path: str) -> None:
    """Refuse an HF folder that is not a ``ModernBertForMaskedLM`` (another architecture would score a
    different model's loss, and one with ``auto_map`` asks to run its own code)."""
    import json

    from megatron_mmbert.checkpoints.layout import HF_CONFIG

    try:
        with open(os.path.join(path, HF_CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{os.path.join(path, HF_CONFIG)}: unreadable ({exc})", field="hf_dir") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "modernbert" or "auto_map" in config:
        what = f"model_type {model_type!r}" + (" with auto_map (its own code)" if "auto_map" in config else "")
        raise ConfigError(f"{path} is not a ModernBERT masked-LM folder ({what}); evaluate scores ModernBERT "
                          "models only (a checkpoint of ours, or its export-hf folder)", field="hf_dir")


def load_megatron(path: str, tp: int, pp: int, seed: int, verify: bool = True):
    """``(chunks, model config, runtime)`` of a checkpoint loaded at the TP/PP layout, in eval mode.

    The one adapter onto checkpoint loading (the same calls as ``convert_checkpoint.py verify``);
    the process group is initialised once and kept for the next model (``runtime.shutdown`` at exit)."""
    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.checkpoints import dist as ckpt

    model = ckpt.read_model_config(path)
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    rt = runtime.initialize(model, parallel, seed=seed)
    chunks = build_model(model, parallel, "fp32", training=False)
    ckpt.load_model(path, chunks, verify=verify)
    for chunk in chunks:
        chunk.eval()
    return chunks, model, rt


class MegatronScorer:
    """Logits of a megatron checkpoint; only the last pipeline stage's TP rank 0 reports them."""

    def __init__(self, path: str, tp: int, pp: int, seed: int, verify: bool = True):
        from megatron.core import parallel_state

        self.chunks, self.model, self.rt = load_megatron(path, tp, pp, seed, verify)
        self.vocab_size = self.model.vocab_size
        self.reports = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                        and parallel_state.get_tensor_model_parallel_rank() == 0)
        self.dp_rank, self.dp_size = self.rt.data_parallel_rank, self.rt.data_parallel_size
        self.device = self.rt.device

    def logits(self, batch: Dict) -> Optional[torch.Tensor]:
        from megatron_mmbert.model.pipeline import forward_logits

        out = forward_logits(self.chunks, [batch])
        return out[0] if (out is not None and self.reports) else None

    def close(self) -> None:
        del self.chunks


class HFScorer:
    """Logits of a Hugging Face ``ModernBertForMaskedLM`` (fp32, eager attention), each packed
    document run on its own (HF has no packing), as ``convert_checkpoint.py verify`` runs it."""

    reports = True
    dp_rank, dp_size = 0, 1

    def __init__(self, path: str):
        from transformers import AutoModelForMaskedLM

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("a Hugging Face model is evaluated in one process; run without torchrun")
        check_modernbert(path)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        # trust_remote_code=False: a folder asking for its own code is refused, never prompted about.
        self.model = AutoModelForMaskedLM.from_pretrained(path, attn_implementation="eager",
                                                          trust_remote_code=False).float().eval()
        self.model.to(self.device)
        self.vocab_size = int(self.model.config.vocab_size)

    def logits(self, batch: Dict) -> torch.Tensor:
        from megatron_mmbert.convert.verify import hf_logits_per_document

        return hf_logits_per_document(self.model, dict(batch, tokens=batch["tokens"].to(self.device))).cpu()

    def close(self) -> None:
        del self.model


def open_scorer(path: str, kind: str, tp: int, pp: int, seed: int, verify: bool = True):
    if kind == "megatron":
        return MegatronScorer(path, tp, pp, seed, verify)
    if tp * pp > 1:
        raise ConfigError(f"{path} is a Hugging Face model: tp and pp apply to megatron checkpoints only "
                          f"(got tp={tp}, pp={pp})", field="tp" if tp > 1 else "pp")
    return HFScorer(path)


def all_reduce(t: torch.Tensor, device) -> torch.Tensor:
    """Sum over the world (a no-op in a single process without a group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.to(device)
        torch.distributed.all_reduce(t)
        return t.cpu()
    return t


__all__: List[str] = ["check_modernbert", "checkpoint_kind", "load_megatron", "MegatronScorer", "HFScorer", "open_scorer", "all_reduce"]
