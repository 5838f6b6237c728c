"""torchrun worker: load a checkpoint at a TP/PP layout and write the last stage's logits.

argv: CKPT TP PP BATCHES_PT OUT_PT [VPP (0: none)] [BACKEND]

BACKEND ``flash`` builds with flash-attn's kernel replaced by its test reference (tests/helpers/model.py).
"""

import dataclasses
import os
import sys

import torch


def main():
    ckpt_dir, tp, pp, batches_path, out_path = sys.argv[1:6]
    vpp = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "0" else None
    backend = sys.argv[7] if len(sys.argv) > 7 else "sdpa"
    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.model.pipeline import forward_logits
    from megatron_mmbert.checkpoints import dist as ckpt

    if backend == "flash":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
        from tests.helpers.model import use_flash_reference

        use_flash_reference()
    model = dataclasses.replace(ckpt.read_model_config(ckpt_dir), attention_backend=backend)
    parallel = ParallelConfig(tensor_parallel=int(tp), pipeline_parallel=int(pp), virtual_pipeline=vpp)
    rt = runtime.initialize(model, parallel)
    chunks = build_model(model, parallel, training=False)
    ckpt.load_model(ckpt_dir, chunks)
    batches = torch.load(batches_path)
    logits = forward_logits(chunks, batches)
    if logits is not None and rt.tensor_parallel_rank == 0 and rt.data_parallel_rank == 0:
        torch.save(logits, out_path)
    runtime.shutdown()


if __name__ == "__main__":
    main()
