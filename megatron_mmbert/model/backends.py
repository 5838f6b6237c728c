"""Which attention kernel runs which layers: a pure function of the machine, tested over a version table.

The encoder has two kinds of attention layer (global, and local = sliding window of +-W/2 keys), both
bidirectional over packed documents. Whether TransformerEngine (TE) can run a kind depends on the
precision and on the TE, cuDNN and flash-attn versions present; TE finds out only at the first
forward ("No dot product attention backend is available") or, worse, picks a kernel that fails or
falls back to a dense ``[s, s]`` mask. So the choice is made here, at start-up, from facts read once
(:func:`probe`), by :func:`choose_backend` -- a pure function the tests run over the version table.

Facts about TE's THD (``cu_seqlens``) path with a padding (non-causal) mask, from TE 2.9-2.12's
``get_attention_backend`` (``transformer_engine/pytorch/attention/dot_product_attention/utils.py``)
and the cuDNN frontend's sliding-window support:

* fp32: TE's flash-attn and cuDNN ("fused") kernels need fp16/bf16; only its unfused kernel runs
  fp32, and the unfused kernel has a THD path only from TE 2.11 (TE <= 2.10: no backend at all).
* Sliding window ``(64, 64)``: flash-attn runs it; cuDNN in TE <= 2.11 supports only ``(left, 0)``
  windows, so without flash-attn TE 2.9/2.10 find no backend and 2.11 falls back to the unfused
  kernel with a dense mask (out of memory at 8192 tokens). cuDNN runs it natively from TE 2.12 with
  cuDNN >= 9.6, except 9.10.0/9.10.1, and 9.14.0 fails when keys exceed 1024 (mmBERT trains at 8192).
* A pip-installed TE never brings flash-attn (NGC PyTorch containers ship both).

TE's kernel set is process-wide (megatron-core sets ``NVTE_FLASH_ATTN`` / ``NVTE_FUSED_ATTN`` /
``NVTE_UNFUSED_ATTN`` from ``TransformerConfig.attention_backend``: all three, or exactly one), so a
kernel that TE would pick for a layer and that then fails must be switched off for every layer.

Outside TE, two kernels run the same packed (THD) layout natively: flash-attn 2's
``flash_attn_varlen_func`` (``cu_seqlens``, ``window_size=(W/2, W/2)``; CUDA, fp16/bf16 only, what
mmBERT itself trained with) and PyTorch's FlexAttention (a ``BlockMask`` from ``cu_seqlens``, compiled
on CUDA; on CPU torch 2.13 has no FlexAttention backward, so there it serves evaluation only).

Adding a backend: write its ``support(precision, kind, machine, training, dropout)``, add it to
:data:`BACKENDS` and to :data:`AUTO_ORDER`; :func:`choose_backend` needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Literal, Optional, Tuple

LayerKind = Literal["global", "local"]
LAYER_KINDS: Tuple[LayerKind, ...] = ("global", "local")
TEKernel = Literal["flash", "fused", "unfused"]
TE_KERNELS: Tuple[TEKernel, ...] = ("flash", "fused", "unfused")  # TE's own order of preference


@dataclass(frozen=True)
class Machine:
    """What the kernel choice depends on (versions as strings, None = absent)."""

    cuda: bool
    """A CUDA device is available."""
    te_version: Optional[str] = None
    """The ``transformer-engine`` package version."""
    cudnn_version: Optional[str] = None
    """cuDNN as TE loads it, ``major.minor.patch``."""
    flash_attn_version: Optional[str] = None
    """flash-attn (2 or 3) importable by TE."""
    flex_attention: bool = True
    """``torch.nn.attention.flex_attention`` exists (torch >= 2.5)."""

    def describe(self) -> str:
        return (
            f"TransformerEngine {self.te_version or 'not installed'}, cuDNN {self.cudnn_version or 'none'}, "
            f"flash-attn {self.flash_attn_version or 'not installed'}, "
            f"{'FlexAttention' if self.flex_attention else 'no FlexAttention'}, "
            f"{'CUDA' if self.cuda else 'no CUDA device'}"
        )


@dataclass(frozen=True)
class Verdict:
    """Whether a kernel runs a layer kind: ``runs``, ``dense`` (runs, materialising ``[s, s]``
    scores: out of memory at long rows), ``refused`` (declined by TE itself, harmless) or ``fails``
    (TE would pick it and then crash: it must be switched off)."""

    status: Literal["runs", "dense", "refused", "fails"]
    why: str = ""

    @property
    def usable(self) -> bool:
        return self.status in ("runs", "dense")


@dataclass(frozen=True)
class Support:
    """How a backend runs one layer kind: ``kernel`` (None = it cannot; then ``why``); ``dense``:
    the kernel materialises ``[s, s]`` attention scores (out of memory at 8192-token rows)."""

    kernel: Optional[str]
    dense: bool = False
    why: str = ""


@dataclass(frozen=True)
class BackendChoice:
    """The outcome: the layer backend, TE's kernel set (megatron ``AttnBackend`` name) when TE, the
    kernel of each layer kind, and the notes to log (fallbacks and warnings, naming versions)."""

    backend: str
    kernels: Dict[str, str]
    te_attention: Optional[str] = None
    notes: Tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        te = f", TE attention_backend={self.te_attention}" if self.te_attention else ""
        layers = "; ".join(f"{kind} layers: {k}" for kind, k in self.kernels.items())
        return f"{self.backend} backend ({layers}{te})"


def _minor(version: str) -> Tuple[int, int]:
    from packaging.version import Version

    release = Version(version).release + (0, 0)
    return release[0], release[1]


def _release(version: str) -> Tuple[int, ...]:
    from packaging.version import Version

    return (Version(version).release + (0, 0, 0))[:3]


def te_kernel_verdicts(precision: str, kind: LayerKind, machine: Machine) -> Dict[TEKernel, Verdict]:
    """What each of TE's three kernels does with a ``kind`` layer on the THD path at ``precision``."""
    te = _minor(machine.te_version)
    half = precision in ("bf16", "fp16")
    verdicts: Dict[TEKernel, Verdict] = {}

    if not half:
        verdicts["flash"] = Verdict("refused", f"flash-attn needs bf16/fp16, not {precision}")
    elif not machine.flash_attn_version:
        verdicts["flash"] = Verdict("refused", "flash-attn is not installed (a pip-installed TE never brings it)")
    else:
        verdicts["flash"] = Verdict("runs")

    if not half:
        verdicts["fused"] = Verdict("refused", f"cuDNN attention needs bf16/fp16, not {precision}")
    elif not machine.cudnn_version:
        verdicts["fused"] = Verdict("refused", "no cuDNN found")
    elif kind == "global":
        verdicts["fused"] = Verdict("runs")
    else:
        cudnn = _release(machine.cudnn_version)
        if te < (2, 12):
            verdicts["fused"] = Verdict("refused", f"cuDNN attention in TE {machine.te_version} supports only (left, 0) windows (needs TE >= 2.12)")
        elif cudnn < (9, 6, 0):
            verdicts["fused"] = Verdict("refused", f"cuDNN {machine.cudnn_version} has no bidirectional sliding window (needs >= 9.6)")
        elif cudnn[:2] == (9, 10) and cudnn[2] <= 1:
            verdicts["fused"] = Verdict("fails", f"cuDNN {machine.cudnn_version} does not run bidirectional sliding windows (9.10.0/9.10.1)")
        elif cudnn == (9, 14, 0):
            verdicts["fused"] = Verdict("fails", "cuDNN 9.14.0 fails on sliding windows when keys exceed 1024")
        else:
            verdicts["fused"] = Verdict("runs")

    if te < (2, 11):
        verdicts["unfused"] = Verdict("refused", f"TE {machine.te_version}'s unfused kernel has no THD path (needs TE >= 2.11)")
    else:
        verdicts["unfused"] = Verdict("dense", "TE's unfused kernel builds a dense [s, s] mask")
    return verdicts


