"""Attention backend selection over the TE / cuDNN / flash-attn version table (no GPU, no TE needed:
the choice is a pure function of the machine's facts)."""

import itertools

import pytest
from packaging.version import Version

from megatron_mmbert.config import ConfigError
from megatron_mmbert.model.backends import (
    LAYER_KINDS,
    TE_KERNELS,
    Machine,
    choose_backend,
    probe,
    te_kernel_verdicts,
)

FA = "2.7.4"


def gpu(te, cudnn="9.8.0", flash=None):
    return Machine(cuda=True, te_version=te, cudnn_version=cudnn, flash_attn_version=flash)


# (machine, precision) -> (backend auto picks, TE's kernel set when TE, {kind: kernel substring}).
# Each row is one fact of the version table, written out by hand.
TABLE = [
    # fp32: TE <= 2.10 has no kernel at all (flash/cuDNN need bf16, unfused has no THD path);
    # TE >= 2.11 only the dense unfused one; flash-attn has no fp32: FlexAttention on CUDA.
    (gpu("2.10.0", flash=FA), "fp32", "flex", None, {"global": "FlexAttention", "local": "FlexAttention"}),
    (gpu("2.11.0", flash=FA), "fp32", "flex", None, {"global": "FlexAttention", "local": "FlexAttention"}),
    # bf16, TE <= 2.11: local (64, 64) windows need flash-attn (cuDNN: only (left, 0) windows).
    (gpu("2.9.0", flash=FA), "bf16", "te", "auto", {"global": "flash-attn/cuDNN", "local": "TE flash-attn"}),
    (gpu("2.9.0"), "bf16", "flex", None, {"local": "FlexAttention"}),
    (gpu("2.10.0"), "bf16", "flex", None, {"local": "FlexAttention"}),
    (gpu("2.11.0"), "bf16", "flex", None, {"local": "FlexAttention"}),  # TE would fall back to a dense mask
    (gpu("2.11.0", flash=FA), "bf16", "te", "auto", {"local": "TE flash-attn"}),
    # TE 2.12: cuDNN runs the window natively from 9.6 ...
    (gpu("2.12.0", cudnn="9.6.0"), "bf16", "te", "auto", {"global": "TE cuDNN", "local": "TE cuDNN"}),
    (gpu("2.12.0", cudnn="9.11.0", flash=FA), "bf16", "te", "auto", {"local": "flash-attn/cuDNN"}),
    (gpu("2.12.0", cudnn="9.5.1"), "bf16", "flex", None, {"local": "FlexAttention"}),
    (gpu("2.12.0", cudnn="9.5.1", flash=FA), "bf16", "te", "auto", {"local": "TE flash-attn"}),
    # ... except 9.10.0/9.10.1 and 9.14.0 (fails beyond 1024 keys): cuDNN must be switched off for
    # the whole process (TE's kernel set is process-wide), so flash-attn for every layer, or nothing.
    (gpu("2.12.0", cudnn="9.10.0", flash=FA), "bf16", "te", "flash", {"global": "TE flash-attn", "local": "TE flash-attn"}),
    (gpu("2.12.0", cudnn="9.10.1", flash=FA), "bf16", "te", "flash", {"local": "TE flash-attn"}),
    (gpu("2.12.0", cudnn="9.14.0", flash=FA), "bf16", "te", "flash", {"local": "TE flash-attn"}),
    (gpu("2.12.0", cudnn="9.14.0"), "bf16", "flex", None, {"local": "FlexAttention"}),
    (gpu("2.12.0", cudnn="9.10.2"), "bf16", "te", "auto", {"local": "TE cuDNN"}),
    # no TE on a GPU: flash-attn 2 varlen in bf16 when installed, else FlexAttention; SDPA only
    # where torch has no FlexAttention. flash-attn 3 alone is not the flash backend's kernel.
    (Machine(cuda=True, cudnn_version="9.8.0", flash_attn_version=FA), "bf16", "flash", None,
     {"global": "flash-attn varlen", "local": "window_size=(W/2, W/2)"}),
    (Machine(cuda=True, cudnn_version="9.8.0", flash_attn_version=FA), "fp32", "flex", None, {"global": "FlexAttention"}),
    (Machine(cuda=True, flash_attn_version="3.0.0b1"), "bf16", "flex", None, {"local": "FlexAttention"}),
    (Machine(cuda=True), "bf16", "flex", None, {"global": "FlexAttention compiled", "local": "FlexAttention compiled"}),
    (Machine(cuda=True, flex_attention=False), "bf16", "sdpa", None, {"global": "SDPA"}),
    # no GPU: SDPA (FlexAttention has no backward on CPU; flash-attn and TE need CUDA)
    (Machine(cuda=False, te_version="2.12.0"), "bf16", "sdpa", None, {"global": "SDPA"}),
    (Machine(cuda=False, flash_attn_version=FA), "bf16", "sdpa", None, {"global": "SDPA"}),
    (Machine(cuda=False), "fp32", "sdpa", None, {"global": "SDPA", "local": "SDPA"}),
]


