"""``mmbert-convert`` (tools/convert_checkpoint.py): Hugging Face ModernBERT <-> megatron-mmbert checkpoints.

  import-hf --hf_dir DIR --save CKPT        HF ModernBertForMaskedLM -> dist checkpoint (any layout);
                                            DIR may be a Hub id org/name[@revision]
  export-hf --load CKPT --out DIR [--tokenizer PATH]
                                            dist checkpoint -> HF directory with its tokenizer
                                            (AutoModelForMaskedLM / AutoTokenizer load it)
            [--push_to_hub REPO [--private] [--revision BRANCH]]  then upload it with a model card
  strided-init --load BIG --save SMALL [--model mmbert-small]
                                            a smaller model's checkpoint from a larger one's by strided
                                            sampling (mmBERT-small from mmBERT-base; rule: convert/strided.py)
  verify    --hf_dir DIR --load CKPT [--tp N --pp M] [--attention_backend B] [--precision P]
            both models on random packed rows longer than the window; prints the max |logit diff|
            and exits 1 above --tolerance. With --tp/--pp > 1 it relaunches itself under torchrun.
            --attention_backend (auto | te | flash | flex | sdpa) and --precision (fp32 | bf16 |
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
from typing import Dict, List, Literal, Optional

import torch

from megatron_mmbert.cli.options import ConfigParser, config_yaml, load_yaml, run_reporting, tool_main, tool_parser
from megatron_mmbert.config import ConfigError


VERIFY_TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "amp_bf16": 0.25}
"""Default max |logit diff| against HF fp32. bf16 (amp_bf16's GEMMs and attention too) keeps 8
significant bits (relative rounding 2^-9 per operation); logits of a few units through a dozen or
more layers then differ by a few tenths at worst, while a wrong window, theta or weight differs by
whole units."""


@dataclasses.dataclass
class ImportHfConfig:
    """``import-hf``: an HF ModernBertForMaskedLM directory -> a megatron dist checkpoint."""

    hf_dir: str
    """HF model directory (config.json and safetensors weights)."""
    save: str
    """New output folder for the dist checkpoint (written atomically)."""
    overwrite: bool = False
    """Replace ``save`` if it is a previous import-hf output."""


@dataclasses.dataclass
class ExportHfConfig:
    """``export-hf``: a megatron dist checkpoint -> an HF directory that ``from_pretrained`` loads."""

    load: str
    """Dist checkpoint folder to export."""
    out: str
    """New output folder for the HF model (written atomically)."""
    overwrite: bool = False
    """Replace ``out`` if it is a previous export-hf output."""
    tokenizer: Optional[str] = None
    """Tokenizer to write with the model (folder, tokenizer.json or .model; default: the checkpoint's own)."""
    push_to_hub: Optional[str] = None
    """After the export, upload ``out`` with a generated model card to this Hub repo (``org/name``)."""
    private: bool = False
    """Create the ``push_to_hub`` repo private."""
    revision: Optional[str] = None
    """Branch of the ``push_to_hub`` repo to upload to (created if missing)."""
    verify: bool = True
    """Check the checkpoint's file sizes and SHA-256 against those recorded at save time."""


@dataclasses.dataclass
class VerifyConfig:
    """``verify``: compare HF and megatron logits on random packed rows longer than the window."""

    hf_dir: str
    """HF model directory (the reference, always run in fp32)."""
    load: str
    """Dist checkpoint folder of our model."""
    tp: int = 1
    """Tensor-parallel size (with tp * pp > 1 the tool relaunches itself under torchrun)."""
    pp: int = 1
    """Pipeline-parallel size."""
    rows: int = 2
    """Packed rows per batch."""
    seq_len: int = 0
    """Row length (0: 4 x the sliding window, at least 64)."""
    attention_backend: Optional[Literal["auto", "te", "flash", "flex", "sdpa"]] = None
    """Attention kernel (default: the checkpoint's model.attention_backend)."""
    precision: Literal["fp32", "bf16", "amp_bf16"] = "fp32"
    """Compute precision of our model (HF always runs fp32)."""
    tolerance: Optional[float] = None
    """Max |logit diff| allowed (default 1e-3 for fp32, 0.25 for bf16 and amp_bf16)."""
    seed: int = 0
    """Seed of the random rows and of model initialisation."""
    verify: bool = True
    """Check the checkpoint's file digests before loading."""


@dataclasses.dataclass
class StridedInitConfig:
    """``strided-init``: a smaller model's checkpoint from a larger one's by strided sampling of the
    weights (mmBERT-small from mmBERT-base; this project's rule: convert/strided.py)."""

    load: str
    """Checkpoint of the larger model (any layout)."""
    save: str
    """New output folder for the smaller model's checkpoint (loads at any layout)."""
    model: str = "mmbert-small"
    """The smaller model: a preset name (``mmbert-small``) or a YAML file of ModelConfig fields."""
    overwrite: bool = False
    """Replace ``save`` if it is a previous strided-init output."""


COMMANDS = {
    "import-hf": (ImportHfConfig, {}),
    "strided-init": (StridedInitConfig, {}),
    "export-hf": (ExportHfConfig, {"verify": "--no-verify"}),
    "verify": (VerifyConfig, {"verify": "--no-verify"}),
}
"""Each subcommand's typed config and the first release's spellings that were not its field names
(deprecated aliases, kept for one release)."""

PROG = "mmbert-convert"


def _parser() -> "tuple[argparse.ArgumentParser, Dict[str, ConfigParser]]":
    """The command line generated from each subcommand's config dataclass."""
    p = tool_parser(PROG, __doc__, raw=True)
    p.add_argument("--help-config", action="store_true", help="print every subcommand's options and exit")
    sub = p.add_subparsers(dest="command")
    specs = {}
    for name, (cls, flags) in COMMANDS.items():
        specs[name] = ConfigParser(cls, flags)
        specs[name].add_to(sub.add_parser(name, help=(cls.__doc__ or "").split(": ", 1)[-1]))
    return p, specs


def verify(args: VerifyConfig) -> int:
    from transformers import AutoModelForMaskedLM

    from megatron_mmbert import runtime
    from megatron_mmbert.config import ParallelConfig
    from megatron_mmbert.hub import resolve  # --hf-dir may be a Hub id
    from megatron_mmbert.model.build import build_model
    from megatron_mmbert.convert.verify import hf_logits_per_document, random_packed_batch
    from megatron_mmbert.model.pipeline import forward_logits
    from megatron_mmbert.checkpoints import dist as ckpt

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


@tool_main
def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, specs = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if args.help_config:
            print("\n\n".join(f"== {name} ==\n{spec.describe()}" for name, spec in specs.items()))
            return 0
        parser.error(f"give a subcommand: {', '.join(COMMANDS)}")
    spec = specs[args.command]
    if args.help_config:
        print(spec.describe())
        return 0
    try:
        cfg = spec.build(args, load_yaml(args.config) if args.config else {}, argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {spec.explain(exc)}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from megatron_mmbert.convert import checkpoints

    def run() -> int:
        if args.command == "import-hf":
            model = checkpoints.import_hf(cfg.hf_dir, cfg.save, overwrite=cfg.overwrite)
            print(f"imported {cfg.hf_dir} -> {cfg.save} ({model.num_parameters() / 1e6:.1f}M parameters)")
            return 0
        if args.command == "export-hf":
            if cfg.push_to_hub:  # a repo id the Hub would refuse: say so before exporting
                from megatron_mmbert.hub import check_repo_id

                check_repo_id(cfg.push_to_hub)
            checkpoints.export_hf(cfg.load, cfg.out, verify=cfg.verify, overwrite=cfg.overwrite,
                                  tokenizer=cfg.tokenizer)
            print(f"exported {cfg.load} -> {cfg.out}")
            if cfg.push_to_hub:
                from megatron_mmbert.hub import push_to_hub

                url = push_to_hub(cfg.out, cfg.push_to_hub, cfg.private, cfg.revision, source=cfg.load)
                print(f"pushed {cfg.out} -> {url}")
            return 0
        if args.command == "strided-init":
            from megatron_mmbert.config import load_model_config
            from megatron_mmbert.convert.strided import strided_checkpoint

            model = load_model_config(load_yaml(cfg.model) if cfg.model.endswith((".yaml", ".yml")) else cfg.model)
            info = strided_checkpoint(cfg.load, cfg.save, model, overwrite=cfg.overwrite)
            print(f"strided init {cfg.load} -> {cfg.save} ({model.num_parameters() / 1e6:.1f}M parameters; layers "
                  f"{info['layers']}, strides hidden {info['hidden_stride']}, heads {info['head_stride']}, "
                  f"FFN {info['ffn_stride']})")
            return 0
        if cfg.tp * cfg.pp > 1 and "WORLD_SIZE" not in os.environ:
            return _relaunch_under_torchrun(cfg, argv)
        return verify(cfg)

    return run_reporting(run, prefix=f"{PROG}: ", spec=spec)  # read-only output, full disk, missing file: say which, no traceback


if __name__ == "__main__":
    sys.exit(main())
