"""Helpers for the training tests: a tiny three-phase run config over the demo shards, reading
metrics and comparing checkpoints (``launch``/``check``, re-exported here, are tests/helpers/launch.py's)."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List

import yaml

# The launcher lives in tests/helpers/launch.py; these names stay importable from here.
from tests.helpers.launch import ROOT, check, launch, run_process, subprocess_env

_env = subprocess_env  # the older name


def tiny_run_config(path: str, manifest: str, run_dir: str, **sections) -> str:
    """A 15-step run: pretrain 7 steps (batch warmup 4 -> 8 rows) at 64 tokens, mid and decay 4
    steps each at 128 tokens; checkpoints every 2 steps; a log line every step."""
    cfg = {
        "run_dir": run_dir, "seed": 7, "precision": "fp32",
        "model": {"preset": "tiny", "num_layers": 2},
        "data": {"manifest": manifest, "cache_dir": os.path.join(os.path.dirname(path), "index-cache")},
        "phases": [
            {"name": "pretrain", "tokens": 3072, "seq_len": 64, "mask_rate": 0.3, "languages": "top:6",
             "temperature": 0.7, "global_rope_theta": 10000.0, "local_rope_theta": 10000.0},
            {"name": "mid", "tokens": 2048, "seq_len": 128, "mask_rate": 0.15, "languages": "top:10",
             "temperature": 0.5, "global_batch_size": 4, "global_rope_theta": 160000.0,
             "local_rope_theta": 160000.0},
            {"name": "decay", "tokens": 2048, "seq_len": 128, "mask_rate": 0.3, "mask_rate_end": 0.05,
             "languages": "all", "temperature": 0.3, "global_batch_size": 4},
        ],
        "schedule": {"total_tokens": 7168, "phases": {
            "pretrain": {"lr": 3.0e-3, "warmup_tokens": 1024}, "mid": {"lr": 3.0e-3},
            "decay": {"lr": 3.0e-3, "decay_tokens": 2048}}},
        "batch": {"global_batch_size": 8, "micro_batch_size": 2, "rampup_start_rows": 4,
                  "rampup_increment_rows": 4, "rampup_tokens": 512},
        "checkpoint": {"every_steps": 2, "keep_last": 20},
        "logging": {"interval": 1, "eval_rows_per_language": 2},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


# The shared session run (``tiny_run`` in tests/conftest.py): the tiny config plus an evaluation every
# 5 steps and a NaN gradient at step 3 that nan_policy ``skip`` drops -- what its read-only checks
# look at (tests/test_training_run.py) -- and nothing else changed.
TINY_RUN_SECTIONS = {"logging": {"eval_interval": 5}, "train": {"nan_policy": "skip"},
                     "debug": {"nan_grad_at_steps": [3]}, "profiling": {"steps": [2], "memory_snapshot": True}}


@dataclass(frozen=True)
class FinishedRun:
    """A finished run: its folder, config file, manifest, the sections given to tiny_run_config,
    and the launch that ran it (stdout, stderr)."""

    root: str
    run_dir: str
    config: str
    manifest: str
    sections: dict
    proc: subprocess.CompletedProcess


def finished_tiny_run(root: str, manifest: str) -> FinishedRun:
    """Train the shared tiny three-phase run to its end under ``root`` (one process)."""
    import copy

    sections = copy.deepcopy(TINY_RUN_SECTIONS)
    run_dir = os.path.join(root, "run")
    config = tiny_run_config(os.path.join(root, "run.yaml"), manifest, run_dir, **copy.deepcopy(sections))
    return FinishedRun(root, run_dir, config, manifest, sections, check(launch(config)))


def train_records(run_dir: str) -> List[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def compare_checkpoints(reference: str, others: List[str]) -> Dict[str, List[str]]:
    """Names of model tensors that differ (bitwise) between ``reference`` and each of ``others``."""
    code = (
        "import json, sys, torch\n"
        "from megatron_mmbert.convert.checkpoints import load_canonical\n"
        "_, ref = load_canonical(sys.argv[1])\n"
        "out = {}\n"
        "for d in sys.argv[2:]:\n"
        "    _, sd = load_canonical(d)\n"
        "    out[d] = [k for k in ref if not torch.equal(ref[k], sd[k])]\n"
        "print('RESULT', json.dumps(out))\n"
    )
    proc = check(run_process([sys.executable, "-c", code, reference, *others], timeout=300))
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def checkpoint_file_differences(reference: str, other: str) -> List[str]:
    """Files of checkpoint ``other`` that differ from ``reference``'s (missing or extra ones too).
    Byte for byte, but for what every save draws anew: ``.metadata``'s ``storage_meta`` (the save's
    uuid and temporary folder) and ``mmbert_config.json``'s ``saved_at`` and ``.metadata`` digest."""
    from megatron_mmbert.checkpoints import dcp_io

    def metadata(path):
        with open(path, "rb") as f:
            meta = dcp_io.load_metadata(f, path)
        meta.storage_meta = None
        return meta

    def config(path):
        with open(path) as f:
            record = json.load(f)
        record.pop("saved_at", None)
        record.get("files", {}).pop(".metadata", None)
        return record

    names = sorted(set(os.listdir(reference)) | set(os.listdir(other)))
    differ = []
    for name in names:
        a, b = os.path.join(reference, name), os.path.join(other, name)
        if not (os.path.isfile(a) and os.path.isfile(b)):
            if os.path.isdir(a) and os.path.isdir(b):
                differ += [f"{name}/{d}" for d in checkpoint_file_differences(a, b)]
            else:
                differ.append(name)
        elif name == ".metadata":
            differ += [] if metadata(a) == metadata(b) else [name]
        elif name == "mmbert_config.json":
            differ += [] if config(a) == config(b) else [name]
        else:
            with open(a, "rb") as fa, open(b, "rb") as fb:
                differ += [] if fa.read() == fb.read() else [name]
    return differ


def write_manifest(directory, languages=("fra_Latn", "deu_Latn", "rus_Cyrl")) -> str:
    """A small real manifest: ``languages`` (three by default) of random tokens in megatron-core
    MMIDIDX shards."""
    import numpy as np

    from megatron_mmbert.data.shards import LanguageEntry, Manifest, ShardWriter, TokenizerIdentity
    from megatron_mmbert.data.shards import write_manifest as write

    directory = str(directory)
    rng = np.random.default_rng(0)
    langs = {}
    for lang in languages:
        prefix = os.path.join(directory, lang, "part-0")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        docs = [rng.integers(5, 4096, size=int(n)).astype(np.uint16) for n in rng.integers(20, 300, size=40)]
        with ShardWriter(prefix, np.uint16) as w:
            for d in docs:
                w.add_document(d.tolist())
            w.finalize()
        langs[lang] = LanguageEntry(shards=[prefix], documents=len(docs), tokens=int(sum(map(len, docs))),
                                    bytes=0, sources=[])
    tok = TokenizerIdentity(name="random", vocab_size=4096, hash="0",
                            special_ids={"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4},
                            all_special_ids=[0, 1, 2, 3, 4])
    path = os.path.join(directory, "manifest.json")
    write(Manifest(tokenizer=tok, dtype="uint16", languages=langs), path)
    return path
