"""Adversarial files, part 2 (issue 27): each test is one probe of the second pass, run as a user runs it
(the tool's entry point or the library call it makes), and shows the user's files untouched and the
refusal naming the thing. docs/safety.md lists every case with its test.

In-process wherever the code path allows it (no launch): the run-folder locks are taken by
``training.loop.lock_run_folders``, the same function the trainer calls on rank 0.
"""

import json
import logging
import os

import pytest
import yaml

from megatron_mmbert.checkpoints.layout import CONFIG_FILE, DCP_METADATA
from megatron_mmbert.data.preprocess import PreprocessConfig, PreprocessError, doc_hash, run_preprocess
from megatron_mmbert.data.shards import HELDOUT_DIR, load_manifest
from megatron_mmbert.data.sources import ReadOptions
from megatron_mmbert.fileio import DirectoryLock, DirectoryLocked, LockFileRefused
from tests.helpers.training import tiny_run_config, write_manifest

USER_TEXT = "my notes: do not touch\n"

# One short phase over write_manifest's three languages.
ONE_PHASE = {
    "phases": [{"name": "pretrain", "tokens": 2048, "seq_len": 64, "mask_rate": 0.3, "languages": "all",
                "temperature": 0.7}],
    "schedule": {"total_tokens": 2048, "phases": {"pretrain": {"lr": 1.0e-3, "warmup_tokens": 128}}},
}


def _user_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(USER_TEXT)
    return path


def _run_cfg(tmp_path, run_dir, manifest=None, **sections):
    from megatron_mmbert.training.config import load_config

    manifest = manifest or write_manifest(tmp_path / "data")
    name = os.path.basename(str(run_dir))
    return load_config(tiny_run_config(str(tmp_path / f"{name}.yaml"), manifest, str(run_dir), **sections))


# -- 1. the checkpoint folder is always locked -----------------------------------------------------------

def test_second_run_on_a_running_runs_checkpoint_folder_is_refused(tmp_path):
    from megatron_mmbert.training.loop import lock_run_folders

    manifest = write_manifest(tmp_path / "data")
    a = _run_cfg(tmp_path, tmp_path / "runA", manifest)  # checkpoints in runA/checkpoints
    b = _run_cfg(tmp_path, tmp_path / "runB", manifest, checkpoint={"dir": str(tmp_path / "runA" / "checkpoints")})
    held = lock_run_folders(a)
    try:
        with pytest.raises(DirectoryLocked, match="runA/checkpoints is in use by another run") as err:
            lock_run_folders(b)
        assert f"pid {os.getpid()}" in str(err.value)
        # All or none: B's own run_dir lock was released again.
        DirectoryLock(str(tmp_path / "runB")).acquire().release()
    finally:
        for lock in held:
            lock.release()
    same = _run_cfg(tmp_path, tmp_path / "runC", manifest, checkpoint={"dir": str(tmp_path / "runC")})
    for lock in lock_run_folders(same):  # checkpoint.dir = run_dir: one folder, locked once
        lock.release()


# -- 2, 3. lock files never written through links, never truncated --------------------------------------