@pytest.mark.parametrize("machine, precision, backend, te_attention, kernels", TABLE)
def test_auto_follows_the_version_table(machine, precision, backend, te_attention, kernels):
    choice = choose_backend("auto", precision, machine)
    assert choice.backend == backend
    assert choice.te_attention == te_attention
    for kind, kernel in kernels.items():
        assert kernel in choice.kernels[kind]
    if backend != "te" and machine.te_version and machine.cuda:
        # The fallback is logged with the versions that caused it.
        assert any(machine.te_version in note and "not using te" in note for note in choice.notes)


@pytest.mark.parametrize(
    "machine, precision, message",
    [
        (gpu("2.10.0", flash=FA), "fp32", r"TE cannot run global layers in fp32 .*unfused kernel has no THD path.*TransformerEngine 2\.10\.0.*precision: bf16"),
        (gpu("2.10.0"), "bf16", r"TE cannot run local layers in bf16 .*flash-attn is not installed.*\(left, 0\) windows.*install flash-attn"),
        (Machine(cuda=False), "bf16", r"TransformerEngine is not installed"),
        (Machine(cuda=False, te_version="2.12.0"), "bf16", r"TransformerEngine needs a CUDA device"),
    ],
)
def test_te_that_cannot_run_is_a_start_up_error_naming_the_versions(machine, precision, message):
    with pytest.raises(ConfigError, match=r"model.attention_backend='te' cannot run on this machine: " + message):
        choose_backend("te", precision, machine)


def test_te_requested_where_only_dense_kernels_run_is_taken_with_a_warning():
    choice = choose_backend("te", "bf16", gpu("2.11.0"))
    assert choice.backend == "te" and choice.te_attention == "auto"
    assert "cuDNN" in choice.kernels["global"] and "dense" in choice.kernels["local"]
    assert any("local layers run TE unfused" in note and "out of memory" in note for note in choice.notes)


def test_fp8_and_context_parallel_never_fall_back():
    with pytest.raises(ConfigError, match=r"model.fp8 cannot run on this machine: TE cannot run local layers.*2\.10\.0"):
        choose_backend("auto", "bf16", gpu("2.10.0"), fp8=True)
    with pytest.raises(ConfigError, match=r"model.fp8 needs TransformerEngine layers, but model.attention_backend='sdpa'"):
        choose_backend("sdpa", "bf16", gpu("2.12.0"), fp8=True)
    with pytest.raises(ConfigError, match=r"parallel.context_parallel=2 cannot run.*TransformerEngine is not installed"):
        choose_backend("auto", "bf16", Machine(cuda=False), context_parallel=2)
    assert choose_backend("auto", "bf16", gpu("2.12.0"), fp8=True).backend == "te"
    with pytest.raises(ConfigError, match=r"attention_backend='tpu' is unknown"):
        choose_backend("tpu", "bf16", gpu("2.12.0"))


def test_sdpa_when_asked_even_where_te_runs():
    assert choose_backend("sdpa", "bf16", gpu("2.12.0", flash=FA)).backend == "sdpa"


def test_each_backend_when_asked_where_it_runs():
    machine = gpu("2.12.0", cudnn="9.8.0", flash=FA)
    for name in ("te", "flash", "flex", "sdpa"):
        assert choose_backend(name, "bf16", machine).backend == name
    assert choose_backend("flash", "bf16", machine).kernels["global"] == "flash-attn varlen"


@pytest.mark.parametrize(
    "request_, precision, machine, kwargs, message",
    [
        ("flash", "bf16", Machine(cuda=True), {}, r"flash-attn is not installed.*Fix: install flash-attn 2"),
        ("flash", "bf16", Machine(cuda=False, flash_attn_version=FA), {}, r"flash-attn needs a CUDA device"),
        ("flash", "fp32", Machine(cuda=True, flash_attn_version=FA), {}, r"flash-attn runs bf16/fp16 only, not fp32.*Fix: use precision: bf16"),
        ("flex", "fp32", Machine(cuda=False), {}, r"FlexAttention has no backward on CPU.*Fix: train with model.attention_backend: sdpa on CPU"),
        ("flex", "bf16", Machine(cuda=True), {"dropout": 0.1}, r"FlexAttention has no attention dropout \(model.attention_dropout=0.1\)"),
        ("flex", "bf16", Machine(cuda=True, flex_attention=False), {}, r"this torch has no torch.nn.attention.flex_attention.*upgrade torch"),
    ],
)
def test_an_unavailable_backend_is_a_start_up_error_naming_it_and_the_fix(request_, precision, machine, kwargs, message):
    with pytest.raises(ConfigError, match=rf"model.attention_backend='{request_}' cannot run on this machine: {message}"):
        choose_backend(request_, precision, machine, **kwargs)


