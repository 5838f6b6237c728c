"""TIES / task arithmetic / linear / EMA merging, checked against the published equations.

The reference implementations below are written here from the TIES paper (Yadav et al. 2023,
arXiv 2306.01708: trim to the top-k% magnitudes, elect the sign of the summed mass, disjoint mean
of the agreeing non-zero entries, add lambda times it to the base) with plain sorting, not with
anything from ``megatron_mmbert.merge``. Checkpoints go through the real streaming tool, with tiny
blocks so that tensors are split into several row blocks.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from megatron_mmbert.cli.ties_merge import main as cli_main
from megatron_mmbert.checkpoints.layout import CheckpointError
from megatron_mmbert.merge.stream import merge_checkpoints
from megatron_mmbert.merge.ties import MergeSpec

SHAPES = {"emb.weight": (40, 12), "layer.w": (18, 10), "layer.b": (10,), "norm.weight": (12,)}
TINY_BLOCK = 160  # bytes of float64: 20 values, so most tensors span several row blocks


# ------------------------------------------------------------------------------ reference (paper)


def ref_trim(taus, density, trim):
    """Top-k by |tau| with k = max(1, floor(density * n)), per tensor or over the whole model."""
    names = sorted(taus)
    if trim == "global":
        flat = torch.cat([taus[n].flatten() for n in names])
        k = max(1, int(density * flat.numel()))
        order = torch.sort(flat.abs(), descending=True).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:k]] = True
        # the premise of the test: no tie at the cut, even once magnitudes are float32
        s = torch.sort(flat.abs().float(), descending=True).values
        assert s[k - 1] != s[k]
        out, i = {}, 0
        for n in names:
            m = taus[n].numel()
            out[n] = torch.where(keep[i:i + m].view(taus[n].shape), taus[n], torch.zeros_like(taus[n]))
            i += m
        return out
    out = {}
    for n in names:
        flat = taus[n].flatten()
        k = max(1, int(density * flat.numel()))
        order = torch.sort(flat.abs(), descending=True).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:k]] = True
        if k < flat.numel():
            s = torch.sort(flat.abs().float(), descending=True).values
            assert s[k - 1] != s[k]
        out[n] = torch.where(keep.view(taus[n].shape), taus[n], torch.zeros_like(taus[n]))
    return out


def ref_ties(base, models, weights, density, lam, trim, normalize):
    names = sorted(base)
    trimmed = [ref_trim({n: m[n].double() - base[n].double() for n in names}, density, trim) for m in models]
    out = {}
    for n in names:
        t = torch.stack([tt[n] for tt in trimmed])  # [models, ...]
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * (t.dim() - 1)))
        elected = torch.where((w * t).sum(0) >= 0, 1.0, -1.0).double()
        agree = (torch.sign(t) == elected).double()  # zeros have sign 0: never agree
        num = (w * t * agree).sum(0)
        den = (w * agree).sum(0) if normalize else agree.sum(0)
        den[den == 0] = 1.0
        out[n] = (base[n].double() + lam * num / den).to(base[n].dtype)
    return out


# ------------------------------------------------------------------------------------ fixtures


def write_hf(path, tensors, vocab_size=40):
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "test", "vocab_size": vocab_size}, f)
    return path


def random_family(n_models, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_models)]
    return base, models


def load_out(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def family(tmp_path):
    base, models = random_family(3)
    base["position_ids"] = torch.arange(7)  # non-float: copied from the base
    for m in models:
        m["position_ids"] = torch.arange(7) + 1
    b = write_hf(str(tmp_path / "base"), base)
    ms = [write_hf(str(tmp_path / f"m{i}"), m) for i, m in enumerate(models)]
    return base, models, b, ms


# --------------------------------------------------------------------------- 1. the equations


@pytest.mark.parametrize("trim", ["per-tensor", "global"])
@pytest.mark.parametrize("weights,normalize", [(None, False), ([0.5, 1.5, 1.0], False), ([0.5, 1.5, 1.0], True)])
def test_ties_matches_reference(tmp_path, family, trim, weights, normalize):
    base, models, b, ms = family
    spec = MergeSpec(method="ties", weights=weights, density=0.3, lam=1.3, trim=trim, normalize=normalize)
    report = merge_checkpoints(b, ms, spec, str(tmp_path / "out"), chunk_bytes=TINY_BLOCK, log=None)
    got = load_out(str(tmp_path / "out"))
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    want = ref_ties(floats, [{k: m[k] for k in floats} for m in models], weights or [1.0] * 3, 0.3, 1.3, trim, normalize)
    for k in floats:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    assert torch.equal(got["position_ids"], base["position_ids"])
    # the report: exactly k kept per tensor (per-tensor trim) or over the model (global)
    total = sum(v.numel() for v in floats.values())
    for t in range(3):
        kept = sum(e["fraction_kept"][t] * e["numel"] for e in report["tensors"].values())
        if trim == "global":
            assert round(kept) == int(0.3 * total)
        else:
            assert round(kept) == sum(int(0.3 * v.numel()) for v in floats.values())
    assert 0 < report["summary"]["sign_conflict_rate"] < 1
    assert report["copied_from_base"] == ["position_ids"]


def test_other_methods_match_formulas(tmp_path, family):
    base, models, b, ms = family
    floats = [k for k, v in base.items() if v.is_floating_point()]
    w = [0.2, 0.5, 0.3]
    merge_checkpoints(b, ms, MergeSpec(method="task_arithmetic", weights=w, lam=0.4), str(tmp_path / "ta"),
                      chunk_bytes=TINY_BLOCK, log=None)
    merge_checkpoints(b, ms, MergeSpec(method="task_arithmetic", weights=w, normalize=True), str(tmp_path / "tan"),
                      chunk_bytes=TINY_BLOCK, log=None)
    merge_checkpoints(None, ms, MergeSpec(method="linear", weights=w), str(tmp_path / "lin"),
                      chunk_bytes=TINY_BLOCK, log=None)
    merge_checkpoints(None, ms, MergeSpec(method="ema", ema_decay=0.8), str(tmp_path / "ema"),
                      chunk_bytes=TINY_BLOCK, log=None)
    ta, tan, lin, ema = (load_out(str(tmp_path / d)) for d in ("ta", "tan", "lin", "ema"))
    for k in floats:
        b64 = base[k].double()
        tv = [m[k].double() - b64 for m in models]
        torch.testing.assert_close(ta[k], (b64 + 0.4 * sum(wi * t for wi, t in zip(w, tv))).float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(tan[k], (b64 + sum(wi * t for wi, t in zip(w, tv)) / sum(w)).float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(lin[k], (sum(wi * m[k].double() for wi, m in zip(w, models)) / sum(w)).float(),
                                   atol=1e-6, rtol=0)
        e = models[0][k].double()  # the EMA recursion itself, oldest checkpoint first
        for m in models[1:]:
            e = 0.8 * e + 0.2 * m[k].double()
        torch.testing.assert_close(ema[k], e.float(), atol=1e-6, rtol=0)
    # linear / ema without --base take non-float tensors from the first model
    assert torch.equal(lin["position_ids"], models[0]["position_ids"])


@pytest.mark.parametrize("weights,density,lam", [([0.5, 1.5, 1.0], 0.3, 1.3), ([1.0, 1.0, 1.0], 0.2, 1.0)])
def test_matches_mergekit(tmp_path, weights, density, lam):
    """A tiny ModernBertForMaskedLM base and three fine-tuned copies merged by us and by mergekit
    (the ``test`` extra), through its public API (``run_merge`` on a ``MergeConfiguration``, what
    ``mergekit-yaml`` runs): TIES with per-tensor magnitude trim, weights, ``normalize`` and
    ``lambda``, float32. Every tensor agrees."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from tests.helpers.model import make_hf_model

    base = make_hf_model("even", str(tmp_path / "base"))
    start = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    models = []
    for i in range(3):  # fine-tuned copies: the base plus independent noise
        base.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in start.items()})
        models.append(str(tmp_path / f"m{i}"))
        base.save_pretrained(models[-1])
    merge_checkpoints(str(tmp_path / "base"), models, MergeSpec(weights=weights, density=density, lam=lam,
                                                                normalize=True),
                      str(tmp_path / "ours"), chunk_bytes=TINY_BLOCK, log=None)
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "models": [{"model": m, "parameters": {"weight": w, "density": density}} for m, w in zip(models, weights)],
              "parameters": {"normalize": True, "lambda": lam}}
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mergekit"),
              MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False))
    ours, theirs = load_out(str(tmp_path / "ours")), load_out(str(tmp_path / "mergekit"))
    assert set(ours) == set(theirs) and len(ours) > 10
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=1e-5, msg=k)


