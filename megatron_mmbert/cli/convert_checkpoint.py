"""tools/convert_checkpoint.py: Hugging Face ModernBERT <-> megatron-mmbert checkpoints.

  import-hf --hf-dir DIR --save CKPT        HF ModernBertForMaskedLM -> dist checkpoint (any layout);
                                            DIR may be a Hub id org/name[@revision]
  export-hf --load CKPT --out DIR           dist checkpoint -> HF directory (from_pretrained loads it)
            [--push-to-hub REPO [--private] [--revision BRANCH]]  then upload it with a model card
  verify    --hf-dir DIR --load CKPT [--tp N --pp M] [--attention-backend B] [--precision P]
            both models on random packed rows longer than the window; prints the max |logit diff|
            and exits 1 above --tolerance. With --tp/--pp > 1 it relaunches itself under torchrun.
            --attention-backend (auto | te | flash | flex | sdpa) and --precision (fp32 | bf16 |
            amp_bf16) check any kernel at any precision against HF (fp32) in one command; bf16 runs
            through megatron-core's Float16Module and amp_bf16 under autocast, as training does, and
            their default tolerance is wider.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
from typing import List, Optional

import torch

from megatron_mmbert.config import ConfigError
from megatron_mmbert.fileio import OutputRefused


VERIFY_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "amp_bf16": 0.25}
"""Default max |logit diff| against HF fp32. bf16 (amp_bf16's GEMMs and attention too) keeps 8
significant bits (relative rounding 2^-9 per operation); logits of a few units through a dozen or
more layers then differ by a few tenths at worst, while a wrong window, theta or weight differs by
whole units."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF ModernBERT directory -> megatron dist checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True, help="new output folder")
    imp.add_argument("--overwrite", action="store_true", help="replace SAVE if it is a previous import-hf output")
    exp = sub.add_parser("export-hf", help="megatron dist checkpoint -> HF directory")
    exp.add_argument("--load", required=True)
    exp.add_argument("--out", required=True, help="new output folder")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT if it is a previous export-hf output")
    exp.add_argument("--push-to-hub", metavar="REPO", help="then upload OUT (with a model card) to the Hub repo org/name")
    exp.add_argument("--private", action="store_true", help="create the --push-to-hub repo private")
    exp.add_argument("--revision", help="--push-to-hub to this branch (created if missing)")
    exp.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip checking the checkpoint's file sizes and SHA-256 against those recorded at save time")
    ver = sub.add_parser("verify", help="compare HF and megatron logits on random packed inputs")
    ver.add_argument("--hf-dir", required=True)
    ver.add_argument("--load", required=True)
    ver.add_argument("--tp", type=int, default=1)
    ver.add_argument("--pp", type=int, default=1)
    ver.add_argument("--rows", type=int, default=2, help="packed rows per batch")
    ver.add_argument("--seq-len", type=int, default=0, help="row length (default: 4 x window, >= 64)")
    ver.add_argument("--attention-backend", choices=["auto", "te", "flash", "flex", "sdpa"], default=None,
                     help="attention kernel (default: the checkpoint's model.attention_backend)")
    ver.add_argument("--precision", choices=["fp32", "bf16", "amp_bf16"], default="fp32",
                     help="compute precision of our model (HF always runs fp32)")
    ver.add_argument("--tolerance", type=float, default=None,
                     help=f"max |logit diff| allowed (default {VERIFY_TOLERANCE['fp32']:g} fp32, "
                          f"{VERIFY_TOLERANCE['bf16']:g} bf16 and amp_bf16)")
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip checking the checkpoint's file digests before loading")
    return p


def verify(args) -> int:
    from transformers import AutoModelForMaskedLM

    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig
    from megatron_mmbert.hub import resolve  # --hf-dir may be a Hub id
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.convert.verify import hf_logits_per_document, random_packed_batch
    from megatron_mmbert.model.pipeline import forward_logits
    from megatron_mmbert.training import checkpoint as ckpt

    model = ckpt.read_model_config(args.load)
    if args.attention_backend:
        model = dataclasses.replace(model, attention_backend=args.attention_backend)
    tolerance = VERIFY_TOLERANCE[args.precision] if args.tolerance is None else args.tolerance
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    rt = runtime.initialize(model, parallel, seed=args.seed)
    chunks = build_model(model, parallel, args.precision, training=False)
    ckpt.load_model(args.load, chunks, verify=args.verify)
    backend = chunks[0].backend
    if args.precision == "bf16":  # as training runs it: bf16 weights, fp32 RoPE, fp32 logits
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    seq_len = args.seq_len or max(64, 4 * model.local_attention)
    batch = random_packed_batch(model.vocab_size, args.rows, seq_len, args.seed)
    ours = forward_logits(chunks, [batch])
    verdict = torch.zeros(2, dtype=torch.float64)  # [max diff, compared?]
    if ours is not None and rt.tensor_parallel_rank == 0 and rt.data_parallel_rank == 0:
        hf_model = AutoModelForMaskedLM.from_pretrained(resolve(args.hf_dir), attn_implementation="eager").float().eval()
        reference = hf_logits_per_document(hf_model, batch)
        if reference.shape != ours[0].shape:
            raise ConfigError(f"logit shapes differ: HF {tuple(reference.shape)} vs ours {tuple(ours[0].shape)}")
        verdict[0] = (ours[0].float() - reference).abs().max().item()
        verdict[1] = 1
    torch.distributed.all_reduce(verdict)
    runtime.shutdown()
    diff = verdict[0].item()
    ok = diff <= tolerance
    if rt.rank == 0:
        print(
            f"verify: max |logit diff| = {diff:.3e} over {args.rows} rows x {seq_len} tokens "
            f"(window {model.local_attention}) at TP{args.tp}/PP{args.pp}, {backend} "
            f"attention, {args.precision}: {'OK' if ok else 'FAIL'} (tolerance {tolerance:g})"
        )
    return 0 if ok else 1


def _relaunch_under_torchrun(args, argv: List[str]) -> int:
    nproc = args.tp * args.pp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "megatron_mmbert.cli.convert_checkpoint", *argv]
    return subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from megatron_mmbert.convert import checkpoints

    try:
        if args.command == "import-hf":
            model = checkpoints.import_hf(args.hf_dir, args.save, overwrite=args.overwrite)
            print(f"imported {args.hf_dir} -> {args.save} ({model.num_parameters() / 1e6:.1f}M parameters)")
            return 0
        if args.command == "export-hf":
            checkpoints.export_hf(args.load, args.out, verify=args.verify, overwrite=args.overwrite)
            print(f"exported {args.load} -> {args.out}")
            if args.push_to_hub:
                from megatron_mmbert.hub import push_to_hub

                url = push_to_hub(args.out, args.push_to_hub, args.private, args.revision, source=args.load)
                print(f"pushed {args.out} -> {url}")
            return 0
        if args.tp * args.pp > 1 and "WORLD_SIZE" not in os.environ:
            return _relaunch_under_torchrun(args, argv)
        return verify(args)
    except (ConfigError, OutputRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # read-only output, full disk, missing file: say which, no traceback
        print(f"error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
