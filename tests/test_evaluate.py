"""tools/evaluate.py: output shape, determinism, layout and framework agreement, and that a model
trained on one language ranks it best."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.convert.checkpoints import export_hf, import_hf
from megatron_mmbert.cli.evaluate import main as evaluate_main
from tests.helpers.launch import ROOT
from tests.helpers.model import make_hf_model

VOCAB = 1000  # the "odd" model of model_helpers: window 16, 5 layers, vocab not a multiple of 128
# Languages of disjoint token ranges (so a model can tell them apart) and different sizes (groups).
LANGS = {"aaa_Latn": (5, 300, 60), "bbb_Latn": (300, 650, 30), "ccc_Cyrl": (650, 1000, 12)}


def write_manifest(directory: str) -> str:
    from megatron_mmbert.data.shards import LanguageEntry, Manifest, ShardWriter, TokenizerIdentity
    from megatron_mmbert.data.shards import write_manifest as write

    rng = np.random.default_rng(0)
    langs = {}
    for lang, (lo, hi, ndocs) in LANGS.items():
        prefix = os.path.join(directory, lang, "part-0")
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        # Zipf-like within the range: a learnable unigram distribution per language.
        docs = [(lo + np.minimum(rng.zipf(1.3, size=int(n)) - 1, hi - lo - 1)).astype(np.uint16)
                for n in rng.integers(20, 120, size=ndocs)]
        docs = [np.concatenate([[2], d, [1]]).astype(np.uint16) for d in docs]  # <bos> ... <eos>
        with ShardWriter(prefix, np.uint16) as w:
            for d in docs:
                w.add_document(d.tolist())
            w.finalize()
        langs[lang] = LanguageEntry(shards=[prefix], documents=len(docs), tokens=int(sum(map(len, docs))),
                                    bytes=0, sources=[])
    tok = TokenizerIdentity(name="ranges", vocab_size=VOCAB, hash="0",
                            special_ids={"pad": 0, "eos": 1, "bos": 2, "unk": 3, "mask": 4},
                            all_special_ids=[0, 1, 2, 3, 4])
    path = os.path.join(directory, "manifest.json")
    write(Manifest(tokenizer=tok, dtype="uint16", languages=langs), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    manifest = write_manifest(str(root / "data"))
    make_hf_model("odd", str(root / "hf"))
    import_hf(str(root / "hf"), str(root / "ckpt"))
    runtime.shutdown()
    export_hf(str(root / "ckpt"), str(root / "exported"))
    runtime.shutdown()
    return root, manifest


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    runtime.shutdown()


COMMON = ["--seq-len", "64", "--tokens-per-language", "256", "--micro-batch-rows", "2", "--quiet"]


def _eval(out, *args):
    assert evaluate_main([*args, "--out", str(out), *COMMON]) == 0
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def test_eval_json_and_csv_shape(setup, tmp_path, capsys):
    root, manifest = setup
    result = _eval(tmp_path / "e", "--load", str(root / "ckpt"), "--manifest", manifest)
    assert list(result["languages"]) == ["aaa_Latn", "bbb_Latn", "ccc_Cyrl"]  # largest first
    for r in result["languages"].values():
        assert {"loss", "accuracy", "masked_tokens"} <= set(r)
        assert r["rows"] == 4 and r["tokens"] == 256
        assert 0 < r["masked_tokens"] < 256 and r["loss"] > 0 and 0 <= r["accuracy"] <= 1
    per = result["languages"].values()
    m = result["mean"]
    assert m["masked_tokens"] == sum(r["masked_tokens"] for r in per)
    assert m["loss"] == pytest.approx(sum(r["loss"] * r["masked_tokens"] for r in per) / m["masked_tokens"])
    assert m["macro_loss"] == pytest.approx(np.mean([r["loss"] for r in per]))
    assert {g: r["members"] for g, r in result["groups"].items()} == {
        "high": ["aaa_Latn"], "mid": ["bbb_Latn"], "low": ["ccc_Cyrl"]}
    with open(tmp_path / "e" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["language"] for r in rows][:3] == ["aaa_Latn", "bbb_Latn", "ccc_Cyrl"]
    assert float(rows[0]["loss"]) == pytest.approx(result["languages"]["aaa_Latn"]["loss"], abs=1e-6)
    assert "mean (token-weighted)" in capsys.readouterr().out


def test_deterministic_per_seed_and_languages_option(setup, tmp_path):
    root, manifest = setup
    args = ["--hf-dir", str(root / "hf"), "--manifest", manifest]
    a = _eval(tmp_path / "a", *args)
    b = _eval(tmp_path / "b", *args)
    c = _eval(tmp_path / "c", *args, "--seed", "1")
    assert a["languages"] == b["languages"]
    assert a["languages"]["aaa_Latn"]["loss"] != c["languages"]["aaa_Latn"]["loss"]
    # A language's masks do not depend on which other languages are evaluated.
    d = _eval(tmp_path / "d", *args, "--languages", "ccc_Cyrl")
    assert list(d["languages"]) == ["ccc_Cyrl"]
    assert d["languages"]["ccc_Cyrl"] == a["languages"]["ccc_Cyrl"]
    assert list(_eval(tmp_path / "t", *args, "--languages", "top:2")["languages"]) == ["aaa_Latn", "bbb_Latn"]


def test_megatron_equals_its_hf_export(setup, tmp_path):
    root, manifest = setup
    ours = _eval(tmp_path / "m", "--load", str(root / "ckpt"), "--manifest", manifest)
    hf = _eval(tmp_path / "h", "--hf-dir", str(root / "exported"), "--manifest", manifest)
    for lang, r in ours["languages"].items():
        assert r["masked_tokens"] == hf["languages"][lang]["masked_tokens"]
        assert r["loss"] == pytest.approx(hf["languages"][lang]["loss"], abs=1e-4)
        assert r["accuracy"] == pytest.approx(hf["languages"][lang]["accuracy"], abs=1e-4)


@pytest.mark.slow
def test_tp1_equals_tp2_under_torchrun(setup, tmp_path):
    import subprocess
    import sys

    root, manifest = setup
    one = _eval(tmp_path / "tp1", "--load", str(root / "ckpt"), "--manifest", manifest)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", str(root / "ckpt"),
                           "--manifest", manifest, "--tp", "2", "--out", str(tmp_path / "tp2"), *COMMON],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "tp2" / "eval.json") as f:
        two = json.load(f)
    for lang, r in one["languages"].items():
        assert r["masked_tokens"] == two["languages"][lang]["masked_tokens"]
        assert r["loss"] == pytest.approx(two["languages"][lang]["loss"], abs=1e-4)
        assert r["accuracy"] == pytest.approx(two["languages"][lang]["accuracy"], abs=1e-4)


def test_model_trained_on_one_language_ranks_it_best(setup, tmp_path, capsys):
    """A few Adam steps of the HF model on one language's masked rows (another seed than the
    evaluation's): evaluate and compare must put that language first."""
    from transformers import AutoModelForMaskedLM

    from megatron_mmbert.evaluation import data as eval_data

    root, manifest_path = setup
    manifest = eval_data.load(manifest_path)
    model = AutoModelForMaskedLM.from_pretrained(root / "hf", attn_implementation="eager")
    rows = eval_data.language_rows(manifest, "ccc_Cyrl", 64, 0.3, 64 * 16, seed=99, micro_batch_rows=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(3):
        for batch in rows.batches:
            # Rows as single sequences: the packing boundaries do not matter for what is learned here.
            loss = model(input_ids=batch["tokens"], labels=batch["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(root / "trained")
    trained = _eval(tmp_path / "t", "--hf-dir", str(root / "trained"), "--manifest", manifest_path)
    losses = {lang: r["loss"] for lang, r in trained["languages"].items()}
    assert min(losses, key=losses.get) == "ccc_Cyrl", losses
    out = tmp_path / "cmp"
    assert evaluate_main(["--compare", str(root / "hf"), str(root / "trained"), "--manifest", manifest_path,
                          "--out", str(out), *COMMON]) == 0
    with open(out / "compare.json") as f:
        table = json.load(f)
    assert table["models"] == ["hf", "trained"]
    assert table["languages"]["ccc_Cyrl"]["winner"] == "trained"
    assert table["languages"]["ccc_Cyrl"]["loss"]["trained"] == pytest.approx(losses["ccc_Cyrl"], abs=1e-9)
    assert os.path.isfile(out / "compare.csv") and os.path.isfile(out / "trained" / "eval.json")
    assert "winner" in capsys.readouterr().out
    # A rerun (e.g. after an interruption) reuses each model's finished result.
    assert evaluate_main(["--compare", str(root / "hf"), str(root / "trained"), "--manifest", manifest_path,
                          "--out", str(out), *COMMON]) == 0
    assert capsys.readouterr().err.count("reusing") == 2
    with open(out / "compare.json") as f:
        assert json.load(f)["languages"] == table["languages"]


def test_bad_inputs_are_named(setup, tmp_path, capsys):
    root, manifest = setup
    assert evaluate_main(["--hf-dir", str(root / "ckpt"), "--manifest", manifest, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err  # the library names the field, the command line adds its flag
    assert "is a megatron-mmbert checkpoint: pass it as load [--hf_dir]" in err
    assert evaluate_main(["--load", str(root / "ckpt"), "--manifest", manifest, "--out", str(tmp_path / "y"),
                          "--languages", "zzz_Latn"]) == 2
    err = capsys.readouterr().err
    assert "zzz_Latn" in err and "[--languages]" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert evaluate_main(["--load", str(root / "ckpt"), "--manifest", manifest, "--out", str(tmp_path / "taken")]) == 2
    assert "not an evaluate output" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_option_errors_name_fields_all_at_once():
    from megatron_mmbert.cli.evaluate import build_parser
    from megatron_mmbert.config_base import ConfigError
    from megatron_mmbert.evaluation.config import EvaluateConfig

    with pytest.raises(ConfigError) as e:
        EvaluateConfig(manifest="m", out="o", seq_len=1, tp=0, mask_rate=1.5).validate()
    assert sorted(x.field for x in e.value.errors) == ["load", "mask_rate", "seq_len", "tp"]
    assert "--" not in str(e.value)  # the library names fields; the command line adds the flags:
    _, spec = build_parser()
    assert "seq_len must be >= 2, got 1 [--seq_len]" in spec.explain(e.value)


def test_resource_groups_are_terciles_by_manifest_tokens():
    from megatron_mmbert.evaluation.metrics import resource_groups

    tokens = {"a": 70, "b": 60, "c": 50, "d": 40, "e": 30, "f": 20, "g": 10}
    groups = resource_groups(["g", "f", "e", "d", "c", "b", "a"], tokens)
    assert groups == {"high": ["a", "b", "c"], "mid": ["d", "e", "f"], "low": ["g"]}
    assert resource_groups(["x", "y"], {"x": 1, "y": 1}) == {"high": ["x"], "mid": ["y"]}  # ties by name
