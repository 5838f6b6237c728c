"""Adversarial inputs (issue "nothing lost, nothing executed"): each test reproduces one way a careful
user or an attacker broke the tools, and shows it refused with a message naming the thing.

Crafted pickles carry a ``__reduce__`` that would create a marker file: a test passes only if the
tool exits non-zero, names the file and the marker never appears (no code ran).
"""

import json
import logging
import os
import pickle
import shutil

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.cli.convert_checkpoint import main as convert_main
from megatron_mmbert.cli.ties_merge import main as merge_main
from tests.helpers.model import hf_model_and_checkpoint, make_hf_model


class _Payload:
    """Unpickling this runs ``touch marker`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    runtime.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny HF ModernBERT model and its megatron checkpoint (with recorded digests)."""
    root = tmp_path_factory.mktemp("adversarial")
    hf_model_and_checkpoint(root)
    return root


def _crafted(root, tmp_path, which):
    """A copy of the checkpoint whose ``.metadata`` or ``common.pt`` runs code when unpickled."""
    crafted = tmp_path / f"crafted_{which}"
    shutil.copytree(root / "ckpt", crafted)
    marker = tmp_path / f"code_ran_{which}"
    if which == "metadata":
        with open(crafted / ".metadata", "wb") as f:
            pickle.dump(_Payload(marker), f)
        named = str(crafted / ".metadata")
    else:
        torch.save({"payload": _Payload(marker)}, crafted / "common.pt")
        named = str(crafted / "common.pt")
    return crafted, marker, named


# One short phase over write_manifest's three languages.
ONE_PHASE = {
    "phases": [{"name": "pretrain", "tokens": 2048, "seq_len": 64, "mask_rate": 0.3, "languages": "all",
                "temperature": 0.7}],
    "schedule": {"total_tokens": 2048, "phases": {"pretrain": {"lr": 1.0e-3, "warmup_tokens": 128}}},
}


# -- 1. loading a checkpoint runs no code ------------------------------------------------------------

@pytest.mark.parametrize("which", ["metadata", "common"])
@pytest.mark.parametrize("tool", ["export-hf", "verify", "ties_merge"])
def test_crafted_checkpoint_runs_no_code(checkpoint, tmp_path, capsys, which, tool):
    crafted, marker, named = _crafted(checkpoint, tmp_path, which)
    # --no-verify: the digests would refuse the modified file first; this is about the unpickler.
    if tool == "export-hf":
        rc = convert_main(["export-hf", "--load", str(crafted), "--out", str(tmp_path / "out"), "--no-verify"])
    elif tool == "verify":
        rc = convert_main(["verify", "--hf-dir", str(checkpoint / "hf"), "--load", str(crafted), "--no-verify"])
    else:
        rc = merge_main(["--method", "linear", "--models", str(crafted), str(checkpoint / "ckpt"),
                         "--out", str(tmp_path / "out"), "--no-verify", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    assert not marker.exists(), "unpickling the crafted file ran code"
    assert named in err and "refused to load" in err
    assert not (tmp_path / "out").exists()


def test_crafted_checkpoint_is_caught_by_digests_too(checkpoint, tmp_path, capsys):
    crafted, marker, named = _crafted(checkpoint, tmp_path, "metadata")
    rc = convert_main(["export-hf", "--load", str(crafted), "--out", str(tmp_path / "out")])
    assert rc != 0 and not marker.exists()
    assert named in capsys.readouterr().err


def test_extra_state_blobs_are_loaded_weights_only(tmp_path):
    import io

    from megatron_mmbert.checkpoints.dcp_io import UntrustedCheckpointError, check_extra_state

    marker = tmp_path / "code_ran"
    blob = io.BytesIO()
    torch.save(_Payload(marker), blob)
    with pytest.raises(UntrustedCheckpointError, match="layers.0.x._extra_state"):
        check_extra_state("layers.0.x._extra_state", io.BytesIO(blob.getvalue()), "ckpt")
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save({"scale": torch.ones(2)}, plain)
    check_extra_state("layers.0.x._extra_state", plain, "ckpt")  # real FP8 metadata passes


def test_genuine_metadata_loads_through_the_allow_list(checkpoint):
    from megatron_mmbert.checkpoints.dcp_io import load_metadata

    path = str(checkpoint / "ckpt" / ".metadata")
    with open(path, "rb") as f:
        meta = load_metadata(f, path)
    assert "embedding.word_embeddings.weight" in meta.state_dict_metadata


@pytest.mark.slow
def test_crafted_init_checkpoint_runs_no_code_in_training(checkpoint, tmp_path):
    from tests.helpers.training import launch, tiny_run_config, write_manifest

    crafted, marker, named = _crafted(checkpoint, tmp_path, "metadata")
    # A training-shaped config: the crafted copy carries a model config of the tiny preset.
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), write_manifest(tmp_path / "data"), str(tmp_path / "run"),
                          init={"checkpoint": str(crafted)}, **ONE_PHASE)
    proc = launch(cfg, "--checkpoint.verify_on_load", "false", timeout=240)
    assert proc.returncode != 0
    assert not marker.exists(), "unpickling the crafted .metadata ran code"
    assert named in proc.stderr and "refused to load" in proc.stderr