def te_attention_setting(precision: str, machine: Machine) -> Tuple[Optional[str], str]:
    """megatron-core's ``AttnBackend`` name for a process running TE on every layer kind, or
    ``(None, why not)``. ``auto`` (TE chooses per layer) unless a kernel TE would pick fails; then
    the first single kernel every kind can run."""
    verdicts = {kind: te_kernel_verdicts(precision, kind, machine) for kind in LAYER_KINDS}
    for kind, table in verdicts.items():
        if not any(v.usable for v in table.values()):
            reasons = "; ".join(f"{k}: {v.why}" for k, v in table.items())
            return None, f"TE cannot run {kind} layers in {precision} ({reasons})"
    if not any(v.status == "fails" for table in verdicts.values() for v in table.values()):
        return "auto", ""
    for kernel in TE_KERNELS:
        if all(table[kernel].usable for table in verdicts.values()):
            return kernel, ""
    failing = "; ".join(
        f"{kind} {k}: {v.why}" for kind, table in verdicts.items() for k, v in table.items() if not v.usable
    )
    return None, f"no single TE kernel runs both layer kinds in {precision} ({failing})"


def te_support(precision: str, kind: LayerKind, machine: Machine, training: bool = True, dropout: float = 0.0, head_dim: Optional[int] = None) -> Support:
    """TE on the THD path: usable only on CUDA with TE installed, and only where
    :func:`te_attention_setting` finds a kernel set that runs every layer kind."""
    if not machine.te_version:
        return Support(None, why="TransformerEngine is not installed")
    if not machine.cuda:
        return Support(None, why="TransformerEngine needs a CUDA device")
    setting, why = te_attention_setting(precision, machine)
    if setting is None:
        return Support(None, why=why)
    table = te_kernel_verdicts(precision, kind, machine)
    allowed = [k for k in TE_KERNELS if (setting == "auto" or k == setting) and table[k].usable]
    runs = [k for k in allowed if table[k].status == "runs"]
    names = {"flash": "flash-attn", "fused": "cuDNN", "unfused": "unfused"}
    if runs:
        return Support("TE " + "/".join(names[k] for k in runs))
    return Support("TE unfused (dense [s, s] mask)", dense=True, why=table["unfused"].why)


