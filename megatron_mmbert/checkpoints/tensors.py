"""Tensor sources and sinks: one tensor (or a block of its rows) at a time, for the merge tool and
the converter (the project's one reader of Hugging Face safetensors folders).

Two checkpoint formats:

* **hf** -- a Hugging Face ModernBERT directory: ``config.json`` plus ``*.safetensors`` (one file,
  or shards listed in ``model.safetensors.index.json``). Read lazily with ``safetensors.safe_open``,
  opened per read so that no file stays memory-mapped (mapped pages would count against the
  memory bound). Written by :class:`SafetensorsSink`, a streaming writer of the safetensors format
  (header first, then each tensor's bytes in order), so the output never sits in memory whole.
* **megatron** -- a megatron-core ``dist_checkpointing`` directory (docs/interfaces.md
  "Checkpoint"), saved at any TP/PP layout. ``load_tensors_metadata`` lists the *full* tensors
  (their keys and global shapes do not depend on the layout); a block of rows of one full tensor is
  read by loading a single ``ShardedTensor`` that covers just that region -- torch DCP assembles it
  from whatever shards overlap it. Written at the TP1/PP1 layout (whole tensors, loadable at any
  layout); the merge adds the model config (:func:`.dcp_io.write_config`). megatron-core's ``save`` takes the whole
  state dict at once, so the megatron sink holds the output model in memory (1x model size).

One subject, tensor-at-a-time reads and writes of both formats (the merge and the converter share
them), hence the length.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_mmbert.checkpoints import dcp_io
from megatron_mmbert.checkpoints.layout import (
    HF_CONFIG,
    HF_INDEX,
    CheckpointError,
    read_config_if_any,
)

# ModernBertForMaskedLM ties the MLM decoder to the input embedding (``_tied_weights_keys``); a
# file that stores both must still merge the matrix only once.
HF_TIED = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

# Keys of a megatron-core training checkpoint that are not model weights (Megatron-LM's
# ``optimizer.sharded_state_dict`` puts everything under ``optimizer.``).
MEGATRON_NON_MODEL_PREFIXES = ("optimizer.",)

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What the merge needs to know about one full tensor before reading it."""

    name: str
    """Key in the checkpoint (HF state-dict name or megatron ShardedTensor key)."""
    shape: Tuple[int, ...]
    """Full (unsharded) shape."""
    dtype: torch.dtype
    """Stored dtype."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


# --------------------------------------------------------------------------------------------- HF


class HFSource:
    """Lazy reader of a Hugging Face safetensors model directory."""

    format = "hf"

    def __init__(self, path: str):
        self.path = path
        config = os.path.join(path, HF_CONFIG)
        if not os.path.isfile(config):
            raise CheckpointError(f"{path} has no {HF_CONFIG}: not a Hugging Face model directory")
        try:
            with open(config, encoding="utf-8") as f:
                self.config = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config}: unreadable ({exc})") from exc
        files = hf_weight_files(path)
        from safetensors import safe_open

        self._file_of: Dict[str, str] = {}
        infos: Dict[str, TensorInfo] = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            with safe_open(fpath, framework="pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    dtype = _ST_TO_TORCH.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{fpath}: tensor {key} has unsupported dtype {sl.get_dtype()}")
                    infos[key] = TensorInfo(key, tuple(sl.get_shape()), dtype)
                    self._file_of[key] = fpath
        # A stored tied copy is not a tensor of its own: merged once (as its source), not written.
        self.tied_skipped: List[str] = []
        if self.config.get("tie_word_embeddings", True):
            for copy, source in HF_TIED.items():
                if copy in infos and source in infos:
                    del infos[copy]
                    self.tied_skipped.append(copy)
        self.infos = infos

    @property
    def vocab_size(self) -> Optional[int]:
        return self.config.get("vocab_size")

    def read_state_dict(self) -> Dict[str, torch.Tensor]:
        """Every stored tensor, a tied copy included (so the converter can check it is tied)."""
        from safetensors import safe_open

        state: Dict[str, torch.Tensor] = {}
        for fpath in sorted(set(self._file_of.values())):
            with safe_open(fpath, framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        return state

    def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """The full tensor, or rows ``[start, stop)`` of its first dimension."""
        from safetensors import safe_open

        with safe_open(self._file_of[name], framework="pt") as handle:
            if start is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[start:stop]

    def close(self) -> None:
        pass


def hf_weight_files(path: str) -> List[str]:
    """The safetensors files of an HF folder: those its index lists, else every ``*.safetensors``.
    A folder with only PyTorch ``.bin`` weights is refused (unpickling them could run code)."""
    index = os.path.join(path, HF_INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable safetensors index ({exc})") from exc
        for name in files:
            if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: lists {name!r}, not a *.safetensors file beside it")
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{index}: lists {name}, which is missing from {path}")
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        if glob.glob(os.path.join(path, "*.bin")):
            raise CheckpointError(
                f"{path}: only PyTorch .bin weights, which are not read (unpickling could run code); convert "
                "them once with transformers: AutoModelForMaskedLM.from_pretrained(path)"
                ".save_pretrained(new_path, safe_serialization=True)"
            )
        raise CheckpointError(f"{path}: no *.safetensors weights")
    return files


class SafetensorsSink:
    """Streaming writer of an HF model directory: tensors arrive in ``plan`` order, chunk by chunk.

    Each output file's header (names, dtypes, shapes, byte offsets) is known from the plan, so it
    is written first and the data follows as it is produced. Files larger than ``max_shard_bytes``
    are split into ``model-0000i-of-0000n.safetensors`` with an index, like ``save_pretrained``.
    """

    def __init__(self, out_dir: str, plan: Sequence[TensorInfo], max_shard_bytes: int = 5 * 2**30):
        self.out_dir = out_dir
        shards: List[List[TensorInfo]] = [[]]
        size = 0
        for info in plan:
            nbytes = info.numel * info.dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += nbytes
        n = len(shards)
        self._files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self._shards = shards
        self._order = [(i, info) for i, shard in enumerate(shards) for info in shard]
        self._pos = -1
        self._handle = None
        self._shard_open = -1
        self._remaining = 0
        self.total_bytes = sum(info.numel * info.dtype.itemsize for info in plan)

    def _open_shard(self, i: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for info in self._shards[i]:
            nbytes = info.numel * info.dtype.itemsize
            header[info.name] = {
                "dtype": _TORCH_TO_ST[info.dtype], "shape": list(info.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._handle = open(os.path.join(self.out_dir, self._files[i]), "wb")
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._shard_open = i

    def begin(self, info: TensorInfo) -> None:
        if self._remaining:
            raise RuntimeError(f"{self._order[self._pos][1].name}: {self._remaining} bytes unwritten")
        self._pos += 1
        shard, expected = self._order[self._pos]
        if expected.name != info.name:
            raise RuntimeError(f"tensor {info.name} written out of order (expected {expected.name})")
        if shard != self._shard_open:
            self._open_shard(shard)
        self._remaining = info.numel * info.dtype.itemsize
        self._dtype = info.dtype

    def write(self, chunk: torch.Tensor) -> None:
        if chunk.dtype != self._dtype:
            raise RuntimeError(f"chunk dtype {chunk.dtype} != {self._dtype}")
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._remaining -= data.nbytes
        if self._remaining < 0:
            raise RuntimeError(f"{self._order[self._pos][1].name}: more bytes than its shape holds")
        self._handle.write(memoryview(data))

    def finish(self) -> None:
        if self._remaining or self._pos != len(self._order) - 1:
            raise RuntimeError("output incomplete: not every planned tensor was written")
        if self._handle is not None:
            self._handle.close()
        if len(self._files) > 1:
            weight_map = {info.name: self._files[i] for i, info in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            with open(os.path.join(self.out_dir, HF_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)


def copy_hf_side_files(src_dir: str, out_dir: str) -> None:
    """config.json, tokenizer and generation files of an HF directory (never its weights)."""
    os.makedirs(out_dir, exist_ok=True)
    for entry in os.listdir(src_dir):
        src = os.path.join(src_dir, entry)
        if (os.path.isfile(src) and not entry.endswith((".safetensors", ".bin", ".pt", ".pth"))
                and entry != HF_INDEX):
            shutil.copy2(src, os.path.join(out_dir, entry))


# --------------------------------------------------------------------------------------- megatron


class DistSession:
    """The process group and CPU adapter megatron-core's dist_checkpointing needs, set up once.

    A world of one gloo process over a FileStore (no port to collide with); torn down by
    :meth:`close` only if this object created it.
    """

    def __init__(self):
        import torch.distributed as dist

        if not torch.cuda.is_available():
            # megatron-core's save/load hard-code CUDA calls; the project's adapter redirects them.
            from megatron_mmbert import cpu_adapter

            cpu_adapter.install()
        self._owned = False
        self._store_dir = None
        if not dist.is_initialized():
            self._store_dir = tempfile.mkdtemp(prefix="mmbert-merge-pg-")
            dist.init_process_group(
                "gloo", rank=0, world_size=1,
                init_method="file://" + os.path.join(self._store_dir, "store"),
            )
            self._owned = True

    def close(self) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()
            self._owned = False
        if self._store_dir:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None


class MegatronSource:
    """Reader of a megatron-core dist checkpoint, saved at any TP/PP layout."""

    format = "megatron"

    def __init__(self, path: str, session: Optional[DistSession] = None, verify: bool = True):
        from megatron.core import dist_checkpointing

        self.path = path
        self._session = session or DistSession()
        self._own_session = session is None
        self.config: Optional[dict] = read_config_if_any(path)
        if verify and isinstance(self.config, dict) and "files" in self.config:
            dcp_io.verify_digests(path, self.config["files"])
        dcp_io.install()
        metadata = dist_checkpointing.load_tensors_metadata(path)
        self.infos = {
            key: TensorInfo(key, tuple(st.global_shape), st.dtype)
            for key, st in sorted(metadata.items())
            if not key.startswith(MEGATRON_NON_MODEL_PREFIXES)
        }
        self.tied_skipped: List[str] = []  # megatron stores a tied weight under one key already

    @property
    def vocab_size(self) -> Optional[int]:
        if not self.config:
            return None
        model = self.config.get("model", self.config)
        return model.get("vocab_size") if isinstance(model, dict) else None

    def read(self, name: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """The full tensor, or rows ``[start, stop)`` of its first dimension, at any saved layout."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        info = self.infos[name]
        shape = info.shape
        if start is None or not shape:
            start, stop = 0, (shape[0] if shape else None)
        local = (stop - start,) + shape[1:] if shape else ()
        offset = (start,) + (0,) * (len(shape) - 1) if shape else ()
        # axis_fragmentations=None: an irregular region, so any row block can be requested.
        request = ShardedTensor(
            key=name, data=torch.empty(local, dtype=info.dtype), dtype=info.dtype,
            local_shape=local, global_shape=shape, global_offset=offset,
            axis_fragmentations=None, replica_id=0, prepend_axis_num=0,
        )
        try:
            return dist_checkpointing.load({"t": request}, self.path)["t"]
        except BaseException as exc:  # torch DCP's CheckpointException is a BaseException
            translated = dcp_io.translate_load_error(exc, self.path)
            if translated is None:
                raise
            raise translated from exc

    def close(self) -> None:
        if self._own_session:
            self._session.close()


