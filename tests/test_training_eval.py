"""Evaluation during training on held-out data, checked against ``tools/evaluate.py``, and Weights &
Biases in offline mode across a resume.

One tiny three-phase run over a copy of the demo shards with a ``heldout/`` manifest beside them
(the folder preprocessing's ``--holdout-docs`` writes): the run stops cleanly after its first step
and is resumed to the end. The held-out manifest lacks the smallest language, so the decay phase
(all languages) reports it as skipped.
"""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from tests.helpers.launch import ROOT, check, launch
from tests.helpers.training import tiny_run_config

try:
    import wandb  # noqa: F401

    HAVE_WANDB = True
except ImportError:
    HAVE_WANDB = False


def _with_heldout(demo_shards: str, out: str) -> str:
    """A copy of the demo shards whose ``heldout/manifest.json`` holds every language but the
    smallest (its shards copied under ``heldout/``); returns the copy's training manifest."""
    from megatron_mmbert.data.shards import HELDOUT_DIR, Manifest, load_manifest, write_manifest

    shutil.copytree(demo_shards, out)
    train = load_manifest(out)
    smallest = min(train.languages, key=lambda lang: (train.languages[lang].tokens, lang))
    languages = {}
    for lang, entry in train.languages.items():
        if lang == smallest:
            continue
        shards = []
        for prefix in entry.shards:
            target = os.path.join(out, HELDOUT_DIR, lang, os.path.basename(prefix))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            for ext in (".bin", ".idx"):
                shutil.copyfile(prefix + ext, target + ext)
            shards.append(target)
        languages[lang] = type(entry)(**{**entry.__dict__, "shards": shards})
    write_manifest(Manifest(tokenizer=train.tokenizer, dtype=train.dtype, languages=languages),
                   os.path.join(out, HELDOUT_DIR, "manifest.json"))
    return os.path.join(out, "manifest.json")


@pytest.fixture(scope="module")
def heldout_run(demo_shards, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("heldout_run"))
    manifest = _with_heldout(demo_shards, os.path.join(root, "shards"))
    run = os.path.join(root, "run")
    sections = {"logging": {"eval_interval": 0}}
    if HAVE_WANDB:
        sections["logging"]["wandb"] = {"project": "mmbert-test", "mode": "offline", "tags": ["tiny"]}
    cfg = tiny_run_config(os.path.join(root, "run.yaml"), manifest, run, **sections)
    first = check(launch(cfg, "--checkpoint.exit_after_minutes", "0"))
    assert "stopping cleanly at step 1" in first.stdout
    second = check(launch(cfg))
    return root, manifest, run, first, second


def _evals(run: str):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


@pytest.mark.slow
def test_heldout_manifest_is_the_default_and_matches_evaluate(heldout_run):
    """Training evaluates on ``heldout/`` (and says so), per language of each phase at the phase's
    row length and mask rate; the decay-end numbers equal ``tools/evaluate.py`` on the phase-end
    checkpoint with the same seed and settings (the same rows and masks, another code path)."""
    root, manifest, run, _, second = heldout_run
    heldout = os.path.join(os.path.dirname(manifest), "heldout", "manifest.json")
    evals = _evals(run)
    assert [(e["step"], e["phase"]) for e in evals] == [(7, "pretrain"), (11, "mid"), (15, "decay")]
    assert all(e["held_out"] and e["manifest"] == heldout for e in evals)
    assert "not held out" not in second.stdout and f"held out: {heldout}" in second.stdout
    decay = evals[-1]
    assert (decay["seq_len"], decay["mask_rate"]) == (128, 0.3)
    from megatron_mmbert.data.shards import load_manifest

    sizes = load_manifest(manifest).languages
    smallest = min(sizes, key=lambda lang: (sizes[lang].tokens, lang))
    assert len(decay["languages"]) == 11 and decay["skipped"] == [smallest]
    assert "language(s) of phase 'decay' have no evaluation rows" in second.stdout

    out = os.path.join(root, "evaluate")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load",
         os.path.join(run, "checkpoints", "phase_end_decay"), "--manifest", os.path.dirname(heldout),
         "--size-manifest", manifest, "--out", out, "--seq-len", "128", "--mask-rate", "0.3",
         "--tokens-per-language", str(2 * 128), "--seed", "7", "--quiet"],
        env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tool = json.load(open(os.path.join(out, "eval.json")))
    assert set(tool["languages"]) == set(decay["languages"])
    for lang, r in decay["languages"].items():
        assert r["masked_tokens"] == tool["languages"][lang]["masked_tokens"], lang
        assert abs(r["loss"] - tool["languages"][lang]["loss"]) < 1e-4, (lang, r, tool["languages"][lang])
        assert abs(r["accuracy"] - tool["languages"][lang]["accuracy"]) < 1e-9, lang
    for g, r in tool["groups"].items():
        assert decay["groups"][g]["members"] == r["members"]
        assert abs(decay["groups"][g]["loss"] - r["loss"]) < 1e-4