def sdpa_support(precision: str, kind: LayerKind, machine: Machine, training: bool = True, dropout: float = 0.0, head_dim: Optional[int] = None) -> Support:
    """PyTorch SDPA with boolean segment/window masks: runs anywhere. On CUDA a boolean mask goes to
    the memory-efficient kernel (the ``[b, 1, s, s]`` mask is materialised, the scores are not); it
    still computes every score the mask discards."""
    return Support("SDPA with [b, 1, s, s] boolean masks")


def flash_support(precision: str, kind: LayerKind, machine: Machine, training: bool = True, dropout: float = 0.0, head_dim: Optional[int] = None) -> Support:
    """flash-attn 2's ``flash_attn_varlen_func`` on the packed layout: CUDA, fp16/bf16 only
    (flash-attn's own requirement), ``window_size=(W/2, W/2)`` on local layers."""
    if not machine.flash_attn_version:
        return Support(None, why="flash-attn is not installed")
    if _minor(machine.flash_attn_version)[0] != 2 and machine.flash_attn_version != "unknown version":
        return Support(None, why=f"the flash backend calls flash-attn 2's flash_attn_varlen_func; found flash-attn {machine.flash_attn_version}")
    if not machine.cuda:
        return Support(None, why="flash-attn needs a CUDA device")
    if precision not in ("bf16", "fp16"):
        return Support(None, why=f"flash-attn runs bf16/fp16 only, not {precision}")
    return Support("flash-attn varlen" + (" window_size=(W/2, W/2)" if kind == "local" else ""))


FLEX_MIN_HEAD_DIM = 16
"""The smallest head dimension torch's compiled FlexAttention runs on CUDA (torch 2.5-2.13: the
Inductor template refuses less, ``torch/_inductor/kernel/flex/flex_attention.py``)."""


def flex_support(precision: str, kind: LayerKind, machine: Machine, training: bool = True, dropout: float = 0.0, head_dim: Optional[int] = None) -> Support:
    """PyTorch FlexAttention on the packed layout with a block-sparse ``BlockMask`` (same document;
    local layers ``|q - k| <= W/2``). Compiled on CUDA. On CPU torch has no FlexAttention backward
    (``NotImplementedError``), so there it runs eager, for evaluation only, computing the full
    ``[t, t]`` score matrix of the packed micro-batch (its unfused reference path). On CUDA a
    ``head_dim`` under :data:`FLEX_MIN_HEAD_DIM` cannot compile."""
    if not machine.flex_attention:
        return Support(None, why="this torch has no torch.nn.attention.flex_attention (needs torch >= 2.5)")
    if dropout > 0.0:
        return Support(None, why=f"FlexAttention has no attention dropout (model.attention_dropout={dropout})")
    if not machine.cuda:
        if training:
            return Support(None, why="FlexAttention has no backward on CPU (torch raises NotImplementedError); on CPU it serves evaluation only")
        return Support("FlexAttention eager (CPU, forward only)", dense=True)
    if head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM:
        # Inductor's CUDA flex template: "NYI: embedding dimension of the query, key, and value must
        # be at least 16" (tl.dot's smallest tile), raised at the first compiled forward.
        return Support(None, why=f"compiled FlexAttention on CUDA needs head_dim >= {FLEX_MIN_HEAD_DIM} "
                                 f"(Triton's tl.dot tiles), this model has head_dim {head_dim}")
    return Support("FlexAttention compiled, block-sparse BlockMask")