def test_flex_evaluates_on_cpu_but_auto_keeps_sdpa_there():
    """Evaluation only (training=False, e.g. verify): flex runs eager on CPU when asked, with a note
    that it computes the full score matrix; auto still picks SDPA there."""
    cpu = Machine(cuda=False)
    flex = choose_backend("flex", "fp32", cpu, training=False)
    assert flex.backend == "flex" and "eager" in flex.kernels["local"]
    assert any("[s, s] scores" in note for note in flex.notes)
    assert choose_backend("auto", "fp32", cpu, training=False).backend == "sdpa"
    # auto on a GPU with attention dropout: flex cannot, flash-attn can (bf16), else SDPA
    assert choose_backend("auto", "bf16", Machine(cuda=True, flash_attn_version=FA), dropout=0.1).backend == "flash"
    assert choose_backend("auto", "bf16", Machine(cuda=True), dropout=0.1).backend == "sdpa"


def test_flex_refuses_head_dim_under_16_on_cuda_and_names_the_fallback():
    """Inductor's CUDA FlexAttention template cannot compile head_dim < 16 (it raises at the first
    forward): auto must skip flex with the reason and land on the next backend; asking for flex
    is a start-up error naming the fix."""
    from megatron_mmbert.model.backends import FLEX_MIN_HEAD_DIM, flex_support

    gpu_machine = Machine(cuda=True)
    assert FLEX_MIN_HEAD_DIM == 16
    assert flex_support("bf16", "global", gpu_machine, head_dim=16).kernel
    refused = flex_support("bf16", "local", gpu_machine, head_dim=12)
    assert refused.kernel is None and "head_dim >= 16" in refused.why and "head_dim 12" in refused.why
    choice = choose_backend("auto", "bf16", gpu_machine, head_dim=12)
    assert choice.backend == "sdpa"
    assert any(n.startswith("not using flex:") and "head_dim 12" in n for n in choice.notes), choice.notes
    assert choose_backend("auto", "bf16", Machine(cuda=True, flash_attn_version=FA), head_dim=12).backend == "flash"
    assert choose_backend("auto", "bf16", gpu_machine, head_dim=64).backend == "flex"
    with pytest.raises(ConfigError, match=r"model.attention_backend='flex' cannot run on this machine: "
                                          r"compiled FlexAttention on CUDA needs head_dim >= 16.*Fix: .*wider heads"):
        choose_backend("flex", "bf16", gpu_machine, head_dim=8)
    # on CPU (eager, evaluation only) the limit does not apply
    assert choose_backend("flex", "fp32", Machine(cuda=False), training=False, head_dim=8).backend == "flex"


def test_the_model_build_passes_its_head_dim_to_the_choice():
    from megatron_mmbert.config import model_preset
    from megatron_mmbert.model.build import select_backend

    narrow = model_preset("tiny", hidden_size=48, num_attention_heads=4)  # head_dim 12
    assert select_backend(narrow, "bf16", machine=Machine(cuda=True)).backend == "sdpa"
    assert select_backend(model_preset("tiny"), "bf16", machine=Machine(cuda=True)).backend == "flex"


def test_test_configs_can_run_compiled_flex():
    """Every tiny test model keeps head_dim >= 16, so the device's parity tests run flex compiled."""
    from tests.helpers.model import HF_CONFIGS

    for name, cfg in HF_CONFIGS.items():
        assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 16, name


VERSIONS = list(itertools.product(
    ["2.9.0", "2.10.0", "2.11.0", "2.12.0", "2.13.0.dev0"],
    ["9.1.0", "9.5.1", "9.6.0", "9.10.0", "9.10.1", "9.10.2", "9.14.0", "9.15.0", None],
    [None, FA],
    ["fp32", "bf16"],
))


@pytest.mark.parametrize("request_", ["auto", "te"])
def test_te_is_never_handed_a_kernel_set_it_cannot_run(request_):
    """Over the whole grid: whenever TE is chosen, every layer kind has a kernel in the enabled set
    and no enabled kernel is one that would fail."""
    chosen = 0
    for te, cudnn, flash, precision in VERSIONS:
        machine = gpu(te, cudnn, flash)
        try:
            choice = choose_backend(request_, precision, machine)
        except ConfigError:
            assert request_ == "te"
            continue
        if choice.backend != "te":
            continue
        chosen += 1
        enabled = TE_KERNELS if choice.te_attention == "auto" else (choice.te_attention,)
        for kind in LAYER_KINDS:
            verdicts = te_kernel_verdicts(precision, kind, machine)
            assert any(verdicts[k].usable for k in enabled), (machine, precision, kind)
            assert not any(verdicts[k].status == "fails" for k in enabled), (machine, precision, kind)
        if precision == "fp32":
            assert choice.te_attention in ("auto", "unfused") and Version(te) >= Version("2.11")
    assert chosen > 10


def test_probe_on_this_machine():
    import torch

    machine = probe()
    assert machine.cuda == torch.cuda.is_available()
    assert choose_backend("auto", "fp32", machine).backend in ("te", "flash", "flex", "sdpa")
    if not machine.cuda:
        assert choose_backend("auto", "fp32", machine).backend == "sdpa"
