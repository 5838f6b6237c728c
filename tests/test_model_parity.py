"""The encoder against Hugging Face's ModernBertForMaskedLM (fp32, eval), at several layouts and
attention backends.

HF is the reference nobody here wrote: random tiny HF models are imported through the converter and
must give the same logits (1e-4 max abs) on packed rows (HF run per document) and on single
documents longer than the sliding window, with each backend that runs on CPU: ``sdpa`` (masked
rows), ``flex`` (FlexAttention on the packed layout, eager: CPU FlexAttention is forward-only) and
``flash`` with the flash-attn kernel replaced by its TEST REFERENCE (tests/flash_reference.py: the
packing, cu_seqlens, window and head plumbing is ours; the kernel needs CUDA).
"""

import dataclasses

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.config import ConfigError, ParallelConfig
from megatron_mmbert.convert.checkpoints import import_hf
from megatron_mmbert.model.build import build_model, check_fp8, select_backend
from megatron_mmbert.model.pipeline import forward_logits, to_device
from megatron_mmbert.checkpoints import dist as ckpt
from tests.helpers.model import HF_CONFIGS, hf_reference_logits, make_hf_model, packed_batch, torchrun, use_flash_reference

TOL = 1e-4
# Row layouts: documents longer than every window (16 / 8), several documents per row, one-token docs.
ROWS = {
    "single_long_documents": [[64], [64]],
    "packed": [[40, 24], [1, 30, 33]],
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each HF config saved, imported into a dist checkpoint; {name: (hf_model, ckpt_dir, ModelConfig)}."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name in HF_CONFIGS:
        hf = make_hf_model(name, str(root / f"{name}_hf"))
        model = import_hf(str(root / f"{name}_hf"), str(root / f"{name}_ckpt"))
        runtime.shutdown()
        out[name] = (hf, str(root / f"{name}_ckpt"), model)
    return out


@pytest.fixture
def single_process():
    yield
    runtime.shutdown()


BACKENDS = ("sdpa", "flex", "flash")


def _load_tp1(ckpt_dir, model, backend="sdpa", monkeypatch=None, precision="fp32"):
    """The checkpoint at TP1 with ``backend``; bf16 wrapped in megatron's Float16Module as training
    and ``verify --precision bf16`` run it (bf16 weights and activations, fp32 RoPE and logits)."""
    from megatron.core.transformer.module import Float16Module

    parallel = ParallelConfig()
    if backend == "flash":
        use_flash_reference(monkeypatch)
    model = dataclasses.replace(model, attention_backend=backend)
    runtime.initialize(model, parallel)
    chunks = build_model(model, parallel, precision, training=False)
    ckpt.load_model(ckpt_dir, chunks)
    assert chunks[0].backend == backend
    return [Float16Module(c.config, c) for c in chunks] if precision == "bf16" else chunks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
@pytest.mark.parametrize("rows", sorted(ROWS))
def test_parity_tp1_pp1(imported, single_process, monkeypatch, name, rows, backend):
    hf, ckpt_dir, model = imported[name]
    chunks = _load_tp1(ckpt_dir, model, backend, monkeypatch)
    batch = packed_batch(ROWS[rows], model.vocab_size, seed=3)
    ours = forward_logits(chunks, [batch])[0]
    reference = hf_reference_logits(hf, batch)
    assert ours.shape == reference.shape == (2, 64, model.vocab_size)
    assert (ours - reference).abs().max().item() < TOL


# bf16 against HF fp32: relative RMS of the logit difference. bf16 keeps 8 significant bits (2^-9
# relative rounding per operation); through these 4-5 layers and the head it measures 0.6%, and a
# wrong RoPE theta gives 7%, so 2% separates them.
BF16_TOL = 0.02


def _relative_rms(ours, reference):
    return ((ours.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_bf16_parity(imported, single_process, monkeypatch, name, backend):
    hf, ckpt_dir, model = imported[name]
    chunks = _load_tp1(ckpt_dir, model, backend, monkeypatch, precision="bf16")
    assert chunks[0].module.embedding.word_embeddings.weight.dtype == torch.bfloat16
    for rows in sorted(ROWS):
        batch = packed_batch(ROWS[rows], model.vocab_size, seed=3)
        ours, reference = forward_logits(chunks, [batch])[0], hf_reference_logits(hf, batch)
        assert ours.dtype == torch.float32  # Float16Module hands back fp32
        assert _relative_rms(ours, reference) < BF16_TOL, (rows, _relative_rms(ours, reference))
    chunks[0].module.set_rope_theta(10000.0, 10000.0)  # negative control
    if name == "odd":  # (in "even" the global theta is 10k already)
        assert _relative_rms(forward_logits(chunks, [batch])[0], reference) > BF16_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_is_sensitive_to_rope_theta_and_window(imported, single_process, monkeypatch, backend):
    """Negative controls: the comparison above would catch a wrong theta or a wrong window."""
    hf, ckpt_dir, model = imported["odd"]  # global theta 160k, local 10k, window 16
    chunks = _load_tp1(ckpt_dir, model, backend, monkeypatch)
    batch = packed_batch(ROWS["single_long_documents"], model.vocab_size, seed=3)
    reference = hf_reference_logits(hf, batch)
    chunks[0].set_rope_theta(10000.0, 10000.0)
    wrong_theta = forward_logits(chunks, [batch])[0]
    assert (wrong_theta - reference).abs().max().item() > 100 * TOL
    chunks[0].set_rope_theta(model.global_rope_theta, model.local_rope_theta)
    chunks[0].model_config = dataclasses.replace(model, local_attention=64)
    if backend == "flash":  # flash-attn's window comes from the layer's config, as TE's does
        for layer in chunks[0].encoder.layers:
            core = layer.self_attention.core_attention
            core.half_window = 32 if core.is_local else None
    wrong_window = forward_logits(chunks, [batch])[0]
    assert (wrong_window - reference).abs().max().item() > 100 * TOL
    if backend != "sdpa":  # packed kernels: documents run together must show too
        chunks[0].model_config = model
        merged = dict(batch, cu_seqlens=batch["cu_seqlens"][[0, 2]], max_seqlen=128)
        wrong_documents = forward_logits(chunks, [merged])[0]
        assert (wrong_documents - reference).abs().max().item() > 100 * TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, tp, pp, backend", [("even", 2, 2, "sdpa"), ("odd", 2, 1, "sdpa"), ("odd", 2, 1, "flex"), ("even", 2, 2, "flash")]
)
def test_parity_tensor_and_pipeline_parallel(imported, tmp_path, name, tp, pp, backend):
    hf, ckpt_dir, model = imported[name]
    batches = [packed_batch(ROWS[r], model.vocab_size, seed=i) for i, r in enumerate(sorted(ROWS))]
    torch.save(batches, tmp_path / "batches.pt")
    torchrun("parity_worker.py", tp * pp, ckpt_dir, str(tp), str(pp), str(tmp_path / "batches.pt"), str(tmp_path / "out.pt"),
             "0", backend)
    outputs = torch.load(tmp_path / "out.pt")
    assert len(outputs) == len(batches)
    for ours, batch in zip(outputs, batches):
        assert (ours - hf_reference_logits(hf, batch)).abs().max().item() < TOL


def test_sparse_head_never_builds_token_by_vocab_logits(imported, single_process):
    """With 5% of tokens labelled, no tensor of (tokens x vocab) size exists in forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, ckpt_dir, model = imported["odd"]
    chunks = _load_tp1(ckpt_dir, model)
    chunk = chunks[0]
    batch = packed_batch(ROWS["packed"], model.vocab_size, seed=5)
    labels = torch.full_like(batch["tokens"], -100)
    labels.view(-1)[::20] = batch["tokens"].view(-1)[::20]
    n_tokens = batch["tokens"].numel()

    vocab = chunk.padded_vocab_size

    class LargestTensor(TorchDispatchMode):
        """Records the most rows any tensor with a vocabulary-sized dimension had."""

        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and vocab in t.shape:
                    LargestTensor.largest = max(LargestTensor.largest, t.numel() // vocab)
            return out

    chunk.train()
    with LargestTensor():
        loss = chunk(batch["tokens"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"], labels=labels)
        loss.sum().backward()
    n_labelled = int((labels != -100).sum())
    assert loss.numel() == n_labelled
    # Rows of vocab-sized tensors: the labelled tokens (logits) or the hidden size (embedding
    # table and its gradient), never one per token.
    assert LargestTensor.largest <= max(n_labelled, model.hidden_size) < n_tokens

    LargestTensor.largest = 0  # the detector does see a dense head (positive control)
    with LargestTensor(), torch.no_grad():
        chunk(batch["tokens"], batch["positions"], batch["cu_seqlens"], batch["max_seqlen"], return_logits=True)
    assert LargestTensor.largest >= n_tokens


def test_loss_matches_hf_masked_lm_loss(imported, single_process):
    hf, ckpt_dir, model = imported["even"]
    chunks = _load_tp1(ckpt_dir, model)
    batch = packed_batch([[64], [64]], model.vocab_size, seed=9)
    labels = torch.full_like(batch["tokens"], -100)
    labels[:, 5::7] = batch["tokens"][:, 5::7]
    chunks[0].eval()
    on_model = to_device(dict(batch, labels=labels), next(chunks[0].parameters()).device)  # a GPU in gpu_check
    with torch.no_grad():
        ours = chunks[0](on_model["tokens"], on_model["positions"], on_model["cu_seqlens"], on_model["max_seqlen"],
                         labels=on_model["labels"]).mean().cpu()
        theirs = hf(input_ids=batch["tokens"], attention_mask=torch.ones_like(batch["tokens"]), labels=labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


# -- backends ---------------------------------------------------------------------------------------


def _spec_tree(spec, path=""):
    """{attribute path: class name} of a layer spec, TE classes resolved by name, not imported."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_mmbert.model.layers import LazyClass

    out = {}
    module = spec.module if isinstance(spec, ModuleSpec) else spec
    if isinstance(module, tuple):
        out[path] = module[1]
    elif isinstance(module, LazyClass):
        out[path] = module.name
    else:
        out[path] = getattr(module, "__name__", type(module).__name__)
    submodules = getattr(spec, "submodules", None)
    if submodules is not None and dataclasses.is_dataclass(submodules):
        for field in dataclasses.fields(submodules):
            value = getattr(submodules, field.name)
            if value is not None and not isinstance(value, dict):
                out.update(_spec_tree(value, f"{path}.{field.name}".lstrip(".")))
    return out


# What each TE wrapper replaces, and the parameters it owns with bias=False (megatron's TE wrappers
# register `weight` only, plus an `_extra_state` object for FP8 metadata).
TE_TO_LOCAL = {
    "TEColumnParallelLinear": "ColumnParallelLinear",
    "TERowParallelLinear": "RowParallelLinear",
    "TEDotProductAttention": "SDPAAttention",
}


@pytest.mark.parametrize("first_layer", [True, False])
def test_te_spec_has_local_structure_and_keys(first_layer):
    from megatron_mmbert.model.specs import layer_spec

    local = _spec_tree(layer_spec("sdpa", first_layer, 0.0))
    te = _spec_tree(layer_spec("te", first_layer, 0.0))
    assert set(local) == set(te)
    swapped = {path for path in te if te[path] != local[path]}
    assert swapped == {"self_attention.linear_qkv", "self_attention.core_attention",
                       "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"}
    for path in swapped:
        assert TE_TO_LOCAL[te[path]] == local[path]
    # Norms stay our bias-free module in both backends (TE's fused LayerNorm always has a bias).
    assert te["pre_mlp_layernorm"] == local["pre_mlp_layernorm"] == "BiasFreeLayerNorm"
    assert local["input_layernorm"] == ("IdentityOp" if first_layer else "BiasFreeLayerNorm")


def test_te_checkpoint_keys_equal_local_keys(imported, single_process):
    """Parameters of a local model are exactly the weights the TE spec's modules own."""
    from megatron_mmbert.model.specs import layer_spec

    _, ckpt_dir, model = imported["odd"]
    chunk = _load_tp1(ckpt_dir, model)[0]
    local_keys = {k for k, v in chunk.state_dict().items() if torch.is_tensor(v)}
    te_layer_keys = set()
    for i in range(model.num_layers):
        tree = _spec_tree(layer_spec("te", i == 0, 0.0))
        for path, cls in tree.items():
            if cls in ("TEColumnParallelLinear", "TERowParallelLinear", "BiasFreeLayerNorm"):
                te_layer_keys.add(f"encoder.layers.{i}.{path}.weight")
    assert {k for k in local_keys if k.startswith("encoder.layers.")} == te_layer_keys


def test_fp8_without_transformer_engine_stops_at_start(imported):
    _, _, model = imported["odd"]
    with pytest.raises(ConfigError, match="model.fp8 cannot run on this machine: TransformerEngine is not installed"):
        select_backend(dataclasses.replace(model, fp8="hybrid"), "bf16")
    with pytest.raises(ConfigError, match="attention_backend='te' cannot run on this machine: TransformerEngine is not installed"):
        select_backend(dataclasses.replace(model, attention_backend="te"))
    with pytest.raises(ConfigError, match="tensorwise.* needs TransformerEngine >= 2.2.0, found 2.1.0"):
        check_fp8(dataclasses.replace(model, fp8="e4m3", fp8_recipe="tensorwise"), "2.1.0")
    assert select_backend(model).backend == "sdpa"


def test_backend_choice_is_logged_at_start_up(imported, single_process, caplog):
    import logging

    _, ckpt_dir, model = imported["odd"]
    with caplog.at_level(logging.INFO, logger="megatron_mmbert.model.build"):
        _load_tp1(ckpt_dir, model, "flex")
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "flex backend (global layers: FlexAttention eager (CPU, forward only)" in logged
    assert "[s, s] scores" in logged  # the note that CPU FlexAttention computes every score


def _crossing_batch(vocab, lengths=(40, 50, 38), rows=2, seed=3):
    """A micro-batch packed as best_fit's ``data.packed_row: micro_batch`` packs it: documents laid over
    the flattened ``rows x 64`` tokens, the 50 running on from row 0 into row 1 (one segment,
    positions counting on)."""
    g = torch.Generator().manual_seed(seed)
    s = sum(lengths) // rows
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)
    return {"tokens": torch.randint(5, vocab, (rows, s), generator=g),
            "positions": torch.cat([torch.arange(n) for n in lengths]).view(rows, s),
            "cu_seqlens": cu, "max_seqlen": max(lengths)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_when_documents_cross_rows(imported, single_process, monkeypatch, backend):
    """Every backend attends a document that crosses the rows of a micro-batch as one document (the
    packed backends by construction, SDPA by attending over the flattened micro-batch): HF run on
    each document alone agrees."""
    hf, ckpt_dir, model = imported[sorted(HF_CONFIGS)[0]]
    chunks = _load_tp1(ckpt_dir, model, backend, monkeypatch)
    batch = _crossing_batch(model.vocab_size)
    ours = forward_logits(chunks, [batch])[0]
    reference = hf_reference_logits(hf, batch)
    assert (ours - reference).abs().max().item() < TOL
