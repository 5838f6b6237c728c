"""Checkpoint files load whichever CPython wrote them (issue: Debian 12's own checkpoints refused).

An ``Enum`` member pickles as ``getattr(EnumClass, 'NAME')`` under CPython <= 3.11.2 (Debian 12's
system Python) and as ``EnumClass(value)`` under 3.11.3+ / 3.12+. Torch DCP's ``.metadata`` holds
enums, so the allow-listed unpickler must take both forms -- and still nothing else. These tests
write both forms by hand (a pickler with a fixed reducer, at protocol 2 and at the default protocol),
so they do not depend on the interpreter running them, and load them through the same reader that
megatron-core's ``load`` uses.
"""

import enum
import io
import os
import pickle
import pickletools
import zipfile

import pytest
import torch

from megatron_mmbert import runtime
from megatron_mmbert.checkpoints import dcp_io
from megatron_mmbert.checkpoints.dcp_io import UntrustedCheckpointError, load_metadata
from tests.helpers.model import hf_model_and_checkpoint

PROTOCOLS = (2, pickle.DEFAULT_PROTOCOL)


def _getattr_form(obj):
    """What ``Enum.__reduce_ex__`` returns on CPython <= 3.11.2."""
    return (getattr, (type(obj), obj.name))


def _call_form(obj):
    """What it returns on CPython >= 3.11.3."""
    return (type(obj), (obj.value,))


FORMS = {"getattr (CPython <= 3.11.2)": _getattr_form, "EnumClass(value) (CPython >= 3.11.3)": _call_form}


def dumps(obj, protocol: int, enum_form) -> bytes:
    """Pickle ``obj`` writing every Enum member in ``enum_form``, whatever this interpreter does."""

    class Pickler(pickle.Pickler):
        def reducer_override(self, value):
            if isinstance(value, enum.Enum):
                return enum_form(value)
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def _globals(data: bytes):
    """The ``module.name`` pairs a pickle references (GLOBAL / STACK_GLOBAL)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        if isinstance(arg, str):
            strings.append(arg)
    return found


def allow_listed_enums():
    dcp_io.MetadataUnpickler(io.BytesIO(b""), "x").find_class("torch", "Size")  # fills the allow-list
    return sorted((v for v in dcp_io._ALLOWED.values() if isinstance(v, type) and issubclass(v, enum.Enum)),
                  key=lambda c: c.__qualname__)


def test_allow_list_has_the_dcp_enums():
    names = {c.__qualname__ for c in allow_listed_enums()}
    assert {"WriteItemType", "_MEM_FORMAT_ENCODING"} <= names


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_allow_listed_enum_member_loads_in_both_forms(form, protocol):
    for cls in allow_listed_enums():
        for member in cls:
            data = dumps({"m": member}, protocol, FORMS[form])
            if form.startswith("getattr"):  # the form really is the one Debian 12 writes
                assert ("builtins", "getattr") in _globals(data) or ("__builtin__", "getattr") in _globals(data)
            assert load_metadata(io.BytesIO(data), "x/.metadata") == {"m": member}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("form", sorted(FORMS))
def test_dcp_metadata_with_enums_round_trips(form, protocol):
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                        TensorStorageMetadata)
    from torch.distributed.checkpoint.planner import WriteItemType

    props = TensorProperties(dtype=torch.bfloat16, memory_format=torch.channels_last)
    meta = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        properties=props, size=torch.Size([4, 2]),
        chunks=[ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([4, 2]))])},
        planner_data={"kind": WriteItemType.SHARD})
    back = load_metadata(io.BytesIO(dumps(meta, protocol, FORMS[form])), "x/.metadata")
    assert back.state_dict_metadata["w"].properties.memory_format == torch.channels_last
    assert back.state_dict_metadata["w"].properties.dtype == torch.bfloat16
    assert back.planner_data == {"kind": WriteItemType.SHARD}


def _getattr_pickle(protocol: int, target, name: str) -> bytes:
    """``getattr(target, name)`` pickled at ``protocol``, as a crafted file would hold it."""

    class Call:
        def __reduce__(self):
            return (getattr, (target, name))

    return pickle.dumps({"x": Call()}, protocol=protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_getattr_on_anything_but_an_allow_listed_enum_is_refused(protocol, tmp_path):
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import WriteItemType

    # getattr(os.system, 'system')('touch marker'), hand-written at protocol 2: os.system never resolves.
    marker = tmp_path / "ran"

    crafted = (b"\x80\x02c__builtin__\ngetattr\ncos\nsystem\nX\x06\x00\x00\x00system\x86R"
               b"X" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode() + b"\x85R.")
    with pytest.raises(UntrustedCheckpointError, match="os.system"):
        load_metadata(io.BytesIO(crafted), "x/.metadata")
    assert not marker.exists()
    # An allow-listed, non-enum class: getattr(Metadata, '__init__') is no member lookup.
    with pytest.raises(UntrustedCheckpointError, match="not an enum"):
        load_metadata(io.BytesIO(_getattr_pickle(protocol, Metadata, "__init__")), "x/.metadata")
    # An allow-listed enum, but an attribute that is not one of its members.
    for name in ("__class__", "mro", "_generate_next_value_", "name"):
        with pytest.raises(UntrustedCheckpointError, match="not a member"):
            load_metadata(io.BytesIO(_getattr_pickle(protocol, WriteItemType, name)), "x/.metadata")
    # A name that is not a string.
    with pytest.raises(UntrustedCheckpointError):
        load_metadata(io.BytesIO(_getattr_pickle(protocol, WriteItemType, 3)), "x/.metadata")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real dist checkpoint written by this interpreter (HF model imported at TP1)."""
    root = tmp_path_factory.mktemp("pickle_forms")
    hf_model_and_checkpoint(root)
    return root / "ckpt"


