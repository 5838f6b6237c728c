"""``tools/ties_merge.py``: merge checkpoints with TIES, task arithmetic, linear averaging or EMA.

Examples::

    # mmBERT-base: TIES over the three decay runs, against the mid-training checkpoint
    tools/ties_merge.py --base ckpt/mid --models ckpt/decay_eng ckpt/decay_cont ckpt/decay_all \\
        --density 0.2 --lambda 1.0 --out ckpt/merged
    # mmBERT-small: exponentially weighted checkpoints along one decay run (oldest first)
    tools/ties_merge.py --method ema --ema-decay 0.9 --models ckpt/d/iter_1 ckpt/d/iter_2 ... --out ckpt/ema
    # inputs of both formats (megatron checkpoints, HF directories), written as an HF model
    tools/ties_merge.py --base ckpt/mid --models ckpt/decay_eng hf/decay_all --out-format hf --out merged_hf

See docs/merging.md for the algorithm, the memory bound and the report.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from megatron_mmbert.checkpoints.layout import CheckpointError
from megatron_mmbert.merge.stream import DEFAULT_CHUNK_BYTES, merge_checkpoints
from megatron_mmbert.merge.ties import METHODS, TRIM_MODES, MergeSpec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ties_merge",
        description="Merge model checkpoints (Megatron dist checkpoints at any TP/PP layout, or "
        "Hugging Face ModernBERT directories) one tensor at a time.",
    )
    p.add_argument("--base", help="checkpoint the models branched from (required for ties, task_arithmetic)")
    p.add_argument("--models", nargs="+", required=True, help="checkpoints to merge (ema: oldest first)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per model (default: all 1)")
    p.add_argument("--method", choices=METHODS, default="ties")
    p.add_argument("--density", type=float, default=None,
                   help="ties: fraction of each task vector kept by magnitude (default 1 = no trim)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0,
                   help="scale of the merged task vector added to the base")
    p.add_argument("--trim", choices=TRIM_MODES, default="per-tensor",
                   help="ties: top-density per tensor (mergekit) or over the whole model (paper code)")
    p.add_argument("--normalize", action="store_true",
                   help="ties: divide by the agreeing models' weight sum instead of their count; "
                   "task_arithmetic: divide by the weight sum")
    p.add_argument("--ema-decay", type=float, default=None, help="ema: decay factor D in (0, 1)")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--out-format", choices=("megatron", "hf"), default=None,
                   help="output checkpoint format (default: the base's, else the first model's); "
                   "inputs may mix formats")
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / 2**20,
                   help="largest block of a tensor processed at once, in MiB of float64 (the compute dtype; bounds memory)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a previous ties_merge output")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking megatron inputs' file sizes and SHA-256 against those recorded at save time")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not (math.isfinite(args.chunk_mb) and args.chunk_mb > 0):
        print(f"ties_merge: error: --chunk-mb must be a positive number, got {args.chunk_mb}", file=sys.stderr)
        return 2
    spec = MergeSpec(
        method=args.method, weights=args.weights,
        density=1.0 if args.density is None else args.density, lam=args.lam, trim=args.trim,
        normalize=args.normalize, ema_decay=args.ema_decay,
    )
    try:
        report = merge_checkpoints(
            args.base, args.models, spec, args.out, out_format=args.out_format,
            chunk_bytes=int(args.chunk_mb * 2**20), overwrite=args.overwrite,
            log=None if args.quiet else sys.stderr, verify=args.verify,
        )
    except (CheckpointError, ValueError, FileExistsError) as err:
        print(f"ties_merge: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only output, full disk, missing file: say which, no traceback
        print(f"ties_merge: error: {err.strerror or err}{': ' + str(err.filename) if err.filename else ''}", file=sys.stderr)
        return 1
    s = report["summary"]
    kept = ", ".join(f"{k:.3f}" for k in s["fraction_kept"])
    print(f"ties_merge: wrote {args.out} ({s['merged_params']} merged parameters; fraction kept per "
          f"model [{kept}]; sign-conflict rate {s['sign_conflict_rate']:.4f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