# -- 2. outputs never destroy ----------------------------------------------------------------------

def _tree(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getsize(os.path.join(r, f)))
                  for r, _, fs in os.walk(path) for f in fs)


def test_export_refuses_existing_folder_input_and_run_checkpoints(checkpoint, tmp_path, capsys):
    ckpt = checkpoint / "ckpt"
    before = _tree(ckpt)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x" * 10)
    for out, extra in ((other, []), (other, ["--overwrite"]), (ckpt, ["--overwrite"]), (tmp_path, ["--overwrite"])):
        assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert str(out) in err or str(ckpt) in err
    assert (other / "keep.jpg").read_bytes() == b"x" * 10 and _tree(ckpt) == before
    # a previous export is replaced only with --overwrite
    out = tmp_path / "hf_out"
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(out)]) == 0
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(out)]) == 2
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(out), "--overwrite"]) == 0


def test_import_refuses_a_runs_checkpoint_folder(checkpoint, tmp_path, capsys):
    run_ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(checkpoint / "ckpt", run_ckpts / "iter_0000002")
    (run_ckpts / "latest").write_text("iter_0000002\n")
    before = _tree(run_ckpts)
    for extra in ([], ["--overwrite"]):
        assert convert_main(["import-hf", "--hf-dir", str(checkpoint / "hf"), "--save", str(run_ckpts), *extra]) == 2
        assert "checkpoint folder" in capsys.readouterr().err or not extra
    assert _tree(run_ckpts) == before


def test_merge_overwrite_never_replaces_an_input(checkpoint, tmp_path, capsys):
    a = tmp_path / "a"
    shutil.copytree(checkpoint / "ckpt", a)
    before = _tree(a)
    rc = merge_main(["--method", "linear", "--models", str(a), str(checkpoint / "ckpt"), "--out", str(a),
                     "--overwrite", "--quiet"])
    assert rc == 2 and "would overwrite the input" in capsys.readouterr().err
    assert _tree(a) == before


def test_tokenizer_folder_cannot_replace_exported_config(checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint / "ckpt", ckpt)
    (ckpt / "tokenizer").mkdir(exist_ok=True)
    (ckpt / "tokenizer" / "config.json").write_text('{"model_type": "evil"}')
    (ckpt / "tokenizer" / "model.safetensors").write_text("junk")
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert json.load(open(tmp_path / "out" / "config.json"))["model_type"] == "modernbert"


