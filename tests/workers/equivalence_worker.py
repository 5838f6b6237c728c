"""torchrun worker (4 processes): optimizer steps under several parallel layouts in turn.

argv: CKPT BATCHES_PT OUT_DIR [OPTIMIZER LAYOUT[,LAYOUT...]]; env LAYOUTS (comma-separated layouts
when argv names none, else a filter on argv's), PRECISION (fp32 | bf16 | amp_bf16; default fp32).
For each layout: load the same initial weights, take one step per global batch in BATCHES_PT (a list
of rows = one step, or {"steps": [rows, ...]}), each split over DP ranks, write the last step's
stats to OUT_DIR/<layout>.json and the updated weights as a checkpoint OUT_DIR/<layout>/.
OPTIMIZER: adamw (default; global clipping 1.0) or stable_adamw (no clipping).
"""

import dataclasses
import json
import os
import sys

import torch

LAYOUTS = {
    # name: (TP, PP, VPP, distributed optimizer[, sequence parallel[, overlap[, model.recompute]]]);
    # DP = 4 / (TP * PP)
    "tp2_dp2": (2, 1, None, False),
    "tp2_sp_dp2": (2, 1, None, False, True),
    "pp2_dp2_distopt": (1, 2, None, True),
    "tp2_pp2": (2, 2, None, False),
    "pp2_vpp2_dp2": (1, 2, 2, False),
    "dp4_distopt": (1, 1, None, True),
    "tp2_dp2_distopt": (2, 1, None, True),
    # megatron DDP's overlapped gradient reduce-scatter and parameter all-gather
    "dp4_distopt_overlap": (1, 1, None, True, False, True),
    # full activation recompute (one layer per checkpoint) under TP and PP
    "tp2_pp2_full_recompute": (2, 2, None, False, False, False, "full"),
}
DEFAULT = ["tp2_dp2", "tp2_sp_dp2", "pp2_dp2_distopt", "tp2_pp2", "pp2_vpp2_dp2", "dp4_distopt", "dp4_distopt_overlap",
           "tp2_pp2_full_recompute"]


def main():
    ckpt_dir, batches_path, out_dir = sys.argv[1:4]
    from megatron.core import parallel_state

    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.checkpoints import dist as ckpt
    from megatron_mmbert.training.config import OptimizerSection
    from megatron_mmbert.training.step import build_optimizer, finish_param_sync, train_step, wrap_ddp

    model = ckpt.read_model_config(ckpt_dir)
    data = torch.load(batches_path)  # global batches: one row per micro-batch
    steps = data["steps"] if isinstance(data, dict) else [data]
    optimizer_name = sys.argv[4] if len(sys.argv) > 4 else "adamw"
    only = os.environ.get("LAYOUTS")
    wanted = sys.argv[5].split(",") if len(sys.argv) > 5 else (only.split(",") if only else DEFAULT)
    precision = os.environ.get("PRECISION", "fp32")
    for name in wanted:
        tp, pp, vpp, distopt, *rest = LAYOUTS[name]
        sp, overlap, recompute = list(rest) + [False, False, "none"][len(rest):]
        if only and name not in only.split(","):
            continue
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp,
                                  use_distributed_optimizer=distopt, sequence_parallel=bool(sp),
                                  overlap_grad_reduce=bool(overlap), overlap_param_gather=bool(overlap))
        layout_model = dataclasses.replace(model, recompute=recompute)
        rt = runtime.initialize(layout_model, parallel, seed=7)
        chunks = build_model(layout_model, parallel, precision)
        ckpt.load_model(ckpt_dir, chunks)
        chunks = wrap_ddp(chunks, parallel, precision)
        clip = 1.0 if optimizer_name == "adamw" else 0.0
        optimizer = build_optimizer(chunks, OptimizerSection(name=optimizer_name, clip_grad=clip), parallel,
                                    lr=1e-3, weight_decay=0.1, precision=precision)
        for rows in steps:
            stats = train_step(chunks, optimizer, rows[rt.data_parallel_rank::rt.data_parallel_size])
        finish_param_sync(chunks)  # overlap_param_gather: the last update arrives at the next forward
        ckpt.save_model(os.path.join(out_dir, name), chunks, model)
        if rt.rank == 0:
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(dataclasses.asdict(stats), f)
        parallel_state.destroy_model_parallel()
    runtime.shutdown()


if __name__ == "__main__":
    main()
