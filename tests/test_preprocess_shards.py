"""Preprocessing across separate tasks (a Slurm array) and loud bad input (issue 12).

* N shard processes, run side by side, plus ``--finalize`` write the same bytes (shards, unit markers,
  manifest) as one run; ``--finalize`` with a unit missing fails naming it and its shard; a shard task
  killed mid-way reruns to the same bytes.
* An input yielding no documents fails, naming it, the key looked for and the keys it has; more than
  ``--max-bad-fraction`` bad records fail after everything is written (a rerun resumes, redoing nothing).
* Language tags are single safe path components: ``sr@latin`` gets an ``sr@latin`` shard.
"""

import json
import os
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from megatron_mmbert.cli.preprocess_data import main as cli_main
from megatron_mmbert.data.preprocess import (
    BadInputFractionError, PreprocessConfig, PreprocessError, run_preprocess, slurm_array_shard,
)
from megatron_mmbert.data.shards import valid_lang
from megatron_mmbert.data.sources import ReadOptions
from tests.helpers.preprocess import cli_args as _args, framed as _framed, output_files as _files
from tests.helpers.preprocess import reference_output as _reference
from tests.helpers.preprocess import shard_documents as _documents, shard_task as _task


def test_slurm_array_position():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert slurm_array_shard(env) == (3, 2)  # --array=1-3: task 3 is the third
    assert slurm_array_shard({**env, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_STEP": "2"}) == (3, 2)  # 1-5:2
    assert slurm_array_shard({}) is None
    with pytest.raises(PreprocessError, match="gaps"):  # --array=1,4,9
        slurm_array_shard({**env, "SLURM_ARRAY_TASK_ID": "9"})


@pytest.mark.slow
def test_shard_tasks_plus_finalize_equal_one_run(tmp_path, demo_corpus, demo_tokenizer, capsys):
    out = str(tmp_path / "out")
    expected = _reference(demo_corpus, demo_tokenizer, out)

    # Shards 0 and 2 of 3 side by side; shard 0 finds itself from a Slurm array that starts at 1.
    a = _task(demo_corpus, out, demo_tokenizer, env={
        "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
    b = _task(demo_corpus, out, demo_tokenizer, "--num-shards", "3", "--shard-index", "2")
    for p in (a, b):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "shard done" in err
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # only --finalize writes it

    capsys.readouterr()
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--finalize")) == 1
    err = capsys.readouterr().err
    units = {f[len(".preprocess/units/"):-5] for f in expected if f.startswith(".preprocess/units/")}
    done = {f[:-5] for f in os.listdir(os.path.join(out, ".preprocess", "units")) if f.endswith(".json")}
    missing = units - done
    assert missing and done and f"{len(missing)} of {len(units)} unit(s) of the plan are not done" in err
    named = [line.split()[1].rstrip(":") for line in err.splitlines() if line.strip().startswith("unit ")]
    assert named and set(named) <= missing, err
    assert "(shard 1 of 3)" in err and "num_shards=3, shard_index=1" in err and "[--finalize]" in err
    assert not os.path.exists(os.path.join(out, "manifest.json"))

    assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--num-shards", "3", "--shard-index", "1")) == 0
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--finalize")) == 0
    got = _files(out)
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], rel


@pytest.mark.slow
def test_killed_shard_task_reruns_to_the_same_bytes(tmp_path, demo_corpus, demo_tokenizer):
    out = str(tmp_path / "out")
    expected = _reference(demo_corpus, demo_tokenizer, out)
    units = os.path.join(out, ".preprocess", "units")

    def finished():  # a marker being written is still "{id}.json.partial-PID"
        return [f for f in os.listdir(units) if f.endswith(".json")] if os.path.isdir(units) else []

    p = _task(demo_corpus, out, demo_tokenizer, "--num-shards", "2", "--shard-index", "0", "--batch-docs", "1")
    deadline = time.time() + 90
    while not finished() and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    assert p.poll() is None, "the shard task finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.communicate()
    killed_with = len(finished())
    assert killed_with >= 1
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--num-shards", "2", "--shard-index", "0")) == 0
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--num-shards", "2", "--shard-index", "1")) == 0
    assert cli_main(_args(demo_corpus, out, demo_tokenizer, "--finalize")) == 0
    got = _files(out)
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], rel
    assert not [f for d, _, fs in os.walk(out) for f in fs if ".partial" in f and "units" not in d]


def test_language_tags_with_at_sign(tmp_path, demo_tokenizer):
    assert all(valid_lang(t) for t in ("sr@latin", "ca@valencia", "en@shaw", "zh-Hans", "x+y", "a.b", "_x"))
    for bad in (".hidden", "a/b", "a b", "x" * 65, "..", "eng_Latn\n", "ü", "manifest.json", ""):
        assert not valid_lang(bad), bad
    src = tmp_path / "tags.jsonl"
    rows = [("sr@latin", "zdravo svete"), ("ca@valencia", "bon dia"), ("sr@latin", "laku noc"),
            ("a/b", "escape"), (".hidden", "hidden"), ("en@shaw", "hello")]
    src.write_text("".join(json.dumps({"text": t, "lang": l}) + "\n" for l, t in rows), encoding="utf-8")
    res = run_preprocess(PreprocessConfig(inputs=[str(src)], output=str(tmp_path / "out"), tokenizer=demo_tokenizer,
                                          read=ReadOptions(lang_key="lang"), max_bad_fraction=1.0))
    assert sorted(res.manifest.languages) == ["ca@valencia", "en@shaw", "sr@latin"]
    shards = res.manifest.languages["sr@latin"].shards
    assert all(os.path.dirname(s) == str(tmp_path / "out" / "sr@latin") for s in shards)
    hf = AutoTokenizer.from_pretrained(demo_tokenizer)
    assert _documents(shards) == _framed(hf, ["zdravo svete", "laku noc"])
    bad = res.bad_input.files[str(src)]
    assert bad["counts"] == {"missing_language": 2}
    assert [loc.split(": ")[0] for loc in bad["locations"]] == [f"{src}:4", f"{src}:5"]


def test_input_without_documents_is_an_error(tmp_path, demo_tokenizer, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text('{"content": "x", "id": 1}\n' * 3)
    out = str(tmp_path / "out")
    rc = cli_main(["--input", str(src), "--output", out, "--tokenizer", demo_tokenizer, "--lang", "eng_Latn"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{src} yielded no documents (missing text field: 3); looked for text key 'text'" in err
    assert "its records have keys ['content', 'id']" in err and "read.text_key" in err
    assert "bad input: 3 record(s) skipped" in err  # the report came first

    fw = tmp_path / "fw" / "data" / "fra_Latn" / "train"
    fw.mkdir(parents=True)
    pq.write_table(pa.table({"body": ["bonjour"], "url": ["u"]}), fw / "000.parquet")
    with pytest.raises(BadInputFractionError) as e:
        run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "fw")], output=str(tmp_path / "fw_out"),
                                        tokenizer=demo_tokenizer))
    msg = str(e.value)
    assert f"{fw / '000.parquet'} yielded no documents" in msg and "['body', 'url']" in msg
    assert f"input {tmp_path / 'fw'} yielded no documents" in msg
    with pytest.raises(BadInputFractionError, match=r"input .*fw yielded no documents \(0 readable"):
        run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "fw")], output=str(tmp_path / "fw_split"),
                                        tokenizer=demo_tokenizer, read=ReadOptions(split="test")))