def test_tokenizer_symlink_in_a_checkpoint_is_not_followed(checkpoint, tmp_path):
    """A downloaded checkpoint's tokenizer/ linking to a local file cannot copy it into an export."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint / "ckpt", ckpt)
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "do not ship"}')
    (ckpt / "tokenizer").mkdir(exist_ok=True)
    os.symlink(secret, ckpt / "tokenizer" / "tokenizer.json")
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert not any("do not ship" in p.read_text(errors="replace") for p in (tmp_path / "out").iterdir() if p.is_file())


# -- 3. one writer per run folder ------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_on_a_run_dir_exits_naming_the_holder(tmp_path):
    import socket

    from megatron_mmbert.fileio import DirectoryLock
    from tests.helpers.training import launch, tiny_run_config, write_manifest

    run = tmp_path / "run"
    in_progress = run / "checkpoints" / "iter_0000002.tmp-run"  # run A's save being written
    in_progress.mkdir(parents=True)
    (in_progress / "__0_0.distcp").write_bytes(b"x" * 100)
    lock = DirectoryLock(str(run)).acquire()  # run A (this process) holds the folder
    try:
        cfg = tiny_run_config(str(tmp_path / "run.yaml"), write_manifest(tmp_path / "data"), str(run), **ONE_PHASE)
        proc = launch(cfg, timeout=240)
    finally:
        lock.release()
    assert proc.returncode == 2
    assert f"pid {os.getpid()}" in proc.stderr and socket.gethostname() in proc.stderr
    assert (in_progress / "__0_0.distcp").stat().st_size == 100  # A's save untouched
    assert not (run / "resolved_config.yaml").exists()  # nor its resolved config


def test_startup_cleanup_removes_only_our_leftovers(tmp_path):
    from megatron_mmbert.checkpoints.dist import clean_incomplete

    for name in ("iter_0000004.tmp-run", "phase_end_mid.old-123", "latest.partial-77", "notes.tmp-keep",
                 "iter_0000002", "my_backup.old-1"):
        (tmp_path / name).mkdir() if "." not in name or "tmp" in name or "old" in name else None
        if not (tmp_path / name).exists():
            (tmp_path / name).write_text("x")
    assert sorted(clean_incomplete(str(tmp_path))) == ["iter_0000004.tmp-run", "latest.partial-77",
                                                       "phase_end_mid.old-123"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "my_backup.old-1", "notes.tmp-keep"]


# -- 4. inputs checked before hours are spent ------------------------------------------------------

@pytest.fixture
def data_run(tmp_path):
    """A valid tiny run config over write_manifest's three uint16 languages."""
    from tests.helpers.training import tiny_run_config, write_manifest

    manifest = write_manifest(tmp_path / "data")
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), manifest, str(tmp_path / "run"), **ONE_PHASE)
    return cfg, manifest, str(tmp_path / "data" / "fra_Latn" / "part-0")


def _validate(cfg, capsys, *overrides):
    from pretrain_mmbert import main as pretrain_main

    rc = pretrain_main(["--config", cfg, "--validate", *overrides])
    return rc, capsys.readouterr().err


def _build_index(cfg, capsys):
    from megatron_mmbert.cli.build_data_index import main as index_main

    rc = index_main(["--config", cfg])
    return rc, capsys.readouterr().err


def test_valid_data_passes(data_run, capsys):
    assert _validate(data_run[0], capsys)[0] == 0


@pytest.mark.parametrize("damage", ["dtype_uint8", "dtype_int32", "truncated_bin", "bad_magic", "missing_bin",
                                    "truncated_idx"])
def test_damaged_shard_is_refused_at_validate_and_index_build(data_run, capsys, damage):
    cfg, _, prefix = data_run
    idx, binf = prefix + ".idx", prefix + ".bin"
    raw = bytearray(open(idx, "rb").read())
    if damage.startswith("dtype"):
        raw[17] = {"dtype_uint8": 1, "dtype_int32": 4}[damage]  # megatron-core DType codes
        open(idx, "wb").write(raw)
        named = idx
    elif damage == "truncated_bin":
        os.truncate(binf, os.path.getsize(binf) - 10)
        named = binf
    elif damage == "bad_magic":
        raw[:9] = b"NOTANIDX\x00"
        open(idx, "wb").write(raw)
        named = idx
    elif damage == "truncated_idx":
        open(idx, "wb").write(raw[:-8])
        named = idx
    else:
        os.remove(binf)
        named = binf
    for run in (_validate, _build_index):
        rc, err = run(cfg, capsys)
        assert rc == 2 and named in err, err
    assert "Traceback" not in err


def test_token_ids_beyond_the_vocabulary_are_refused(data_run, capsys):
    cfg, manifest, _ = data_run
    obj = json.load(open(manifest))
    obj["languages"]["deu_Latn"]["max_token_id"] = 5000  # int32 shards of a bigger tokenizer
    json.dump(obj, open(manifest, "w"))
    rc, err = _validate(cfg, capsys)
    assert rc == 2 and "deu_Latn" in err and "5000" in err


def test_preprocessing_records_the_largest_token_id(tmp_path):
    import numpy as np

    from megatron_mmbert.data.preprocess.finalize import build_manifest
    from megatron_mmbert.data.shards import ShardWriter, TokenizerIdentity

    with ShardWriter(str(tmp_path / "x" / "part-0"), np.uint16) as w:
        w.add_document([2, 17, 4001, 1])
        w.add_document([2, 9, 1])
        w.finalize()
    assert w.max_token_id == 4001
    shard = {"prefix": "x/part-0", "documents": 2, "tokens": 7, "bytes": 0, "sources": [], "max_token_id": 4001}
    tok = TokenizerIdentity(name="t", vocab_size=4096, hash="0", special_ids={}, all_special_ids=[])
    m = build_manifest(str(tmp_path), tok, "uint16", [{"shards": {"x": shard}}])
    assert m.languages["x"].max_token_id == 4001
    older = dict(shard)
    del older["max_token_id"]  # a unit from before ids were recorded: unknown, not a guess
    m = build_manifest(str(tmp_path), tok, "uint16", [{"shards": {"x": shard}}, {"shards": {"x": older}}])
    assert m.languages["x"].max_token_id is None


