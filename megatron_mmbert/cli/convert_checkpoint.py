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
import logging
import os
import subprocess
import sys
from typing import Dict, List, Optional

from megatron_mmbert.cli.options import ConfigParser, config_yaml, load_yaml, run_reporting, tool_main, tool_parser
from megatron_mmbert.config import ConfigError
from megatron_mmbert.convert.config import ExportHfConfig, ImportHfConfig, StridedInitConfig, VerifyConfig


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
        if args.command == "export-hf":  # a push_to_hub the Hub would refuse was refused with the options
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
        from megatron_mmbert.convert.verify import verify

        return verify(cfg)

    return run_reporting(run, prefix=f"{PROG}: ", spec=spec)  # read-only output, full disk, missing file: say which, no traceback


if __name__ == "__main__":
    sys.exit(main())
