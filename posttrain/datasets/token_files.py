"""Memory-mapped token files: pre-tokenized sequences stored as plain numpy arrays (local files only).

Each document becomes one row `{"input_ids": array}` for `data.format = "tokens"` (every id trained; rows that
need a loss mask or document ids go in jsonl or parquet instead):
- `NAME.npy`, 2-D integer array [rows, length]: one document per row;
- `NAME.npy`, 1-D integer array: a token stream, cut into documents by the sidecar index `NAME.idx.npy`;
- `NAME.DTYPE.bin` (DTYPE one of uint8, uint16, int16, uint32, int32, int64): raw little-endian token ids
  with no header (e.g. `events.uint16.bin`), cut by the sidecar index `NAME.DTYPE.idx.npy`.
The sidecar index is a 1-D integer `.npy` of document offsets into the token stream: n_documents + 1
entries, starting at 0, non-decreasing, ending at the number of tokens; document i is
`tokens[offsets[i]:offsets[i + 1]]`. `write_token_file` writes both files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from posttrain.datasets.errors import DataError

BIN_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "int64")
INDEX_SUFFIX = ".idx.npy"


def index_path(path: str) -> str:
    """The sidecar index of a token file: `a.npy` -> `a.idx.npy`, `a.uint16.bin` -> `a.uint16.idx.npy`."""
    stem = path[: -len(".npy")] if path.endswith(".npy") else path[: -len(".bin")]
    return stem + INDEX_SUFFIX


def bin_dtype(path: str) -> np.dtype:
    """The dtype a `.bin` token file names before its extension (`events.uint16.bin`)."""
    name = Path(path).name
    parts = name.split(".")
    dtype = parts[-2] if len(parts) >= 3 else ""
    if dtype not in BIN_DTYPES:
        raise DataError(
            f"{path}: a raw .bin token file names its dtype before the extension, e.g. events.uint16.bin "
            f"(one of {', '.join(BIN_DTYPES)}); rename the file"
        )
    return np.dtype(dtype).newbyteorder("<")


def _local(path: str) -> str:
    if "://" in path and not path.startswith("file://"):
        raise DataError(f"{path}: .npy / .bin token files are memory-mapped and must be local; copy them first")
    return path.removeprefix("file://")


def _read_offsets(path: str, n_tokens: int) -> np.ndarray:
    idx = index_path(path)
    if not Path(idx).is_file():
        raise DataError(
            f"{path}: a 1-D token stream needs its document index {idx} (document offsets: 0, ..., {n_tokens}); "
            f"write it with posttrain.datasets.token_files.write_token_file"
        )
    offsets = np.load(idx, mmap_mode="r")
    if offsets.ndim != 1 or offsets.shape[0] < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise DataError(f"{idx}: the document index must be a 1-D integer array of offsets")
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tokens or (np.diff(offsets) < 0).any():
        raise DataError(
            f"{idx}: document offsets must start at 0, never decrease and end at the {n_tokens} tokens of {path}"
        )
    return offsets


def _open_tokens(path: str, kind: str) -> np.ndarray:
    local = _local(path)
    try:
        if kind == "npy":
            tokens = np.load(local, mmap_mode="r")
        else:
            tokens = np.memmap(local, dtype=bin_dtype(local), mode="r")
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable {kind} token file ({type(e).__name__}: {e}); fix the file") from e
    if tokens.ndim not in (1, 2) or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: a token file holds a 1-D or 2-D integer array, got {tokens.dtype} {tokens.shape}")
    return tokens


class TokenDocuments:
    """The documents of one token file, by index (memory-mapped: nothing is read until a document is)."""

    def __init__(self, path: str, kind: str) -> None:
        self.path = path
        self.tokens = _open_tokens(path, kind)
        self.offsets = None if self.tokens.ndim == 2 else _read_offsets(_local(path), self.tokens.shape[0])

    def __len__(self) -> int:
        return self.tokens.shape[0] if self.offsets is None else self.offsets.shape[0] - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if self.offsets is None:
            return np.asarray(self.tokens[i], dtype=np.int64)
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)


def write_token_file(path: str | Path, documents: list[Any]) -> None:
    """Write documents (sequences of ints) as a token stream `path` (.npy, or NAME.DTYPE.bin) + its index."""
    path = str(path)
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(d) for d in documents])
    flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents]) if documents else np.zeros(0, np.int64)
    if path.endswith(".npy"):
        dtype = np.dtype(np.uint16) if flat.size == 0 or flat.max() < 2**16 else np.dtype(np.int64)
        np.save(path, flat.astype(dtype))
    elif path.endswith(".bin"):
        dtype = bin_dtype(path)
        if flat.size and (flat.min() < np.iinfo(dtype).min or flat.max() > np.iinfo(dtype).max):
            raise ValueError(f"{path}: ids {flat.min()}..{flat.max()} do not fit {dtype.name}")
        flat.astype(dtype).tofile(path)
    else:
        raise ValueError(f"{path}: a token file ends in .npy or .DTYPE.bin")
    np.save(index_path(path), offsets)
