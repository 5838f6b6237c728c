"""HF <-> megatron conversion: round trips, the verify command, and clear errors on bad input."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mmbert import runtime
from megatron_mmbert.cli.convert_checkpoint import main as convert_main
from megatron_mmbert.config import ConfigError
from megatron_mmbert.convert import hf as hf_map
from megatron_mmbert.convert.checkpoints import export_hf, import_hf, load_canonical
from tests.helpers.model import make_hf_model, packed_batch, hf_reference_logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    hf = make_hf_model("odd", str(root / "hf"))
    import_hf(str(root / "hf"), str(root / "ckpt"))
    runtime.shutdown()
    export_hf(str(root / "ckpt"), str(root / "exported"))
    runtime.shutdown()
    return root, hf


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    runtime.shutdown()


def test_export_loads_in_transformers_with_identical_logits(converted):
    from transformers import AutoModelForMaskedLM

    root, hf = converted
    again = AutoModelForMaskedLM.from_pretrained(root / "exported", attn_implementation="eager").eval()
    batch = packed_batch([[64], [20, 44]], hf.config.vocab_size, seed=4)
    assert torch.equal(hf_reference_logits(again, batch), hf_reference_logits(hf, batch))
    config = json.loads((root / "exported" / "config.json").read_text())
    # Both thetas written explicitly (transformers defaults the local one to 10k otherwise).
    assert config["global_rope_theta"] == 160000.0 and config["local_rope_theta"] == 10000.0
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    # mmBERT's classifier fields (sequence classification pools by the mean)
    assert (config["classifier_pooling"], config["classifier_dropout"], config["classifier_bias"],
            config["classifier_activation"]) == ("mean", 0.0, False, "gelu")
    tensors = load_file(root / "exported" / "model.safetensors")
    assert "decoder.weight" not in tensors and "decoder.bias" in tensors  # tied decoder


def test_import_of_export_is_bitwise_equal(converted, tmp_path):
    root, _ = converted
    import_hf(str(root / "exported"), str(tmp_path / "again"))
    runtime.shutdown()
    _, first = load_canonical(str(root / "ckpt"))
    runtime.shutdown()
    _, second = load_canonical(str(tmp_path / "again"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_verify_command_passes_and_catches_a_wrong_model(converted, tmp_path, capsys):
    root, _ = converted
    assert convert_main(["verify", "--hf-dir", str(root / "hf"), "--load", str(root / "ckpt")]) == 0
    assert "OK" in capsys.readouterr().out
    make_hf_model("odd", str(tmp_path / "other"), seed=1)
    assert convert_main(["verify", "--hf-dir", str(tmp_path / "other"), "--load", str(root / "ckpt")]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("backend, precision", [("flex", "fp32"), ("sdpa", "bf16"), ("flex", "bf16"), ("sdpa", "amp_bf16")])
def test_verify_takes_attention_backend_and_precision(converted, tmp_path, capsys, backend, precision):
    """Any CPU-runnable kernel at any precision against HF in one command; the bf16 tolerance still
    catches a different model (negative control)."""
    root, _ = converted
    args = ["--attention-backend", backend, "--precision", precision]
    assert convert_main(["verify", "--hf-dir", str(root / "hf"), "--load", str(root / "ckpt"), *args]) == 0
    out = capsys.readouterr().out
    assert f"{backend} attention, {precision}: OK" in out, out
    make_hf_model("odd", str(tmp_path / "other"), seed=1)
    assert convert_main(["verify", "--hf-dir", str(tmp_path / "other"), "--load", str(root / "ckpt"), *args]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_with_an_unavailable_backend_names_it(converted, capsys):
    root, _ = converted
    args = ["verify", "--hf-dir", str(root / "hf"), "--load", str(root / "ckpt"), "--attention-backend", "flash"]
    assert convert_main(args) == 2
    assert "model.attention_backend='flash' cannot run on this machine: flash-attn" in capsys.readouterr().err


def test_qkv_layout_round_trip_and_per_head_grouping():
    model = hf_map.ModelConfig(hidden_size=8, num_attention_heads=2, intermediate_size=4, num_layers=1, vocab_size=10)
    w = torch.arange(24 * 8, dtype=torch.float32).view(24, 8)
    key, mw = hf_map.tensor_to_megatron("model.layers.0.attn.Wqkv.weight", w, model, 128)
    assert key == "encoder.layers.0.self_attention.linear_qkv.weight"
    # megatron rows: [q_head0, k_head0, v_head0, q_head1, ...] with head_dim 4
    assert torch.equal(mw[4:8], w[8:12]) and torch.equal(mw[12:16], w[4:8])
    back_key, back = hf_map.tensor_to_hf(key, mw, model)
    assert back_key == "model.layers.0.attn.Wqkv.weight" and torch.equal(back, w)


def _copy_hf(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(converted, tmp_path):
    root, _ = converted
    d = _copy_hf(root / "hf", tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.3.mlp.Wo.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ConfigError, match=r"missing 1 tensor\(s\), first: \['model.layers.3.mlp.Wo.weight'\]"):
        import_hf(str(d), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_shape_mismatch_is_named(converted, tmp_path):
    root, _ = converted
    d = _copy_hf(root / "hf", tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.attn.Wo.weight"] = torch.zeros(64, 32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model.layers.1.attn.Wo.weight has shape \(64, 32\), expected \(64, 64\)"):
        import_hf(str(d), str(tmp_path / "out"))


def test_unexpected_tensor_is_named(converted, tmp_path):
    root, _ = converted
    d = _copy_hf(root / "hf", tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.attn_norm.weight"] = torch.ones(64)  # ModernBERT's layer 0 has none
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ConfigError, match="tensors ModernBERT does not: \\['model.layers.0.attn_norm.weight'\\]"):
        import_hf(str(d), str(tmp_path / "out"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "bert"}, "model_type is 'bert', not 'modernbert'"),
        ({"norm_bias": True}, "norm_bias=True is not supported"),
        ({"hidden_activation": "silu"}, "hidden_activation='silu' is not supported"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
    ],
)
def test_unsupported_configs_are_refused(converted, tmp_path, change, message):
    root, _ = converted
    d = _copy_hf(root / "hf", tmp_path / "hf")
    config = json.loads((d / "config.json").read_text())
    config.update(change)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        import_hf(str(d), str(tmp_path / "out"))


def test_cli_reports_errors_without_traceback(converted, tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # outputs beside the input, not inside it (that is refused first)
    assert convert_main(["import-hf", "--hf-dir", str(tmp_path / "empty"), "--save", str(tmp_path / "x")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert convert_main(["export-hf", "--load", str(tmp_path / "empty"), "--out", str(tmp_path / "y")]) == 2
    assert "not a megatron-mmbert checkpoint" in capsys.readouterr().err


def test_merged_model_checkpoints_load_and_export(converted, tmp_path):
    """tools/ties_merge.py on our own model checkpoints: the output loads at TP1 and exports to HF."""
    from transformers import AutoModelForMaskedLM

    from megatron_mmbert.cli.ties_merge import main as merge_main

    root, _ = converted
    make_hf_model("odd", str(tmp_path / "hf_b"), seed=1)
    import_hf(str(tmp_path / "hf_b"), str(tmp_path / "b"))
    runtime.shutdown()
    assert merge_main(["--method", "linear", "--models", str(root / "ckpt"), str(tmp_path / "b"),
                       "--weights", "0.5", "0.5", "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    _, a = load_canonical(str(root / "ckpt"))
    runtime.shutdown()
    _, b = load_canonical(str(tmp_path / "b"))
    runtime.shutdown()
    _, merged = load_canonical(str(tmp_path / "merged"))
    runtime.shutdown()
    for key in a:
        assert torch.allclose(merged[key], 0.5 * (a[key] + b[key]), atol=1e-7), key
    export_hf(str(tmp_path / "merged"), str(tmp_path / "merged_hf"))
    AutoModelForMaskedLM.from_pretrained(tmp_path / "merged_hf")


def _word_tokenizer(directory, vocab_size, mask_id):
    """A word-level fast tokenizer of ``vocab_size`` ids whose mask id is ``mask_id`` (not
    ModernBERT's default 4, so an export that hard-coded the ids would be caught)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"[PAD]": 0, "[EOS]": 1, "[BOS]": 2, "[UNK]": 3, "[MASK]": mask_id}
    words = iter(f"w{i}" for i in range(vocab_size))
    vocab = {tok: i for tok, i in specials.items()}
    vocab.update({next(words): i for i in range(vocab_size) if i not in specials.values()})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                            unk_token="[UNK]", mask_token="[MASK]").save_pretrained(directory)
    return directory