@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "foreign"])
def test_run_lock_is_never_written_through(tmp_path, kind):
    from megatron_mmbert.training.loop import lock_run_folders

    secret = _user_file(tmp_path / "precious.txt")
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    if kind == "symlink":
        os.symlink(secret, lock)
    elif kind == "hardlink":
        os.link(secret, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:  # a user's own file under our name
        _user_file(lock)
    with pytest.raises(LockFileRefused, match=str(lock)):
        lock_run_folders(_run_cfg(tmp_path, run))
    assert secret.read_text() == USER_TEXT
    if kind == "foreign":
        assert lock.read_text() == USER_TEXT


def test_lock_record_is_rewritten_in_place(tmp_path):
    """A lock file of ours (a previous run's record) is reused: never truncated, always parseable."""
    first = DirectoryLock(str(tmp_path)).acquire()
    first.release()
    size = (tmp_path / ".lock").stat().st_size
    second = DirectoryLock(str(tmp_path)).acquire()
    try:
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and (tmp_path / ".lock").stat().st_size == size
    finally:
        second.release()


def _tiny_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for lang, text in docs:
            f.write(json.dumps({"text": text, "lang": lang}) + "\n")
    return str(path)


def _preprocess(inputs, out, tokenizer, **kw):
    return run_preprocess(PreprocessConfig(inputs=list(inputs), output=str(out), tokenizer=tokenizer,
                                           read=ReadOptions(lang_key="lang"), **kw))


def test_preprocess_lock_symlink_is_refused(tmp_path, demo_tokenizer):
    secret = _user_file(tmp_path / "precious.txt")
    src = _tiny_jsonl(tmp_path / "in" / "a.jsonl", [("eng_Latn", "hello world")])
    out = tmp_path / "out"
    (out / ".preprocess").mkdir(parents=True)
    os.symlink(secret, out / ".preprocess" / "lock")
    with pytest.raises(PreprocessError, match="lock.*symlink"):
        _preprocess([src], out, demo_tokenizer)
    assert secret.read_text() == USER_TEXT


# -- 4, 5. preprocessing removes only its own names, never through links ----------------------------------

def test_preprocess_into_a_users_folder_is_refused(tmp_path, demo_tokenizer):
    src = _tiny_jsonl(tmp_path / "in" / "a.jsonl", [("eng_Latn", "hello world")])
    out = tmp_path / "mine"
    files = [_user_file(out / "draft.partial"), _user_file(out / "sub" / "x.partial"),
             _user_file(out / "tokenizer" / "tokenizer.json")]
    with pytest.raises(PreprocessError, match="non-empty folder that no preprocess run made"):
        _preprocess([src], out, demo_tokenizer)
    assert all(f.read_text() == USER_TEXT for f in files)
    assert not (out / ".preprocess").exists()


def test_preprocess_rerun_removes_only_its_leftovers(tmp_path, demo_tokenizer):
    src = _tiny_jsonl(tmp_path / "in" / "a.jsonl", [("eng_Latn", f"text number {i}") for i in range(4)])
    out = tmp_path / "out"
    _preprocess([src], out, demo_tokenizer)
    outside = tmp_path / "elsewhere"
    theirs = [_user_file(outside / "part-0123456789abcdef.bin.partial"), _user_file(outside / "x.partial")]
    os.symlink(outside, out / "linked")  # a folder inside OUT that is a link to the user's files
    mine = [_user_file(out / "notes.partial"), _user_file(out / "eng_Latn" / "draft.partial")]
    ours = out / "eng_Latn" / "part-00000000deadbeef.bin.partial"  # what a killed unit of ours leaves
    ours.write_bytes(b"half")
    _preprocess([src], out, demo_tokenizer)
    assert all(f.read_text() == USER_TEXT for f in theirs + mine)
    assert not ours.exists()


def test_output_inside_an_input_is_refused(tmp_path, demo_tokenizer):
    src = tmp_path / "corpus"
    _tiny_jsonl(src / "a.jsonl", [("eng_Latn", "hello world")])
    with pytest.raises(PreprocessError, match="lies inside the input"):
        _preprocess([str(src)], src / "out", demo_tokenizer)
    assert not (src / "out").exists()


# -- 6. the held-out cap counts documents; one text held out in every language ---------------------------

def _by_hash(n):
    """``n`` texts sorted by their held-out hash (so a test can choose which a selection takes)."""
    return sorted((f"document {i}" for i in range(n)), key=doc_hash)


def test_holdout_cap_counts_copies(tmp_path, demo_tokenizer):
    """Duplicates of the smallest text used to count once: every document of the language was held out."""
    s = _by_hash(2)
    docs = [("aaa_Latn", s[0])] * 3 + [("aaa_Latn", s[1]), ("bbb_Latn", "another language")]
    res = _preprocess([_tiny_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", demo_tokenizer, holdout_docs=2)
    held = load_manifest(str(tmp_path / "out" / HELDOUT_DIR)).languages["aaa_Latn"]
    # s[0]'s three copies do not fit in min(2, 4 // 2) documents: only s[1] is held out.
    assert held.documents == 1 and res.manifest.languages["aaa_Latn"].documents == 3


def test_near_duplicates_hash_alike():
    assert doc_hash("Hello  world\n") == doc_hash("Hello world") == doc_hash(" Hello\tworld ")
    assert doc_hash("Cafe\u0301") == doc_hash("Caf\u00e9")  # NFD and NFC
    assert doc_hash("hello world") != doc_hash("Hello world")  # case is kept


def test_a_held_out_text_is_held_out_in_every_language(tmp_path, demo_tokenizer):
    s = _by_hash(8)
    t = s[1]  # aaa's smallest text; bbb's smallest is s[0]
    docs = [("aaa_Latn", x) for x in (t, s[2], s[3], s[4])]
    docs += [("bbb_Latn", x) for x in (s[0], t + "\n", s[5], s[6], s[7])]  # a near-duplicate of t
    res = _preprocess([_tiny_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", demo_tokenizer, holdout_docs=1)
    held = load_manifest(str(tmp_path / "out" / HELDOUT_DIR)).languages
    assert held["aaa_Latn"].documents == 1 and held["bbb_Latn"].documents == 2
    assert res.manifest.languages["bbb_Latn"].documents == 3


def test_a_language_losing_more_than_half_is_an_error_naming_it(tmp_path, demo_tokenizer):
    s = _by_hash(6)
    t = s[1]
    docs = [("aaa_Latn", x) for x in (t, s[2], s[3], s[4])] + [("bbb_Latn", x) for x in (s[0], t, s[5])]
    with pytest.raises(PreprocessError, match=r"more than half of the documents of bbb_Latn \(2 of 3\)"):
        _preprocess([_tiny_jsonl(tmp_path / "in.jsonl", docs)], tmp_path / "out", demo_tokenizer, holdout_docs=1)
    assert not (tmp_path / "out" / "manifest.json").exists()  # no manifest without the language's data


# -- 7, 8. the tokenizer identity, wherever a checkpoint meets a manifest ---------------------------------

def _checkpoint_of_tokenizer(path, name="tokA", digest="a" * 64, vocab_size=4096):
    """A finished checkpoint's metadata recording tokenizer ``name`` (its weights are not read by the checks)."""
    from megatron_mmbert.config import PRESETS
    from megatron_mmbert.config_base import to_dict

    path.mkdir(parents=True)
    (path / DCP_METADATA).write_text("{}")
    (path / CONFIG_FILE).write_text(json.dumps({
        "model": to_dict(PRESETS["tiny"]), "train_state": {"step": 1, "phase": "pretrain"},
        "tokenizer": {"name": name, "hash": digest, "vocab_size": vocab_size}}))
    return str(path)


def test_init_checkpoint_of_another_tokenizer_is_refused(tmp_path, capsys):
    from megatron_mmbert.pretrain import main

    ckpt = _checkpoint_of_tokenizer(tmp_path / "parent")
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), write_manifest(tmp_path / "data"), str(tmp_path / "run"),
                          init={"checkpoint": ckpt, "restart_data": True}, **ONE_PHASE)
    assert main(["--config", cfg, "--validate"]) == 2
    err = capsys.readouterr().err
    assert "'tokA'" in err and "'random'" in err and "checkpoint.allow_other_tokenizer" in err
    assert main(["--config", cfg, "--validate", "--checkpoint.allow_other_tokenizer", "true"]) == 0


def test_evaluate_with_another_tokenizer_is_refused(tmp_path, capsys, caplog):
    from megatron_mmbert.cli.evaluate import main

    ckpt = _checkpoint_of_tokenizer(tmp_path / "ckpt")
    manifest = write_manifest(tmp_path / "data")
    out = tmp_path / "eval"
    assert main(["--load", ckpt, "--manifest", manifest, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'tokA'" in err and "'random'" in err and "[--allow_other_tokenizer]" in err
    assert not out.exists()
    # allow_other_tokenizer: evaluated anyway, with a warning through logging (the CLI's stderr)
    from megatron_mmbert.evaluation import data as eval_data
    from megatron_mmbert.evaluation.config import EvaluateConfig
    from megatron_mmbert.evaluation.run import check_tokenizers

    cfg = EvaluateConfig(load=ckpt, manifest=manifest, out=str(out), allow_other_tokenizer=True)
    with caplog.at_level(logging.WARNING, logger="megatron_mmbert.evaluation"):
        check_tokenizers(cfg, [ckpt], eval_data.load(manifest), manifest)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("allow_other_tokenizer: ") and "'tokA'" in warned[0]


def test_merge_inputs_of_different_tokenizers_are_refused(tmp_path, capsys):
    from megatron_mmbert.cli.ties_merge import main

    a = _checkpoint_of_tokenizer(tmp_path / "a")
    b = _checkpoint_of_tokenizer(tmp_path / "b", name="tokB", digest="b" * 64)
    assert main(["--models", a, b, "--method", "linear", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and str(tmp_path / "a") in err and "[--allow_other_tokenizer]" in err
    assert not (tmp_path / "m").exists()


# -- 10. retention deletes only iter_<digits>, by number ---------------------------------------------------

def test_retention_keeps_users_copies_and_orders_by_number(tmp_path):
    from megatron_mmbert.checkpoints.dist import apply_retention

    for name in ("iter_0000002", "iter_0000010", "iter_0000010_keep", "iter_99999999", "iter_100000000",
                 "iter_0000004.tmp-run"):
        (tmp_path / name).mkdir()
    deleted = apply_retention(str(tmp_path), keep_last=2)
    assert deleted == ["iter_0000002", "iter_0000010"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004.tmp-run", "iter_0000010_keep", "iter_100000000",
                                            "iter_99999999"]


# -- 11. phase names cannot collide with temporary names ---------------------------------------------------

@pytest.mark.parametrize("name", ["decay.old-1", "mid.tmp-run", "x.partial-3"])
def test_phase_names_like_leftovers_are_refused(tmp_path, capsys, name):
    from megatron_mmbert.pretrain import main

    phases = [dict(ONE_PHASE["phases"][0], name=name)]
    cfg = tiny_run_config(str(tmp_path / "run.yaml"), str(tmp_path / "none.json"), str(tmp_path / "run"),
                          phases=phases, schedule={"total_tokens": 2048, "phases": {name: {"lr": 1e-3}}})
    assert main(["--config", cfg, "--validate", "--skip-data"]) == 2
    assert f"phases.0.name={name!r}" in capsys.readouterr().err


# -- 9, 10, 7 end to end: a run leaves the user's files alone and records its tokenizer --------------------

@pytest.mark.slow  # one tiny training launch
def test_a_run_keeps_the_users_config_and_copies(tmp_path):
    from megatron_mmbert.checkpoints.layout import RESOLVED_CONFIG, read_config
    from tests.helpers.training import check, launch

    run = tmp_path / "run"
    run.mkdir()
    user_cfg = run / "config.yaml"  # the user's own config, kept in the run folder and passed as --config
    tiny_run_config(str(user_cfg), write_manifest(tmp_path / "data"), str(run), **ONE_PHASE,
                    checkpoint={"every_steps": 1, "keep_last": 1})
    text = "# my run: comments stay\n" + user_cfg.read_text()
    user_cfg.write_text(text)
    keep = _user_file(run / "checkpoints" / "iter_0000001_keep" / "notes.txt")  # a user's copy of a checkpoint
    check(launch(str(user_cfg)))
    assert user_cfg.read_text() == text
    assert yaml.safe_load((run / RESOLVED_CONFIG).read_text())["run_dir"] == str(run)
    assert keep.read_text() == USER_TEXT
    assert read_config(str(run / "checkpoints" / "phase_end_pretrain"))["tokenizer"]["name"] == "random"


# == the weak cases: one clear line naming the path or field, nothing left behind ==========================

@pytest.fixture(scope="module")
def hf_and_checkpoint(tmp_path_factory):
    """A tiny HF ModernBERT model and its imported checkpoint."""
    from tests.helpers.model import hf_model_and_checkpoint

    root = tmp_path_factory.mktemp("weak")
    hf_model_and_checkpoint(root)
    return root


class _FileSizeLimit:
    """Files of this process cannot grow past ``limit`` bytes (``ulimit -f``): every write beyond fails as
    on a full disk (EFBIG instead of ENOSPC, through the same code paths). SIGXFSZ is ignored meanwhile."""

    def __init__(self, limit):
        self.limit = limit

    def __enter__(self):
        import logging
        import resource
        import signal

        logging.disable(logging.CRITICAL)  # log handlers of earlier tests write to files: not the tool's output
        self._sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self._old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self._old[1]))

    def __exit__(self, *exc):
        import logging
        import resource
        import signal

        resource.setrlimit(resource.RLIMIT_FSIZE, self._old)
        signal.signal(signal.SIGXFSZ, self._sig)
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("tool", ["export-hf", "import-hf", "ties_merge"])
def test_full_disk_is_one_line_and_leaves_nothing(hf_and_checkpoint, tmp_path, capsys, tool):
    from megatron_mmbert import runtime
    from megatron_mmbert.cli.convert_checkpoint import main as convert_main
    from megatron_mmbert.cli.ties_merge import main as merge_main

    root, out = hf_and_checkpoint, tmp_path / "out"
    with _FileSizeLimit(64 << 10):
        try:
            if tool == "export-hf":
                rc = convert_main(["export-hf", "--load", str(root / "ckpt"), "--out", str(out)])
            elif tool == "import-hf":
                rc = convert_main(["import-hf", "--hf-dir", str(root / "hf"), "--save", str(out)])
            else:
                rc = merge_main(["--models", str(root / "ckpt"), str(root / "ckpt"), "--method", "linear",
                                 "--out", str(out), "--quiet"])
        finally:
            runtime.shutdown()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 1 and len(lines) == 1 and str(out) in lines[0] and "Traceback" not in err, err[-2000:]
    assert os.listdir(tmp_path) == []  # no out, no out.tmp-*


def test_hub_ids_over_96_characters_are_refused_before_work(hf_and_checkpoint, tmp_path, capsys):
    from megatron_mmbert import hub
    from megatron_mmbert.cli.convert_checkpoint import main as convert_main

    pytest.importorskip("huggingface_hub")
    long_id = "org/" + "m" * 93
    assert convert_main(["export-hf", "--load", str(hf_and_checkpoint / "ckpt"), "--out", str(tmp_path / "out"),
                         "--push-to-hub", long_id]) == 2
    assert "97 characters" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(hub.HubError, match="97 characters"):
        hub.resolve(long_id)


def test_push_without_network_is_one_line_and_keeps_the_export(hf_and_checkpoint, tmp_path, monkeypatch):
    from megatron_mmbert import hub
    from megatron_mmbert.cli.convert_checkpoint import main as convert_main

    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network
    out = tmp_path / "out"
    assert convert_main(["export-hf", "--load", str(hf_and_checkpoint / "ckpt"), "--out", str(out)]) == 0
    with pytest.raises(hub.HubError, match="is complete and kept; push it later"):
        hub.push_to_hub(str(out), "me/model")
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("override, field", [
    (["--schedule.phases.pretrain.lr", ".nan"], "schedule.phases.pretrain.lr"),
    (["--schedule.phases.pretrain.lr", ".inf"], "schedule.phases.pretrain.lr"),
    (["--optimizer.clip_grad", ".nan"], "optimizer.clip_grad"),
    (["--phases.pretrain.tokens", "1000000000000000000000"], "phases.0.tokens"),
])
def test_nan_lr_and_absurd_token_counts_fail_validate(tmp_path, capsys, override, field):
    from megatron_mmbert.pretrain import main

    cfg = tiny_run_config(str(tmp_path / "run.yaml"), str(tmp_path / "none.json"), str(tmp_path / "run"), **ONE_PHASE)
    if field == "phases.0.tokens":  # schedule.total_tokens must not be what refuses it
        override = override + ["--schedule.total_tokens", "null"]
    assert main(["--config", cfg, "--validate", "--skip-data", *override]) == 2
    assert field in capsys.readouterr().err


def test_overwrite_names_the_files_a_user_added(hf_and_checkpoint, tmp_path, capsys):
    from megatron_mmbert.cli.convert_checkpoint import main as convert_main

    out = tmp_path / "out"
    args = ["export-hf", "--load", str(hf_and_checkpoint / "ckpt"), "--out", str(out), "--overwrite"]
    assert convert_main(args) == 0
    notes = _user_file(out / "my_eval_notes.md")
    assert convert_main(args) == 2
    assert "my_eval_notes.md" in capsys.readouterr().err and notes.read_text() == USER_TEXT
    notes.unlink()
    assert convert_main(args) == 0  # its own files only: replaced


def test_output_inside_an_input_checkpoint_is_refused(hf_and_checkpoint, capsys):
    from megatron_mmbert.cli.convert_checkpoint import main as convert_main

    ckpt = hf_and_checkpoint / "ckpt"
    assert convert_main(["export-hf", "--load", str(ckpt), "--out", str(ckpt / "hf")]) == 2
    assert "lies inside the input" in capsys.readouterr().err and not (ckpt / "hf").exists()


@pytest.mark.parametrize("config", [{"model_type": "bert", "architectures": ["BertForMaskedLM"]},
                                    {"model_type": "modernbert", "auto_map": {"AutoModelForMaskedLM": "x.Y"}}])
def test_evaluate_refuses_other_models_without_prompting(hf_and_checkpoint, tmp_path, capsys, config):
    from megatron_mmbert.cli.evaluate import main

    folder = tmp_path / "model"
    folder.mkdir()
    base = json.loads((hf_and_checkpoint / "hf" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    manifest = write_manifest(tmp_path / "data")
    assert main(["--hf-dir", str(folder), "--manifest", manifest, "--out", str(tmp_path / "eval")]) == 2
    assert "not a ModernBERT masked-LM folder" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["pretrain", "ties_merge", "evaluate", "build_data_index"])
def test_yaml_alias_bomb_is_a_short_error(tmp_path, capsys, tool):
    import importlib

    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb.write_text("\n".join(lines + ["run_dir: *g", "models: *g"]) + "\n")
    module = "megatron_mmbert.pretrain" if tool == "pretrain" else f"megatron_mmbert.cli.{tool}"
    assert importlib.import_module(module).main(["--config", str(bomb)] + (["--validate"] if tool == "pretrain" else [])) == 2
    err = capsys.readouterr().err
    assert "alias bomb" in err and len(err) < 1000


def test_full_disk_in_the_index_build_is_one_line(tmp_path, capsys):
    from megatron_mmbert.cli.build_data_index import main

    cfg = tiny_run_config(str(tmp_path / "run.yaml"), write_manifest(tmp_path / "data"), str(tmp_path / "run"),
                          **ONE_PHASE)
    capsys.readouterr()
    with _FileSizeLimit(500):  # the index files of this manifest are up to ~1 KB
        rc = main(["--config", cfg, "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    assert f"error: File too large (writing the index cache {tmp_path / 'cache'})" in err
    assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith("mmbert-index-")]  # nothing half-built


@pytest.mark.slow  # one tiny training launch under `ulimit -f`
def test_full_disk_at_a_training_save_is_one_line(tmp_path):
    import subprocess
    import sys

    from tests.helpers.training import ROOT, _env

    cfg = tiny_run_config(str(tmp_path / "run.yaml"), write_manifest(tmp_path / "data"), str(tmp_path / "run"),
                          **ONE_PHASE, checkpoint={"every_steps": 1})
    # 64 KiB per file: the index cache (under 1 KiB a file here) and the logs fit, a checkpoint's shards do not.
    script = os.path.join(ROOT, "pretrain_mmbert.py")
    proc = subprocess.run(["bash", "-c", f'ulimit -f 64 && exec "{sys.executable}" "{script}" --config "{cfg}"'],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not write the checkpoint" in proc.stderr and str(tmp_path / "run" / "checkpoints") in proc.stderr
    assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.startswith("iter_")]


def test_tokenizer_compared_by_vocabulary_when_no_identity_is_recorded(tmp_path, demo_tokenizer):
    """An HF export (or an imported checkpoint) records no identity: its tokenizer.json is compared by
    vocabulary, which a save_pretrained round trip (the export's) keeps and another tokenizer does not."""
    from transformers import AutoTokenizer

    from megatron_mmbert.checkpoints.layout import tokenizer_mismatch
    from tests.helpers.model import save_word_tokenizer

    identity = {"name": "demo", "hash": "d" * 64}
    same = tmp_path / "export"
    AutoTokenizer.from_pretrained(demo_tokenizer).save_pretrained(str(same))
    assert tokenizer_mismatch(str(same), identity, demo_tokenizer) is None
    other = tmp_path / "other"
    save_word_tokenizer(str(other))
    why = tokenizer_mismatch(str(other), identity, demo_tokenizer)
    assert why is not None and "'demo'" in why and str(other) in why


def test_a_library_writer_publishes_atomically_or_leaves_nothing(tmp_path):
    """fileio.atomic_write_with: the writers that take a file name (savefig, parquet, profiler traces)
    publish the finished file under its name, and a writer that fails leaves neither it nor a partial."""
    from megatron_mmbert.fileio import atomic_write_with

    target = tmp_path / "out" / "a.png"
    atomic_write_with(str(target), lambda tmp: open(tmp, "w").write("ok"), suffix=".png")
    assert target.read_text() == "ok" and os.listdir(target.parent) == ["a.png"]

    def fails(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_with(str(target), fails)
    assert target.read_text() == "ok" and os.listdir(target.parent) == ["a.png"]
