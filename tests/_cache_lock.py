"""One builder at a time for an artifact of the test cache: pytest-xdist workers (CI runs two) may ask for the
same cached folder at once; the first builds it while the others wait on an exclusive file lock, then find it
complete."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """Hold `<folder>.lock` exclusively (blocking) while the caller checks and builds `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
