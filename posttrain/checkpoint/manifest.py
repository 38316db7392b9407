"""A checkpoint's file manifest: every file's size and SHA-256.

Written into the completion marker at save and checked at load, so a checkpoint that was truncated, lost a
file or had bytes overwritten after it was published (a full disk, a half-finished copy between clusters, a
broken object-store sync, a bad disk) is reported and skipped instead of loaded.

The cost stays small at any size: the hashes are computed while the files are written (`hashed_write.py`);
at load the sizes are checked first (one stat per file), and the hashes are verified by a background thread
(`HashVerifier`) while DCP reads the same files, each rank verifying its share of the files.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

_BLOCK = 8 << 20


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(
    folder: Path, digests: dict[str, str] | None = None, *, exclude: tuple[str, ...] = ()
) -> dict[str, dict[str, Any]]:
    """`{relative path: {"size": bytes, "sha256": hex}}` for every file under `folder`. A file's hash comes
    from `digests` (computed while writing) when there, else from reading it."""
    digests = digests or {}
    manifest: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in exclude:
            continue
        manifest[name] = {"size": path.stat().st_size, "sha256": digests.get(name) or sha256_of_file(path)}
    return manifest


def size_problems(folder: Path, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """Missing and truncated files (one stat each: cheap at any checkpoint size)."""
    problems = []
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(f"{name} has {size} bytes, {expected['size']} were written")
    return problems


def hash_problems(folder: Path, manifest: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Files among `names` whose content differs from the manifest's SHA-256."""
    problems = []
    for name in names:
        expected = manifest[name].get("sha256")
        try:
            if expected is not None and sha256_of_file(folder / name) != expected:
                problems.append(f"{name} has changed since it was written (SHA-256 differs)")
        except OSError as err:
            problems.append(f"{name} cannot be read ({err.strerror})")
    return problems


def manifest_problems(folder: Path, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """Everything wrong with `folder` against its manifest (empty when intact); reads every file."""
    return size_problems(folder, manifest) or hash_problems(folder, manifest, sorted(manifest))


class HashVerifier:
    """Verifies the hashes of `names` in a background thread; `problems()` waits for it."""

    def __init__(self, folder: Path, manifest: dict[str, dict[str, Any]], names: list[str]) -> None:
        self._result: list[str] = []
        self._thread = threading.Thread(
            target=lambda: self._result.extend(hash_problems(folder, manifest, names)),
            name="checkpoint-hash-verify",
            daemon=True,
        )
        self._thread.start()

    def problems(self) -> list[str]:
        self._thread.join()
        return self._result