@pytest.mark.parametrize("override, field", [
    (("--seed", "-5"), "seed"),
    (("--optimizer.adam_beta1", "2"), "optimizer.adam_beta1"),
    (("--optimizer.adam_beta2", "nan"), "optimizer.adam_beta2"),
    (("--phases.0.languages", "top:0"), "phases.0.languages"),
    (("--phases.0.name", "../../../escaped"), "phases.0.name"),
])
def test_out_of_domain_values_are_refused_naming_the_field(data_run, capsys, override, field):
    rc, err = _validate(data_run[0], capsys, *override, "--skip-data")
    assert rc == 2 and field in err, err


@pytest.mark.parametrize("args, flag", [
    (["--lambda", "nan"], "--lambda"), (["--lambda", "inf"], "--lambda"),
    (["--weights", "1", "nan"], "--weights"), (["--chunk-mb", "0"], "--chunk-mb"),
    (["--chunk-mb", "-1"], "--chunk-mb"),
])
def test_merge_refuses_non_finite_values(checkpoint, tmp_path, capsys, args, flag):
    ckpt = str(checkpoint / "ckpt")
    rc = merge_main(["--base", ckpt, "--models", ckpt, ckpt, "--method", "task_arithmetic", *args,
                     "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prefix", ["../x", "/tmp/abs", "a/b", ".hidden", ""])
def test_preprocess_prefix_is_a_plain_file_name(tmp_path, prefix):
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.data.preprocess import PreprocessConfig, run_preprocess

    with pytest.raises(ConfigError, match=r"^prefix .*: give a plain file-name prefix") as info:
        run_preprocess(PreprocessConfig(inputs=[str(tmp_path)], output=str(tmp_path / "out"),
                                        tokenizer=str(tmp_path / "tok"), prefix=prefix))
    assert info.value.field == "prefix"  # the CLI adds the flag that sets it
    assert not (tmp_path / "out").exists()


def test_language_tags_cannot_name_the_outputs_own_files():
    from megatron_mmbert.data.shards import valid_lang

    assert valid_lang("eng_Latn") and valid_lang("zh-Hans")
    for bad in ("manifest.json", "MANIFEST.JSON", "../x", ".preprocess", "a/b", "", None, 3):
        assert not valid_lang(bad), bad


def test_rerun_redoes_a_unit_whose_shard_was_deleted(tmp_path):
    import numpy as np

    from megatron_mmbert.data.preprocess.layout import UNITS_DIR
    from megatron_mmbert.data.preprocess.markers import forget_units_with_missing_shards
    from megatron_mmbert.data.shards import ShardWriter

    units = tmp_path / UNITS_DIR
    units.mkdir(parents=True)
    markers = []
    for uid in ("u1", "u2"):
        with ShardWriter(str(tmp_path / "fra" / f"part-{uid}"), np.uint16) as w:
            w.add_document([2, 5, 1])
            w.finalize()
        markers.append({"id": uid, "shards": {"fra": {"prefix": f"fra/part-{uid}"}}})
        (units / f"{uid}.json").write_text("{}")
    os.remove(tmp_path / "fra" / "part-u2.bin")
    kept = forget_units_with_missing_shards(str(tmp_path), markers)
    assert [m["id"] for m in kept] == ["u1"] and sorted(os.listdir(units)) == ["u1.json"]


# -- 6. damaged latest, integrity ------------------------------------------------------------------

def _fake_checkpoint(root, name, step):
    d = root / name
    d.mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
    (d / "mmbert_config.json").write_text(json.dumps({"model": {}, "train_state": {"step": step}, "saved_at": step}))
    return str(d)


@pytest.mark.parametrize("pointer", [b"\xff\xfe garbage", b"iter_0000009\n", b"../../etc\n", b"", None])
def test_damaged_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer):
    from megatron_mmbert.checkpoints.dist import read_latest

    _fake_checkpoint(tmp_path, "iter_0000002", 2)
    newest = _fake_checkpoint(tmp_path, "phase_end_mid", 4)
    (tmp_path / "iter_0000006").mkdir()  # an incomplete one (no config): skipped
    (tmp_path / "iter_0000009.tmp-run").mkdir()
    if pointer is not None:
        (tmp_path / "latest").write_bytes(pointer)
    warnings = []
    assert read_latest(str(tmp_path), warn=warnings.append) == newest
    assert len(warnings) == 1 and "latest" in warnings[0] and newest in warnings[0]


