"""``checkpoint.async_save`` (megatron_mmbert/checkpoints/async_save.py) in one process: what the
background writer writes is what a synchronous save writes, taken when the save was scheduled (not
what training changed since); nothing is published before every write finished; a failed write
raises at publication, leaving ``latest`` alone. The trainer's use of it -- a DP2 run with the
distributed optimizer saving asynchronously, killed mid-write and after a save was published, resumed
bitwise, its checkpoints file-for-file those of the synchronous reference -- is in
tests/test_training_resume.py (layout ``shipped``); a stop signal with a save in flight in
tests/test_preemption.py."""

import errno
import os
import threading

import pytest
import torch

from megatron_mmbert.checkpoints import async_save
from megatron_mmbert.checkpoints import dist as ckpt
from megatron_mmbert.config import model_preset
from tests.helpers.model import world_of_one
from tests.helpers.training import checkpoint_file_differences


@pytest.fixture(scope="module", autouse=True)
def one_process_world():
    with world_of_one():
        yield


class Chunk(torch.nn.Module):
    """A model chunk as the checkpoint code sees one: tensors behind ``sharded_state_dict()``."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(64, 32, generator=g))
        self.b = torch.nn.Parameter(torch.randn(1000, generator=g))

    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        return {k: ShardedTensor.from_rank_offsets(f"layer.{k}", v.data) for k, v in (("w", self.w), ("b", self.b))}


def _save_args(root, name, chunk, step=3):
    return (str(root), name, [chunk], None, model_preset("tiny"), {"step": step})


class Gate:
    """megatron-core's per-file writer, held until :meth:`open` (so the test decides when the
    background write happens)."""

    def __init__(self, monkeypatch, fail=None):
        real = async_save._write_bucket_fn()
        self.event = threading.Event()
        self.fail = fail

        def write(*args, **kwargs):
            self.event.wait(timeout=60)
            if self.fail is not None:
                raise self.fail
            return real(*args, **kwargs)

        monkeypatch.setattr(async_save, "_write_bucket_fn", lambda: write)

    def open(self):
        self.event.set()


def test_the_background_write_is_the_synchronous_save_of_the_scheduled_state(tmp_path, monkeypatch):
    chunk = Chunk()
    sync_root, async_root = tmp_path / "sync", tmp_path / "async"
    ckpt.save_training(*_save_args(sync_root, "iter_0000003", chunk))

    gate = Gate(monkeypatch)
    saver = async_save.AsyncSaver(torch.device("cpu"))
    job = saver.save_training(*_save_args(async_root, "iter_0000003", chunk))
    assert job.bytes == (64 * 32 + 1000) * 4 and job.blocked_s > 0
    with torch.no_grad():  # training goes on: the next step changes the weights in place
        chunk.w.add_(1.0)
        chunk.b.zero_()
    assert saver.poll() is None  # still writing: nothing published
    assert not os.path.exists(async_root / "latest") and not os.path.exists(async_root / "iter_0000003")
    gate.open()
    published = saver.wait()
    assert published is job and job.write_s > 0 and saver.pending is None
    assert (async_root / "latest").read_text().strip() == "iter_0000003"

    a, s = async_root / "iter_0000003", sync_root / "iter_0000003"
    assert checkpoint_file_differences(str(s), str(a)) == []
    ckpt.verify_checkpoint(str(a))  # the digests the writer took in the background are the files'


def test_poll_publishes_once_the_write_is_done(tmp_path, monkeypatch):
    chunk = Chunk()
    gate = Gate(monkeypatch)
    saver = async_save.AsyncSaver(torch.device("cpu"))
    saver.save_training(*_save_args(tmp_path, "iter_0000001", chunk, step=1))
    assert saver.poll() is None and saver.poll() is None
    gate.open()
    saver.pending.done.wait(timeout=60)
    job = saver.poll()
    assert job is not None and job.name == "iter_0000001" and saver.poll() is None
    assert ckpt.read_latest(str(tmp_path)) == str(tmp_path / "iter_0000001")
    # the next save waits for nothing, and replaces latest only once it is itself complete
    gate.event.clear()
    saver.save_training(*_save_args(tmp_path, "iter_0000002", chunk, step=2))
    assert ckpt.read_latest(str(tmp_path)) == str(tmp_path / "iter_0000001")
    gate.open()
    assert saver.wait().name == "iter_0000002"
    assert ckpt.read_latest(str(tmp_path)) == str(tmp_path / "iter_0000002")


def test_a_failed_background_write_raises_at_publication_and_keeps_latest(tmp_path, monkeypatch):
    chunk = Chunk()
    saver = async_save.AsyncSaver(torch.device("cpu"))
    ckpt.save_training(*_save_args(tmp_path, "iter_0000001", chunk, step=1))
    gate = Gate(monkeypatch, fail=OSError(errno.ENOSPC, "No space left on device"))
    saver.save_training(*_save_args(tmp_path, "iter_0000002", chunk, step=2))
    gate.open()
    with pytest.raises(BaseException, match="No space left on device|disk is full|space") as info:
        saver.wait()
    assert "iter_0000002" in str(info.value)  # names the checkpoint
    assert ckpt.read_latest(str(tmp_path)) == str(tmp_path / "iter_0000001")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "latest"]  # alone: its temporary folder is gone
    assert saver.pending is None


def test_an_unknown_request_is_refused_by_name():
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    from megatron_mmbert.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.async_save") as info:
        async_save._unpack_request(AsyncRequest(print, (1, 2, 3), []))
    assert info.value.field == "checkpoint.async_save"
    assert async_save._unpack_request(AsyncRequest(None, (), [])) == ([], [], None)


def test_start_up_refuses_what_the_writer_cannot_do(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_mmbert.config import ConfigError

    async_save.require_support()  # megatron-core 0.16.1 as pinned, psutil installed
    monkeypatch.setattr(filesystem_async, "HAVE_PSUTIL", False)
    with pytest.raises(ConfigError, match="needs psutil.*checkpoint.async_save: false"):
        async_save.AsyncSaver(torch.device("cpu"))
    async_save.AsyncSaver(torch.device("cpu"), enabled=False)  # off: nothing is checked