# ------------------------------------------------------------------------ 3. identity properties


def test_single_model_density_one_is_exact(tmp_path, family):
    base, models, b, ms = family
    merge_checkpoints(b, ms[:1], MergeSpec(density=1.0, lam=1.0), str(tmp_path / "o"), chunk_bytes=TINY_BLOCK,
                      log=None)
    got = load_out(str(tmp_path / "o"))
    for k, v in base.items():
        if v.is_floating_point():
            assert torch.equal(got[k], models[0][k]), k


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_identical_models_give_the_same_model(tmp_path, family, method):
    base, models, b, ms = family
    spec = MergeSpec(method=method, density=0.5 if method == "ties" else 1.0, normalize=method != "linear",
                     weights=[0.3, 0.7] if method != "ties" else None)
    merge_checkpoints(b if method != "linear" else None, [ms[0], ms[0]], spec, str(tmp_path / "o"),
                      chunk_bytes=TINY_BLOCK, log=None)
    got = load_out(str(tmp_path / "o"))
    for k, v in base.items():
        if v.is_floating_point():
            if method == "ties":  # density 0.5: the identical kept half equals the model, the rest the base
                tau = models[0][k].double() - v.double()
                kept = got[k] != v
                assert torch.equal(got[k][kept], models[0][k][kept])
                assert int(kept.sum()) == max(1, int(0.5 * v.numel()))
            else:
                assert torch.equal(got[k], models[0][k]), k