def _wandb_records(path: str):
    """The protobuf records of a ``run-ID.wandb`` file (W&B's LevelDB-log framing: a 7-byte file
    header, then 32 KiB blocks of records, each a 7-byte header ``crc, length, type`` + data, a
    record split over blocks as first/middle/last pieces)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pieces, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(pieces)
            out.append(rec)
            pieces = b""
    return out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install 'megatron-mmbert[wandb]')")
def test_wandb_offline_resumes_the_same_run(heldout_run):
    """The run id kept in the run folder is reused by the resumed process; each W&B file holds the
    resolved config and the same scalars as TensorBoard / metrics.jsonl (train and eval)."""
    _, _, run, first, _ = heldout_run
    run_id = open(os.path.join(run, "wandb_run_id")).read().strip()
    files = sorted(glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"-{run_id}{os.sep}run-{run_id}.wandb") for f in files), files
    assert f"W&B run {run_id} (offline" in first.stdout
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    expected = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    eval_mean = {r["step"]: r["mean"]["loss"] for r in records if r["kind"] == "eval"}
    logged, evals = {}, {}
    for path in files:
        recs = _wandb_records(path)
        (config,) = [r.run.config for r in recs if r.WhichOneof("record_type") == "run"]
        items = {i.key: json.loads(i.value_json) for i in config.update}
        assert items["run_dir"] == run and items["logging"]["wandb"]["mode"] == "offline"
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                h = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                if "train/loss" in h:
                    logged[h["step"]] = h["train/loss"]
                if "eval/mean/loss" in h:
                    evals[h["step"]] = h["eval/mean/loss"]
    assert sorted(logged) == list(range(1, 16)) and sorted(expected) == list(range(1, 16))
    assert all(abs(logged[s] - expected[s]) < 1e-12 for s in expected), (logged, expected)
    assert evals == pytest.approx(eval_mean, abs=1e-12) and sorted(evals) == [7, 11, 15]


def test_capped_groups_keep_the_ends_and_the_middle():
    """20 per group of 100 languages: the 20 largest, 20 around the median, the 20 smallest."""
    from megatron_mmbert.evaluation.metrics import capped_groups, resource_groups

    sizes = {f"l{i:03d}": 1000 - i for i in range(100)}  # l000 largest
    groups = capped_groups(resource_groups(list(sizes), sizes), 20)
    assert groups["high"] == [f"l{i:03d}" for i in range(20)]
    assert groups["low"] == [f"l{i:03d}" for i in range(80, 100)]
    assert groups["mid"] == [f"l{i:03d}" for i in range(41, 61)]  # the middle tercile is l034..l067
    assert capped_groups(resource_groups(list(sizes), sizes), 0) == resource_groups(list(sizes), sizes)


def test_wandb_missing_names_the_extra(monkeypatch):
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.training.logging import require_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    with pytest.raises(ConfigError, match=r"megatron-mmbert\[wandb\]"):
        require_wandb()
