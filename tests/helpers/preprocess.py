"""Helpers for the preprocessing tests: shards read back through megatron-core's reader, the
tokenizer's own framing of texts, an output folder's bytes, and the preprocessing CLI as a separate
task (one Slurm array task)."""

import os
import subprocess
import sys

from tests.helpers.launch import ROOT

CHUNK_MB = "0.008"  # small units: the demo corpus makes a few dozen


def shard_documents(prefixes):
    """All documents of the shards, in order, as lists of ids, through megatron-core's reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        di = ds.document_indices
        for d in range(len(di) - 1):
            docs.append([int(t) for s in range(di[d], di[d + 1]) for t in ds[s]])
    return docs


def framed(hf, texts):
    """``<bos> ids <eos>`` of each text, by the HF tokenizer ``hf`` itself."""
    return [[hf.bos_token_id] + hf(t, add_special_tokens=False).input_ids + [hf.eos_token_id] for t in texts]


def output_files(out):
    """relative path -> bytes: shards, manifest and unit markers (not locks / state / shard plan)."""
    files = {}
    for d, _, fs in os.walk(out):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), out)
            if not rel.startswith(".preprocess") or rel.startswith(os.path.join(".preprocess", "units")):
                with open(os.path.join(d, f), "rb") as fh:
                    files[rel] = fh.read()
    return files


def reference_output(corpus, tok, out):
    """One-process preprocessing run (the CLI, in this process) into ``out``, moved aside: returns its
    bytes (:func:`output_files`; the manifest names ``out``), what sharded runs must reproduce."""
    import shutil

    from megatron_mmbert.cli.preprocess_data import main as cli_main

    assert cli_main(cli_args(corpus, out, tok)) == 0
    files = output_files(out)
    shutil.rmtree(out)
    assert sum(f.endswith(".idx") for f in files) > 6
    return files


def cli_args(corpus, out, tok, *extra):
    return ["--input", corpus, "--output", out, "--tokenizer", tok, "--chunk-mb", CHUNK_MB, *extra]


def shard_task(corpus, out, tok, *extra, env=None):
    """A shard task as its own process (the CLI), like one Slurm array task, running beside the test
    (a test that starts one is ``slow``)."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *cli_args(corpus, out, tok, *extra)]
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