def test_intact_latest_is_used_and_an_empty_folder_is_a_fresh_run(tmp_path):
    from megatron_mmbert.checkpoints.dist import read_latest

    assert read_latest(str(tmp_path)) is None
    older = _fake_checkpoint(tmp_path, "iter_0000002", 2)
    _fake_checkpoint(tmp_path, "iter_0000004", 4)
    (tmp_path / "latest").write_text("iter_0000002\n")  # e.g. after a hand rollback: respected
    warnings = []
    assert read_latest(str(tmp_path), warn=warnings.append) == older and not warnings


def test_overwritten_bytes_in_a_shard_file_are_caught(checkpoint, tmp_path, capsys):
    from megatron_mmbert.checkpoints.dcp_io import UntrustedCheckpointError
    from megatron_mmbert.checkpoints.dist import verify_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint / "ckpt", ckpt)
    shard = sorted(p for p in os.listdir(ckpt) if p.endswith(".distcp"))[0]
    with open(ckpt / shard, "r+b") as f:  # 4 KB overwritten in place: same size
        f.seek(4096)
        f.write(os.urandom(4096))
    with pytest.raises(UntrustedCheckpointError, match=shard):
        verify_checkpoint(str(ckpt))
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert shard in capsys.readouterr().err
    rc = merge_main(["--method", "linear", "--models", str(ckpt), str(checkpoint / "ckpt"),
                     "--out", str(tmp_path / "merged"), "--quiet"])
    assert rc == 2 and shard in capsys.readouterr().err
    # --no-verify skips the check (for huge checkpoints), and the damage then goes unnoticed
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(tmp_path / "out"), "--no-verify"]) == 0


# -- 7. the weak items -----------------------------------------------------------------------------

def test_merge_warns_about_a_model_that_did_not_branch_from_the_base(checkpoint, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    hf = checkpoint / "hf"
    near = tmp_path / "near"
    shutil.copytree(hf, near)
    state = load_file(str(near / "model.safetensors"))
    torch.manual_seed(0)
    save_file({k: v + 1e-3 * torch.randn_like(v) for k, v in state.items()}, str(near / "model.safetensors"))
    unrelated = tmp_path / "unrelated"
    make_hf_model("even", str(unrelated), seed=5)
    rc = merge_main(["--method", "task_arithmetic", "--base", str(hf), "--models", str(near), str(unrelated),
                     "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    # through logging (ties_merge's stderr): "<time> WARNING megatron_mmbert.merge.stream: <path>: ..."
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all(str(unrelated) in w and "was it trained from" in w for w in warnings), caplog.text
    report = json.load(open(tmp_path / "out" / "merge_report.json"))
    assert report["summary"]["warnings"]


def test_import_refuses_non_finite_weights(checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint / "hf", broken)
    state = load_file(str(broken / "model.safetensors"))
    key = sorted(state)[3]
    state[key][0] = float("nan")
    save_file(state, str(broken / "model.safetensors"))
    assert convert_main(["import-hf", "--hf-dir", str(broken), "--save", str(tmp_path / "out")]) == 2
    assert key in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_os_errors_are_reported_without_a_traceback(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    assert convert_main(["export-hf", "--load", str(checkpoint / "ckpt"), "--out", str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert str(blocker) in err and "Traceback" not in err


def test_symlinked_input_is_read_once_and_a_fifo_is_refused(tmp_path):
    from megatron_mmbert.data.sources import BadInputLog, InputError, ReadOptions, discover

    data = tmp_path / "in"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "hello"}\n')
    os.symlink(data / "a.jsonl", data / "b.jsonl")
    sources = discover([str(data), str(data / "a.jsonl")], ReadOptions(lang="fra_Latn"), BadInputLog())
    assert len(sources) == 1
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(InputError, match="pipe.jsonl"):
        discover([str(tmp_path / "pipe.jsonl")], ReadOptions(lang="fra_Latn"), BadInputLog())