@pytest.mark.parametrize("form", sorted(FORMS))
def test_checkpoint_written_by_either_interpreter_loads(checkpoint, tmp_path, form):
    """The checkpoint's ``.metadata`` rewritten as the other CPython would have written it loads through
    megatron-core (metadata and every tensor), equal to the original."""
    import shutil

    from megatron_mmbert.checkpoints.tensors import MegatronSource

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    with open(copy / ".metadata", "rb") as f:
        meta = load_metadata(f, str(copy / ".metadata"))
    with open(copy / ".metadata", "wb") as f:
        f.write(dumps(meta, pickle.DEFAULT_PROTOCOL, FORMS[form]))
    original, rewritten = MegatronSource(str(checkpoint), verify=False), MegatronSource(str(copy), verify=False)
    try:
        assert rewritten.infos == original.infos
        for name in original.infos:
            assert torch.equal(rewritten.read(name), original.read(name)), name
    finally:
        rewritten.close()
        original.close()
        runtime.shutdown()


def test_checkpoint_pt_files_hold_no_enum_and_load_weights_only(checkpoint):
    """``common.pt`` and the other ``*.pt`` files go through torch's weights-only unpickler, which takes
    no ``getattr`` at all: they must hold nothing whose pickle depends on the interpreter (no enum)."""
    pt_files = [n for n in os.listdir(checkpoint) if n.endswith(".pt")]
    assert "common.pt" in pt_files
    for name in pt_files:
        path = checkpoint / name
        torch.load(path, map_location="cpu", weights_only=True)
        with zipfile.ZipFile(path) as zf:
            for entry in zf.namelist():
                if entry.endswith(".pkl"):
                    refs = _globals(zf.read(entry))
                    assert not any(n == "getattr" for _, n in refs), (name, refs)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_weights_only_refuses_the_getattr_form(tmp_path, protocol):
    """Why the test above matters: an enum in ``common.pt`` written by CPython 3.11.2 would be refused."""
    from torch.distributed.checkpoint.planner import WriteItemType

    path = tmp_path / "common.pt"
    torch.save({"kind": WriteItemType.SHARD}, path, pickle_protocol=protocol,
               pickle_module=_FormModule(_getattr_form))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


class _FormModule:
    """A ``pickle_module`` for ``torch.save`` whose Pickler writes enums in a fixed form."""

    __name__ = "pickle"

    def __init__(self, enum_form):
        form = enum_form

        class Pickler(pickle.Pickler):
            def reducer_override(self, value):
                if isinstance(value, enum.Enum):
                    return form(value)
                return NotImplemented

        self.Pickler = Pickler
        self.Unpickler = pickle.Unpickler
        self.dump = pickle.dump
        self.load = pickle.load
