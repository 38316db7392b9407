"""Checkpoint files hashed while they are written, so the manifest costs no second read of 100 GB.

Every byte a save writes goes through a `HashingStream`: torch.save'd state (`write_hashed`) and DCP's tensor
files (`HashingFileSystemWriter`, the stock `FileSystemWriter` with its file system's streams wrapped). Each
stream keeps a SHA-256 of what it wrote, recorded in `digests` under the file's name. A stream that was
seeked (not written front to back) records nothing; the manifest then hashes that file by reading it.

A failed write (a full disk) raises `OSError` naming the file, instead of the zip writer's
`unexpected pos ...` that a torch.save straight into a full file gives.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem


class HashingStream(io.RawIOBase):
    """A write-only file that hashes what passes through; `digests[name]` is set when it closes after
    writing front to back."""

    def __init__(self, raw: Any, path: Path, digests: dict[str, str]) -> None:
        super().__init__()
        self._raw = raw
        self._path = path
        self._digests = digests
        self._sha = hashlib.sha256()
        self._pos = 0
        self._sequential = True

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            self._raw.write(view)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(self._path)) from err
        if self._sequential:
            self._sha.update(view)
        self._pos += len(view)
        return len(view)

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._raw.seek(offset, whence)
        self._sequential = False
        return self._pos

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._raw.close()  # flushes what is buffered: a full disk may show only here
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(self._path)) from err
        finally:
            super().close()
        if self._sequential:
            self._digests[self._path.name] = self._sha.hexdigest()


def write_hashed(obj: Any, path: Path, digests: dict[str, str]) -> None:
    """torch.save `obj` to `path`, recording its SHA-256 in `digests[path.name]`."""
    with HashingStream(open(path, "wb"), path, digests) as stream:
        torch.save(obj, stream)


class _HashingFileSystem(FileSystem):
    def __init__(self, digests: dict[str, str]) -> None:
        super().__init__()
        self.digests = digests

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        with HashingStream(open(path, mode), path, self.digests) as stream:
            yield stream

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # `.metadata` is written as `.metadata.tmp`, then renamed
        digest = self.digests.pop(Path(path).name, None)
        if digest is not None:
            self.digests[Path(new_path).name] = digest


class HashingFileSystemWriter(FileSystemWriter):
    """DCP's file system writer, recording the SHA-256 of every file it writes in `digests`."""

    def __init__(self, path: str | os.PathLike, digests: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem(digests)