def test_max_bad_fraction_fails_after_writing(tmp_path, demo_tokenizer):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(95)) + '{"txt": "x"}\n' * 5)
    cfg = PreprocessConfig(inputs=[str(src)], output=str(tmp_path / "out"), tokenizer=demo_tokenizer,
                           read=ReadOptions(lang="eng_Latn"))
    with pytest.raises(BadInputFractionError, match=r"5 of 100 records \(5\.0%\) were bad.*max_bad_fraction 0\.01"):
        run_preprocess(cfg)
    assert os.path.isfile(tmp_path / "out" / "manifest.json")  # written before failing: nothing lost
    res = run_preprocess(PreprocessConfig(**{**cfg.__dict__, "max_bad_fraction": 0.05}))
    assert res.units_run == 0 and res.manifest.languages["eng_Latn"].documents == 95


def test_shard_tasks_of_another_shard_count_are_refused(tmp_path, demo_tokenizer):
    import fcntl

    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "x"}\n')
    out = tmp_path / "out"
    (out / ".preprocess").mkdir(parents=True)
    with open(out / ".preprocess" / "lock.shard-0-of-3", "w") as held:  # a running task of a 3-shard array
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PreprocessError, match="num_shards=3 are writing.*same num_shards"):
            run_preprocess(PreprocessConfig(inputs=[str(src)], output=str(out), tokenizer=demo_tokenizer,
                                            read=ReadOptions(lang="eng_Latn"), num_shards=2, shard_index=1))
        res = run_preprocess(PreprocessConfig(inputs=[str(src)], output=str(out), tokenizer=demo_tokenizer,
                                              read=ReadOptions(lang="eng_Latn"), num_shards=3, shard_index=1))
        assert res.manifest is None and res.units_in_shard is not None