def _assert_ids_agree(out, mask_id):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == mask_id == config["mask_token_id"]
    for role in ("pad", "bos", "eos"):
        assert getattr(tok, f"{role}_token_id") == config[f"{role}_token_id"], role
    return tok


def test_tokenizer_travels_through_import_and_export_and_fill_mask_runs(converted, tmp_path):
    from transformers import AutoModelForMaskedLM, pipeline

    root, hf = converted
    src = _word_tokenizer(_copy_hf(root / "hf", tmp_path / "hf"), hf.config.vocab_size, mask_id=7)
    import_hf(str(src), str(tmp_path / "ckpt"))
    runtime.shutdown()
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()  # kept beside the weights
    assert convert_main(["export-hf", "--load", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    tok = _assert_ids_agree(tmp_path / "out", mask_id=7)
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    filled = pipeline("fill-mask", model=model, tokenizer=tok)("w10 w11 [MASK] w12 w13", top_k=3)
    assert len(filled) == 3 and all(0 <= r["token"] < hf.config.vocab_size for r in filled)


def test_export_without_tokenizer_warns_and_the_flag_supplies_one(converted, tmp_path, caplog):
    root, hf = converted
    assert not (root / "ckpt" / "tokenizer").exists()  # make_hf_model saves no tokenizer
    with caplog.at_level("WARNING"):
        assert convert_main(["export-hf", "--load", str(root / "ckpt"), "--out", str(tmp_path / "bare")]) == 0
    assert "holds no tokenizer" in caplog.text and "Set the export's tokenizer" in caplog.text
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    tok_dir = _word_tokenizer(tmp_path / "tok", hf.config.vocab_size, mask_id=9)
    assert convert_main(["export-hf", "--load", str(root / "ckpt"), "--out", str(tmp_path / "with"),
                         "--tokenizer", str(tok_dir)]) == 0
    _assert_ids_agree(tmp_path / "with", mask_id=9)
    # a tokenizer whose ids do not fit the model is not this model's tokenizer
    big = _word_tokenizer(tmp_path / "big", hf.config.vocab_size + 10, mask_id=hf.config.vocab_size + 5)
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        export_hf(str(root / "ckpt"), str(tmp_path / "wrong"), tokenizer=str(big))
    # the library names the field, the command line adds its flag
    with pytest.raises(ConfigError, match="tokenizer='/no/such/tok': no such file or folder") as e:
        export_hf(str(root / "ckpt"), str(tmp_path / "none"), tokenizer="/no/such/tok")
    assert e.value.field == "tokenizer"


def test_hf_reader_honours_the_index_and_refuses_bin(converted, tmp_path):
    root, hf = converted
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    save_file({"junk": torch.zeros(3)}, sharded / "stray.safetensors")  # not in the index: never read
    import_hf(str(sharded), str(tmp_path / "ckpt"))
    runtime.shutdown()
    _, ours = load_canonical(str(tmp_path / "ckpt"))
    runtime.shutdown()
    _, reference = load_canonical(str(root / "ckpt"))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)

    pickled = tmp_path / "bin"
    pickled.mkdir()
    shutil.copyfile(root / "hf" / "config.json", pickled / "config.json")
    torch.save(load_file(root / "hf" / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"only PyTorch \.bin weights.*safe_serialization=True"):
        import_hf(str(pickled), str(tmp_path / "from_bin"))
