"""A checkpoint's file manifest: every file's size, and a SHA-256 of the small ones.

Written into the completion marker at save and checked at load, so a checkpoint that was truncated, lost a
file or had a small file overwritten after it was published (a full disk, a half-finished copy between
clusters, a broken object-store sync) is reported and skipped instead of loaded. Sizes catch truncation of
the large tensor files cheaply; hashes are computed only for files up to `HASH_LIMIT_BYTES` (metadata,
shared and per-rank state), so saving and resuming stay fast at any model size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

HASH_LIMIT_BYTES = 4 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(folder: Path, *, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """`{relative path: {"size": bytes, "sha256": hex (small files only)}}` for every file under `folder`."""
    manifest: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in exclude:
            continue
        size = path.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= HASH_LIMIT_BYTES:
            entry["sha256"] = _sha256(path)
        manifest[name] = entry
    return manifest


def manifest_problems(folder: Path, manifest: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with `folder` against its manifest (empty when it is intact)."""
    problems = []
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            problems.append(f"{name} has {size} bytes, {expected['size']} were written")
        elif "sha256" in expected and _sha256(path) != expected["sha256"]:
            problems.append(f"{name} has changed since it was written (SHA-256 differs)")
    return problems
