"""``.npy`` files written block by block (:class:`NpyAppender`): an array of the index is appended
along its first axis as the builder makes it, never whole in memory, and starts in the narrowest
integer dtype its values allow (widened, checked, when one does not fit). The files are written into
the build's temporary folder, published whole with it (``fileio.publish_new_directory``)."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np

from megatron_mmbert.fileio import replace_synced


class NpyAppender:
    """A ``.npy`` file written chunk by chunk along its first axis, so that an array of the index is
    never whole in memory; the header is written last. ``dtype`` is where the values start; with
    ``wide`` (an int dtype) a chunk whose values do not fit ``dtype`` rewrites what was written as
    ``wide`` and continues in it (the narrowest dtype the values allow, checked, not assumed)."""

    HEADER_BYTES = 128
    """The header's size: numpy pads a version 1.0 header to 64-byte multiples and the one of any
    1-D or [N, k] array of up to 10^20 elements takes 128 bytes (checked when it is written)."""

    def __init__(self, path: str, dtype, row_shape=(), wide=None):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.wide = None if wide is None else np.dtype(wide)
        self.rows = 0
        self._f = open(path, "wb")
        self._f.write(b"\0" * self.HEADER_BYTES)

    def append(self, chunk) -> None:
        chunk = np.asarray(chunk)
        if chunk.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: chunk of shape {chunk.shape}, rows of shape {self.row_shape}")
        if chunk.size and self.dtype.kind in "iu" and chunk.dtype != self.dtype:
            info = np.iinfo(self.dtype)
            if chunk.min() < info.min or chunk.max() > info.max:
                if self.wide is None or self.wide == self.dtype:
                    raise OverflowError(f"{self.path}: values up to {chunk.max()} do not fit {self.dtype}")
                self._widen()
        np.ascontiguousarray(chunk, dtype=self.dtype).tofile(self._f)
        self.rows += len(chunk)

    def append_file(self, path: str, rows: int) -> None:
        """Append ``rows`` rows stored raw in this appender's dtype in file ``path``, copied by the kernel
        (``os.copy_file_range``; a buffered copy where it is missing), not through memory."""
        size = os.path.getsize(path)
        if size != rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes are not {rows} rows of {self.row_shape} {self.dtype}")
        self._f.flush()
        with open(path, "rb") as src:
            done = 0
            try:
                while done < size:
                    n = os.copy_file_range(src.fileno(), self._f.fileno(), size - done)
                    if n == 0:
                        raise OSError("copy_file_range made no progress")
                    done += n
            except (AttributeError, OSError):  # not Linux, or a file system that refuses it
                src.seek(done)
                os.lseek(self._f.fileno(), 0, os.SEEK_END)
                shutil.copyfileobj(src, self._f, 1 << 20)
                self._f.flush()
        self._f.seek(0, os.SEEK_END)
        self.rows += rows

    def _widen(self) -> None:
        """Rewrite what was written as ``self.wide`` (block by block) and continue in it."""
        self._f.close()
        old = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.HEADER_BYTES,
                        shape=(self.rows,) + self.row_shape) if self.rows else None
        tmp = self.path + ".widen"
        with open(tmp, "wb") as f:
            f.write(b"\0" * self.HEADER_BYTES)
            for a in range(0, self.rows, 1 << 22):
                np.ascontiguousarray(old[a:a + (1 << 22)], dtype=self.wide).tofile(f)
        del old
        replace_synced(tmp, self.path)
        self.dtype = self.wide
        self._f = open(self.path, "r+b")
        self._f.seek(0, os.SEEK_END)

    def close(self) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.rows,) + self.row_shape})
        if len(header.getvalue()) != self.HEADER_BYTES:  # pragma: no cover - shapes beyond 10^20
            raise ValueError(f"{self.path}: a .npy header of {len(header.getvalue())} bytes, not {self.HEADER_BYTES}")
        self._f.seek(0)
        self._f.write(header.getvalue())
        self._f.close()


__all__ = ["NpyAppender"]