SupportFn = Callable[..., Support]
BACKENDS: Dict[str, SupportFn] = {"te": te_support, "flash": flash_support, "flex": flex_support, "sdpa": sdpa_support}
"""Every layer backend, by its ``model.attention_backend`` name: ``fn(precision, kind, machine,
training, dropout, head_dim)``."""
AUTO_ORDER: Tuple[str, ...] = ("te", "flash", "flex", "sdpa")
"""``auto`` takes the first backend here that runs every layer kind without a dense mask, else the
first that runs every kind at all."""


def choose_backend(
    requested: str,
    precision: str,
    machine: Machine,
    fp8: bool = False,
    context_parallel: int = 1,
    training: bool = True,
    dropout: float = 0.0,
    head_dim: Optional[int] = None,
) -> BackendChoice:
    """The layer backend for ``requested`` (``auto`` or a name in :data:`BACKENDS`) at
    ``precision`` on ``machine``; raises ``ConfigError`` naming the versions and the fix when the
    request cannot run. ``fp8`` and ``context_parallel > 1`` need TE (nothing else does either).
    ``training``: the model will be trained (False: evaluation only, e.g. ``verify``);
    ``dropout``: ``model.attention_dropout``; ``head_dim``: the model's (None: not checked)."""
    from megatron_mmbert.config_base import ConfigError

    if requested != "auto" and requested not in BACKENDS:
        raise ConfigError(f"model.attention_backend={requested!r} is unknown; use auto or one of {sorted(BACKENDS)}")
    needs_te = [what for what, on in (("model.fp8", fp8), (f"parallel.context_parallel={context_parallel}", context_parallel > 1)) if on]
    if needs_te and requested not in ("auto", "te"):
        raise ConfigError(
            f"{' and '.join(needs_te)} needs TransformerEngine layers, but "
            f"model.attention_backend={requested!r}; use auto or te"
        )
    candidates = ("te",) if needs_te else (AUTO_ORDER if requested == "auto" else (requested,))

    supports = {
        name: {kind: BACKENDS[name](precision, kind, machine, training, dropout, head_dim) for kind in LAYER_KINDS}
        for name in candidates
    }
    runnable = [name for name in candidates if all(s.kernel for s in supports[name].values())]
    sparse = [name for name in runnable if not any(s.dense for s in supports[name].values())]
    if not runnable:
        name = candidates[0]
        why = "; ".join(sorted({s.why for s in supports[name].values() if not s.kernel}))
        asked = " and ".join(needs_te) if needs_te else f"model.attention_backend={requested!r}"
        fix = _fix(name, precision, machine, head_dim)
        raise ConfigError(
            f"{asked} cannot run on this machine: {why} ({machine.describe()}). Fix: {fix}"
            + ("" if needs_te else "; or set model.attention_backend: sdpa")
        )
    chosen = (sparse or runnable)[0]
    notes = []
    for name in candidates[: candidates.index(chosen)]:
        whys = [
            s.why if s.kernel is None else f"{kind} layers would run {s.kernel}"
            for kind, s in supports[name].items()
            if s.kernel is None or s.dense
        ]
        notes.append(f"not using {name}: {'; '.join(dict.fromkeys(whys))} ({machine.describe()})")
    for kind, s in supports[chosen].items():
        if s.dense:
            notes.append(f"{kind} layers run {s.kernel}: [s, s] scores, out of memory at long rows")
    te_attention = te_attention_setting(precision, machine)[0] if chosen == "te" else None
    return BackendChoice(chosen, {k: s.kernel for k, s in supports[chosen].items()}, te_attention, tuple(notes))