class MegatronSink:
    """Writes a dist checkpoint at the TP1/PP1 layout (whole tensors); the config is written by the
    caller (:func:`.dcp_io.write_config`).

    ``convert(name, tensor) -> (key, tensor)`` maps each finished tensor to the checkpoint's naming
    and layout (the merge runs in HF naming when inputs are ModernBERT models); ``None`` keeps it.
    """

    def __init__(self, out_dir: str, convert: Optional[Callable[[str, torch.Tensor], Tuple[str, torch.Tensor]]] = None):
        self.out_dir = out_dir
        self.convert = convert
        self._tensors: Dict[str, torch.Tensor] = {}

    def begin(self, info: TensorInfo) -> None:
        self._current = torch.empty(info.shape, dtype=info.dtype)
        self._tensors[info.name] = self._current
        self._row = 0

    def write(self, chunk: torch.Tensor) -> None:
        if self._current.dim() == 0:
            self._current.copy_(chunk)
            return
        rows = chunk.shape[0]
        self._current[self._row:self._row + rows].copy_(chunk)
        self._row += rows

    def finish(self) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        sharded = {}
        for name in list(self._tensors):
            tensor = self._tensors.pop(name)  # one tensor in two layouts at a time, not the model
            key, tensor = self.convert(name, tensor) if self.convert else (name, tensor)
            sharded[key] = ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
        dcp_io.install()
        dist_checkpointing.save(sharded, self.out_dir)