# -------------------------------------------------------------------------------- 4. mismatches


def test_mismatch_errors(tmp_path):
    base, (m0, m1) = random_family(2)
    b = write_hf(str(tmp_path / "b"), base)
    good = write_hf(str(tmp_path / "good"), m0)
    spec = MergeSpec(density=0.5)

    missing = dict(m1)
    del missing["layer.b"]
    with pytest.raises(CheckpointError, match=r"tensor layer\.b is in .*b but missing from .*missing"):
        merge_checkpoints(b, [good, write_hf(str(tmp_path / "missing"), missing)], spec, str(tmp_path / "o"), log=None)

    shape = dict(m1, **{"layer.w": torch.randn(18, 11)})
    with pytest.raises(CheckpointError, match=r"tensor layer\.w: shape \[18, 10\] in .*b but \[18, 11\] in .*shape"):
        merge_checkpoints(b, [good, write_hf(str(tmp_path / "shape"), shape)], spec, str(tmp_path / "o"), log=None)

    dtype = dict(m1, **{"norm.weight": m1["norm.weight"].to(torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"tensor norm\.weight: dtype torch\.float32 in .*b but torch\.bfloat16"):
        merge_checkpoints(b, [good, write_hf(str(tmp_path / "dtype"), dtype)], spec, str(tmp_path / "o"), log=None)

    vocab = dict(m1, **{"emb.weight": torch.randn(44, 12)})
    with pytest.raises(CheckpointError, match=r"different vocabularies: .*b has vocab_size 40 but .*vocab has 44"):
        merge_checkpoints(b, [good, write_hf(str(tmp_path / "vocab"), vocab, vocab_size=44)], spec,
                          str(tmp_path / "o"), log=None)

    nan = dict(m1, **{"layer.b": torch.full((10,), float("nan"))})
    with pytest.raises(CheckpointError, match=r"tensor layer\.b in .*nan holds NaN"):
        merge_checkpoints(b, [good, write_hf(str(tmp_path / "nan"), nan)], spec, str(tmp_path / "o"), log=None)

    os.makedirs(tmp_path / "fake_megatron")
    (tmp_path / "fake_megatron" / "metadata.json").write_text("{}")
    # mixing formats (or asking for the other one) converts, which needs ModernBERT models
    with pytest.raises(CheckpointError, match=r"need converting between formats, which works for ModernBERT "
                       r"checkpoints only: .*b: config model_type is 'test'"):
        merge_checkpoints(b, [good, str(tmp_path / "fake_megatron")], spec, str(tmp_path / "o"), log=None)
    with pytest.raises(CheckpointError, match=r"out_format megatron need converting"):
        merge_checkpoints(b, [good], spec, str(tmp_path / "o"), out_format="megatron", log=None)

    with pytest.raises(ValueError, match="weights has 1 values for 2 models"):
        merge_checkpoints(b, [good, good], MergeSpec(weights=[1.0]), str(tmp_path / "o"), log=None)
    with pytest.raises(ValueError, match="needs base"):
        merge_checkpoints(None, [good], spec, str(tmp_path / "o"), log=None)
    assert not os.path.exists(tmp_path / "o")  # nothing half-written
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


# ----------------------------------------------------------------------- 5. CLI on real ModernBERT


def test_cli_end_to_end_modernbert(tmp_path, capsys):
    from transformers import AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

    cfg = ModernBertConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    torch.manual_seed(0)
    base = ModernBertForMaskedLM(cfg)
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(3):
        m = ModernBertForMaskedLM(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        m.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    out = str(tmp_path / "merged")
    rc = cli_main(["--base", str(tmp_path / "base"), "--models", *paths, "--density", "0.2", "--trim", "global",
                   "--out", out, "--chunk-mb", "0.01"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "params/s" in err and "ETA" in err
    merged = AutoModelForMaskedLM.from_pretrained(out)
    # tied decoder still tied, and every weight is the reference TIES of the three
    assert merged.decoder.weight.data_ptr() == merged.model.embeddings.tok_embeddings.weight.data_ptr()
    sds = [AutoModelForMaskedLM.from_pretrained(p).state_dict() for p in paths]
    bsd = base.state_dict()
    names = [k for k in load_out(out)]
    want = ref_ties({k: bsd[k] for k in names}, [{k: sd[k] for k in names} for sd in sds], [1.0] * 3, 0.2, 1.0,
                    "global", False)
    msd = merged.state_dict()
    for k in names:
        torch.testing.assert_close(msd[k], want[k], atol=1e-6, rtol=0, msg=k)
    report = json.load(open(os.path.join(out, "merge_report.json")))
    assert set(report["tensors"]) == set(names)
    # rerun without --overwrite refuses; with it, replaces atomically
    assert cli_main(["--base", str(tmp_path / "base"), "--models", *paths, "--out", out, "--quiet"]) == 2
    assert "exists; choose a new folder, or set overwrite" in capsys.readouterr().err
    assert cli_main(["--base", str(tmp_path / "base"), "--models", *paths, "--out", out, "--quiet",
                     "--overwrite", "--method", "linear"]) == 0
    # the same TIES merge as a YAML recipe; a flag given on top wins over the recipe (density 0.5 -> 0.2)
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(tmp_path / "base"), "models": paths, "out": str(tmp_path / "yaml"),
                                      "spec": {"method": "ties", "density": 0.5, "trim": "global"},
                                      "chunk_mb": 0.01, "quiet": True}))
    assert cli_main(["--config", str(recipe), "--density", "0.2"]) == 0
    ysd = AutoModelForMaskedLM.from_pretrained(tmp_path / "yaml").state_dict()
    for k in names:
        torch.testing.assert_close(ysd[k], want[k], atol=1e-6, rtol=0, msg=k)


# --------------------------------------------------------- 2. megatron checkpoints at any layout

MEG_SHAPES = {"a.weight": (16, 6), "b.weight": (6, 10), "layers.w": (2, 5, 4), "norm.weight": (6,)}


def _sharded(tensors, layout, rank):
    """The sharded state dict one rank of a 2-process world saves, for a made-up TP/PP layout."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    st = ShardedTensor.from_rank_offsets
    sd = {}
    a, b, w, n = (tensors[k] for k in MEG_SHAPES)
    if layout == "tp1":  # every rank holds everything; rank 1 is a replica (data parallel)
        for k, t in tensors.items():
            sd[k] = st(k, t.clone(), replica_id=rank)
    elif layout == "tp2":  # row-parallel a, column-parallel b and layer weights, replicated norm
        sd["a.weight"] = st("a.weight", a.chunk(2, 0)[rank].clone(), (0, rank, 2))
        sd["b.weight"] = st("b.weight", b.chunk(2, 1)[rank].clone(), (1, rank, 2))
        for layer in range(2):
            sd[f"w{layer}"] = st("layers.w", w[layer].chunk(2, 1)[rank].clone(), (0, layer, 2), (2, rank, 2),
                                 prepend_axis_num=1)
        sd["norm.weight"] = st("norm.weight", n.clone(), replica_id=rank)
        # optimizer state beside the weights: must not be merged (or required)
        sd["opt"] = st("optimizer.state.exp_avg.a.weight", torch.zeros(8, 6), (0, rank, 2))
    elif layout == "pp2":  # stage 0: a + norm + layer 0; stage 1: b + layer 1
        if rank == 0:
            sd["a.weight"] = st("a.weight", a.clone())
            sd["norm.weight"] = st("norm.weight", n.clone())
        else:
            sd["b.weight"] = st("b.weight", b.clone())
        sd["w"] = st("layers.w", w[rank].clone(), (0, rank, 2), prepend_axis_num=1)
    return sd


def _world2_worker(rank, store, jobs, check):
    import torch.distributed as dist

    from megatron_mmbert import cpu_adapter

    cpu_adapter.install()
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="file://" + store)
    from megatron.core import dist_checkpointing

    for path, tensors, layout in jobs:
        os.makedirs(path, exist_ok=True)
        dist_checkpointing.save(_sharded(tensors, layout, rank), path)
        if rank == 0:
            with open(os.path.join(path, "mmbert_config.json"), "w") as f:
                json.dump({"model": {"vocab_size": 16}}, f)
    if check is not None:  # load a checkpoint back at the TP2 layout and compare with the full tensors
        path, tensors = check
        request = {k: v for k, v in _sharded({k: torch.empty_like(t) for k, t in tensors.items()}, "tp2", rank).items()
                   if k != "opt"}
        got = dist_checkpointing.load(request, path)
        want = _sharded(tensors, "tp2", rank)
        for k in got:
            assert torch.equal(got[k], want[k].data), k
    dist.barrier()
    dist.destroy_process_group()


def _run_world2(tmp_path, jobs, check=None):
    import torch.multiprocessing as mp

    store = str(tmp_path / f"store-{len(os.listdir(tmp_path))}")
    mp.start_processes(_world2_worker, args=(store, jobs, check), nprocs=2, start_method="spawn")


@pytest.mark.slow  # two 2-process worlds and eight megatron-core saves: ~45 s on 2 cores
def test_megatron_layouts_merge_like_tp1(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {k: torch.randn(s, generator=g) for k, s in MEG_SHAPES.items()}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    d = lambda name: str(tmp_path / name)  # noqa: E731
    _run_world2(tmp_path, [
        (d("base_tp1"), base, "tp1"), (d("m0_tp1"), models[0], "tp1"), (d("m1_tp1"), models[1], "tp1"),
        (d("base_tp2"), base, "tp2"), (d("m0_pp2"), models[0], "pp2"), (d("m1_tp2"), models[1], "tp2"),
    ])
    spec = dict(weights=[0.7, 1.3], density=0.4, lam=1.1, trim="global", normalize=True)
    # 640-byte blocks: 13 rows of a.weight, so a block straddles the TP2 shards' boundary at row 8
    merge_checkpoints(d("base_tp1"), [d("m0_tp1"), d("m1_tp1")], MergeSpec(**spec), d("out_tp1"),
                      chunk_bytes=640, log=None)
    report = merge_checkpoints(d("base_tp2"), [d("m0_pp2"), d("m1_tp2")], MergeSpec(**spec), d("out_mixed"),
                               chunk_bytes=640, log=None)
    assert set(report["tensors"]) == set(MEG_SHAPES)  # the optimizer key was not merged

    from megatron_mmbert.checkpoints.tensors import DistSession, MegatronSource

    session = DistSession()
    try:
        tp1, mixed = MegatronSource(d("out_tp1"), session), MegatronSource(d("out_mixed"), session)
        want = ref_ties(base, models, spec["weights"], 0.4, 1.1, "global", True)
        merged = {}
        for k in MEG_SHAPES:
            merged[k] = mixed.read(k)
            assert torch.equal(merged[k], tp1.read(k)), k
            torch.testing.assert_close(merged[k], want[k], atol=1e-6, rtol=0, msg=k)
            # and reading a row block crossing the saved shards gives those rows
            assert torch.equal(MegatronSource(d("base_tp2"), session).read(k, 1, 2), base[k][1:2])
    finally:
        session.close()
    # the model config only (no training position or optimizer flag for the merged weights), and
    # the digests of every file the merge wrote
    meta = json.load(open(d("out_mixed") + "/mmbert_config.json"))
    assert meta["model"] == {"vocab_size": 16} and meta["source"] == "ties_merge"
    assert set(meta) == {"model", "source", "files"} and ".metadata" in meta["files"]
    # the TP1/PP1 output loads at another layout
    _run_world2(tmp_path, [], check=(d("out_mixed"), merged))