def _fix(name: str, precision: str, machine: Machine, head_dim: Optional[int] = None) -> str:
    """What makes backend ``name`` runnable (for the start-up error)."""
    if name == "flash":
        if not machine.flash_attn_version or not machine.cuda:
            return "install flash-attn 2 (pip install flash-attn) on a CUDA machine, or use model.attention_backend: auto"
        return "use precision: bf16 (flash-attn has no fp32 kernels), or model.attention_backend: flex"
    if name == "flex":
        if not machine.flex_attention:
            return "upgrade torch to >= 2.5"
        if not machine.cuda:
            return "train with model.attention_backend: sdpa on CPU (flex evaluates there: verify --attention_backend flex)"
        if head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM:
            return (f"use model.attention_backend: sdpa (or flash), or fewer, wider heads "
                    f"(hidden_size / num_attention_heads >= {FLEX_MIN_HEAD_DIM})")
        return "set model.attention_dropout: 0 or use model.attention_backend: sdpa"
    if not machine.te_version or not machine.cuda:
        return "run where TransformerEngine and a GPU are present"
    if precision == "fp32":
        return "TE runs fp32 attention only through its unfused kernel (TE >= 2.11); use precision: bf16 or TE >= 2.11"
    return (
        "run in an NGC PyTorch container (TE with flash-attn), install flash-attn, or use TE >= 2.12 "
        "with cuDNN >= 9.6 (not 9.10.0/9.10.1/9.14.0)"
    )


_TE_ENV = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")


def te_environment(te_attention: str) -> Dict[str, str]:
    """The ``NVTE_*`` switches of TE's kernel set (what megatron-core's ``_set_attention_backend``
    writes for ``AttnBackend[te_attention]``)."""
    if te_attention == "auto":
        return dict.fromkeys(_TE_ENV, "1")
    if te_attention not in TE_KERNELS:
        raise ValueError(f"unknown TE kernel set {te_attention!r}; expected auto or one of {TE_KERNELS}")
    return {name: str(int(kernel == te_attention)) for name, kernel in zip(_TE_ENV, TE_KERNELS)}


def set_te_environment(te_attention: str, environ=None) -> None:
    """Switch TE's kernels for this process; a different value already set (by the user, or by a TE
    model built earlier at another precision) is a ``ConfigError``: TE reads these process-wide."""
    import os

    from megatron_mmbert.config_base import ConfigError

    environ = os.environ if environ is None else environ
    wanted = te_environment(te_attention)
    clashes = {k: environ[k] for k, v in wanted.items() if environ.get(k, v) != v}
    if clashes:
        raise ConfigError(
            f"TE attention needs {wanted} (kernel set {te_attention!r}, chosen from the TE / cuDNN / "
            f"flash-attn versions), but the process has {clashes}; unset them "
            "(model.attention_backend chooses TE's kernels, docs/training.md)"
        )
    environ.update(wanted)


def probe() -> Machine:
    """Read the machine's facts once (imports guarded: TE and flash-attn are optional)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def package(*names: str) -> Optional[str]:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return None

    te = None
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            import transformer_engine  # a broken TE build fails here: treat it as absent

            te = getattr(transformer_engine, "__version__", None) or package("transformer-engine", "transformer_engine")
        except Exception:
            te = None
    cudnn = None
    if torch.cuda.is_available():
        try:
            from transformer_engine.pytorch.utils import get_cudnn_version  # the cuDNN TE loads

            cudnn = ".".join(str(x) for x in get_cudnn_version())
        except Exception:
            raw = torch.backends.cudnn.version() or 0  # 90800 for 9.8.0 (cuDNN 8: 8902 for 8.9.2)
            major, rest = (raw // 10000, raw % 10000) if raw >= 90000 else (raw // 1000, raw % 1000)
            cudnn = f"{major}.{rest // 100}.{rest % 100}" if raw else None
    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    flash = None
    for module, names in (("flash_attn", ("flash-attn", "flash_attn")), ("flash_attn_interface", ("flash-attn-3", "flashattn-hopper"))):
        if importlib.util.find_spec(module) is not None:
            flash = package(*names) or "unknown version"
            break
    return Machine(cuda=torch.cuda.is_available(), te_version=te, cudnn_version=cudnn, flash_attn_version=flash, flex_attention=flex)
