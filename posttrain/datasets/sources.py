"""Where rows come from: local files, globs, fsspec URLs and `save_to_disk` folders, read as streams.

A folder (local or a URL such as `hf://datasets/<org>/<name>`, which fsspec reads through huggingface_hub) is
read like a Hugging Face dataset repo: every data file below it (hidden files aside), the train split only when
file names say which split they hold (`data/train-00000-of-00002.parquet`, `train.jsonl`, `test/...`).

`resolve_data_files(spec)` turns one `data.path` into an ordered list of `DataFile`s (and fails early, with
one sentence, on a missing file, an empty glob or an unreadable URL). `ShardedRowStream` reads one epoch of
those files for one data shard (a DP rank x dataloader worker), row by row, never loading a remote file whole:

- jsonl (optionally compressed: .gz, .bz2, .xz, .zst): line by line from a stream; one line = one row slot,
  blank lines are not rows. Positions are (line, byte offset), so resuming a local file seeks.
- json: one array of row objects (or an object holding one such array) is parsed whole; a `.json` file that
  is really JSON lines is read as jsonl.
- parquet: row group by row group (remote files through range reads, which object stores and most web
  servers answer).
- arrow: the IPC stream files a Hugging Face `datasets.save_to_disk` folder holds (state.json order);
  `datasets` itself is not needed.
- npy / bin: memory-mapped token ids, one document per row (see token_files.py; their `.idx.npy` document
  indexes are not data files).

Sharding, with S = dp_world_size * num_workers shards and shard s = rank * num_workers + worker_id: when there
are at least `FILE_SHARDING_MIN_FILES_PER_SHARD * S` files each shard owns whole files (file i of the epoch's
order goes to shard i % S, so no shard reads another's bytes); otherwise every shard reads every file and owns
the rows whose global row index (counted over the epoch's file order) is s modulo S. Either way each row of an
epoch belongs to exactly one shard. Rows are reported with where they came from: `path:line` for jsonl,
`path row i` (0-based) for the other formats.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

from posttrain.datasets.counter_rng import CounterRNG
from posttrain.datasets.errors import BadRowError, DataError
from posttrain.datasets.token_files import INDEX_SUFFIX, TokenDocuments

FILE_SHARDING_MIN_FILES_PER_SHARD = 4
_READ_CHUNK = 1 << 20
_PARQUET_BATCH_ROWS = 1024
_KINDS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
    ".npy": "npy", ".bin": "bin",  # memory-mapped token ids (token_files.py)
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_REMOTE_STREAMING = ("http", "https")
# split names in the file paths of a Hugging Face dataset repo (as the Hub's data-files resolution reads them)
_TRAIN_WORDS = {"train", "training"}
_OTHER_SPLIT_WORDS = {"test", "testing", "eval", "evaluation", "validation", "valid", "val", "dev"}
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset: where it is and how its rows are stored."""

    path: str  # local path or fsspec URL
    kind: str  # jsonl | json | parquet | arrow


class SourceRow:
    """One row as read: its object (or the reason it has none) and where it came from.

    jsonl rows keep their raw line and are decoded on first access of `value` / `error`, so rows of other
    shards are never parsed and a shuffle buffer (and its saved state) holds compact bytes.
    """

    __slots__ = ("raw", "where", "_value", "_error")

    def __init__(
        self, value: dict[str, Any] | None, where: str, error: str | None = None, *, raw: bytes | None = None
    ) -> None:
        self.raw = raw
        self.where = where
        self._value = value
        self._error = error

    def _decode(self) -> None:
        if self.raw is not None:
            decoded = _decode_json_row(self.raw, self.where)
            self._value, self._error, self.raw = decoded._value, decoded._error, None

    @property
    def value(self) -> dict[str, Any] | None:
        self._decode()
        return self._value

    @property
    def error(self) -> str | None:
        self._decode()
        return self._error

    def to_state(self) -> tuple:
        return (self.raw, self._value, self.where, self._error)

    @classmethod
    def from_state(cls, state: tuple) -> SourceRow:
        raw, value, where, error = state
        return cls(value, where, error, raw=raw)


# ---------------------------------------------------------------------------------------------- resolving


def _is_remote(spec: str) -> bool:
    protocol = spec.split("://", 1)[0] if "://" in spec else ""
    return protocol not in ("", "file")


def _has_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def file_kind(path: str) -> str | None:
    """jsonl / json / parquet / arrow / npy / bin from the file name (a compression suffix is looked through)."""
    name = path.split("?", 1)[0].rsplit("/", 1)[-1].lower()
    if name.endswith(INDEX_SUFFIX):
        return None  # the document index of a token file
    for comp in _COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    _, ext = os.path.splitext(name)
    return _KINDS.get(ext)


def _url_to_fs(spec: str, field: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(spec)
    except ImportError as e:
        protocol = spec.split("://", 1)[0]
        raise DataError(
            f"{field} = {spec!r}: reading {protocol}:// URLs needs an fsspec backend that is not installed ({e}); "
            f"install it (s3fs for s3://, gcsfs for gs://, aiohttp for https://)"
        ) from e
    except ValueError as e:
        raise DataError(f"{field} = {spec!r} is not a URL fsspec understands ({e}); fix the URL") from e


def _join_url(fs, path: str, remote: bool) -> str:
    return fs.unstrip_protocol(path) if remote else path


def _folder_files(fs, folder: str, remote: bool, spec: str, field: str) -> list[DataFile]:
    """A `save_to_disk` folder (state.json / dataset_dict.json) or a plain folder of data files."""
    folder = folder.rstrip("/")

    def read_json(name: str) -> Any:
        with fs.open(f"{folder}/{name}", "rb") as f:
            return json.loads(f.read().decode("utf-8"))

    if fs.exists(f"{folder}/dataset_dict.json"):
        splits = read_json("dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise DataError(
                f"{field} = {spec!r} is a DatasetDict with splits {splits} and no 'train'; "
                f"point {field} at one split's folder (e.g. {spec.rstrip('/')}/{splits[0] if splits else 'train'})"
            )
        return _folder_files(fs, f"{folder}/train", remote, f"{spec.rstrip('/')}/train", field)
    if fs.exists(f"{folder}/state.json"):
        state = read_json("state.json")
        names = [entry["filename"] for entry in state.get("_data_files", [])]
        if not names:
            raise DataError(f"{field} = {spec!r}: state.json lists no _data_files; re-save the dataset")
        return [DataFile(_join_url(fs, f"{folder}/{n}", remote), "arrow") for n in names]
    entries = sorted(p for p in fs.find(folder) if not _hidden(p[len(folder):]))
    files = [DataFile(_join_url(fs, p, remote), kind) for p in entries if (kind := file_kind(p)) is not None]
    if not files:
        raise DataError(
            f"{field} = {spec!r} is a folder with no .jsonl, .json, .parquet or .arrow files "
            f"(and no state.json from save_to_disk); point {field} at the data files"
        )
    return _train_split(files, [p[len(folder):] for p in entries if file_kind(p) is not None], spec, field)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part)


def _split_name(relative: str) -> str | None:
    """The split a file of a dataset repo belongs to by the Hub's naming conventions (`data/train-00000-of-00002
    .parquet`, `train.jsonl`, `test/part-0.parquet`), or None when its path names none."""
    words = set(re.split(r"[-._ /0-9]+", relative.lower()))
    if words & _TRAIN_WORDS:
        return "train"
    other = sorted(words & _OTHER_SPLIT_WORDS)
    return other[0] if other else None


def _train_split(files: list[DataFile], relative: list[str], spec: str, field: str) -> list[DataFile]:
    """A folder laid out like a Hugging Face dataset repo: its train split (the files whose path says train), else
    the files whose path names no split; the others (test, validation, ...) are left out and logged."""
    splits = [_split_name(r) for r in relative]
    if "train" in splits:
        chosen = [f for f, split in zip(files, splits) if split == "train"]
    else:
        chosen = [f for f, split in zip(files, splits) if split is None]
    if not chosen:
        found = sorted({split for split in splits if split})
        raise DataError(
            f"{field} = {spec!r} holds only the split(s) {found}, no train split; point {field} at the files of "
            f"the split to read (e.g. {spec.rstrip('/')}/{relative[0].lstrip('/')})"
        )
    left_out = len(files) - len(chosen)
    if left_out:
        others = sorted({split for split in splits if split and split != "train"})
        logger.info("%s = %s: reading the train split (%d file(s)); %d file(s) of the split(s) %s left out",
                    field, spec, len(chosen), left_out, others)
    return chosen


def resolve_data_files(spec: str, *, field: str = "data.path") -> list[DataFile]:
    """The ordered files behind one dataset spec: a file, a glob, a URL, or a folder (local or remote)."""
    spec = spec.strip()
    if not spec:
        raise DataError(f"{field} is empty; set it to a data file, a glob, a URL or a save_to_disk folder")
    remote = _is_remote(spec)
    fs, root = _url_to_fs(spec, field)
    if _has_glob(spec):
        matches = sorted(fs.glob(root))
        matches = [m for m in matches if fs.isfile(m)]
        files = [DataFile(_join_url(fs, m, remote), k) for m in matches if (k := file_kind(m)) is not None]
        if not files:
            where = "" if remote else f" (relative paths start from {os.getcwd()})"
            raise DataError(f"{field} = {spec!r} matches no .jsonl, .json, .parquet or .arrow files{where}")
        return files
    protocol = spec.split("://", 1)[0] if remote else ""
    try:
        if protocol in _REMOTE_STREAMING:
            fs.info(root)  # HEAD: the URL answers; http(s) has no folders
            is_dir = False
        else:
            if not fs.exists(root):
                raise FileNotFoundError(root)
            is_dir = fs.isdir(root)
    except FileNotFoundError as e:
        cause = e.__cause__  # fsspec's http info() turns every failure into FileNotFoundError
        unreachable = cause is not None and not isinstance(cause, FileNotFoundError)
        if protocol in _REMOTE_STREAMING and unreachable and getattr(cause, "status", None) not in (404, 410):
            raise DataError(
                f"{field} = {spec!r} could not be read ({type(cause).__name__}: {cause}); check the URL, "
                f"network access and credentials"
            ) from e
        if remote:
            raise DataError(f"{field} = {spec!r}: no such file or object at that URL; check the URL") from e
        raise DataError(
            f"{field} = {spec!r}: data file not found (relative paths start from {os.getcwd()}); fix the path"
        ) from e
    except DataError:
        raise
    except Exception as e:  # network, permissions, credentials
        raise DataError(
            f"{field} = {spec!r} could not be read ({type(e).__name__}: {e}); check the URL, network access "
            f"and credentials"
        ) from e
    if is_dir:
        return _folder_files(fs, root, remote, spec, field)
    kind = file_kind(spec)
    if kind is None:
        raise DataError(
            f"{field} = {spec!r} has an unsupported file type; use .jsonl, .json, .parquet or .arrow "
            f"(optionally compressed, e.g. .jsonl.gz), token ids in .npy / .DTYPE.bin, or a save_to_disk folder"
        )
    return [DataFile(spec, kind)]


# ---------------------------------------------------------------------------------------------- opening


def _open_binary(path: str, *, streaming: bool) -> BinaryIO:
    """Open a local path or URL for reading. `streaming` asks http(s) for one sequential GET (no seeks)."""
    import fsspec
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    try:
        fs, root = fsspec.core.url_to_fs(path)
        protocol = path.split("://", 1)[0] if "://" in path else ""
        if streaming and protocol in _REMOTE_STREAMING:
            raw = fs.open(root, "rb", block_size=0)
        else:
            raw = fs.open(root, "rb")
    except FileNotFoundError as e:
        raise DataError(f"data file {path!r} no longer exists; check the path") from e
    except Exception as e:
        raise DataError(f"could not open {path!r} ({type(e).__name__}: {e}); check the path or URL") from e
    compression = infer_compression(path)
    if compression is not None and streaming:
        return compr[compression](raw, mode="rb")
    return raw


class OverlongLine(int):
    """Stands for a line longer than the row limit: its length in bytes (its content was never kept)."""


def _iter_lines(f: BinaryIO, max_bytes: int = 0) -> Iterator[bytes | OverlongLine]:
    """Lines (with their newline) read in 1 MiB chunks: works on any stream, counts bytes exactly. A line over
    `max_bytes` (0: no limit) is read through without being held and comes out as an `OverlongLine`."""
    pending = b""
    skipped = 0  # bytes of an overlong line read so far
    while True:
        chunk = f.read(_READ_CHUNK)
        if not chunk:
            break
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start : end + 1]
            if skipped:
                skipped += len(piece)
            else:
                pending += piece
                if max_bytes and len(pending) > max_bytes:
                    skipped, pending = len(pending), b""
            if end < 0:
                break
            if skipped:
                yield OverlongLine(skipped)
            else:
                yield pending
            skipped, pending, start = 0, b"", end + 1
    if skipped:
        yield OverlongLine(skipped)
    elif pending:
        yield pending


def _skip_bytes(f: BinaryIO, n: int) -> None:
    try:
        if f.seekable():
            f.seek(n)
            return
    except (OSError, ValueError, AttributeError):
        pass
    while n > 0:
        chunk = f.read(min(n, _READ_CHUNK))
        if not chunk:
            break
        n -= len(chunk)


@dataclass
class FileCursor:
    """How far one file has been consumed: rows (jsonl: lines) read and, for jsonl, the next byte offset."""

    row: int = 0
    byte_offset: int = 0


def _decode_json_row(text: bytes | str, where: str) -> SourceRow:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return SourceRow(None, where, f"malformed JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError as e:
        return SourceRow(None, where, f"the line is not UTF-8 ({e.reason} at byte {e.start})")
    if not isinstance(value, dict):
        return SourceRow(None, where, f"expected a JSON object per line, got a JSON {type(value).__name__}")
    return SourceRow(value, where)


def _iter_jsonl(
    path: str, cursor: FileCursor, keep: Callable[[int], bool], max_row_bytes: int = 0
) -> Iterator[SourceRow]:
    f = _open_binary(path, streaming=True)
    try:
        if cursor.byte_offset:
            _skip_bytes(f, cursor.byte_offset)
        for line in _iter_lines(f, max_row_bytes):
            index = cursor.row
            cursor.row += 1
            cursor.byte_offset += line if isinstance(line, OverlongLine) else len(line)
            if not keep(index):
                continue
            if isinstance(line, OverlongLine):
                yield SourceRow(None, f"{path}:{index + 1}", f"the line is {int(line)} bytes, over "
                                f"data.max_row_bytes = {max_row_bytes} (raise that limit for rows this long)")
                continue
            text = line.strip()
            if not text:
                continue  # a blank line is not a row
            yield SourceRow(None, f"{path}:{index + 1}", raw=text)
    finally:
        f.close()


def _json_array_rows(path: str, text: str) -> Iterator[tuple[Any, str]]:
    """Elements of a top-level JSON array, each with `path:line` of where it starts."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted_to = 1, 0
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            raise DataError(f"{path}: the JSON array is not closed with ']'; fix the file")
        if text[pos] == "]":
            return
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); a broken .json file cannot be skipped "
                f"row by row, fix it (or store the rows as JSON lines)"
            ) from e
        yield value, f"{path}:{line}"
        pos = end


def _iter_json(
    path: str, cursor: FileCursor, keep: Callable[[int], bool], max_row_bytes: int = 0
) -> Iterator[SourceRow]:
    with _open_binary(path, streaming=True) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        elements: Iterator[tuple[Any, str]] = _json_array_rows(path, text)
    else:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several objects: this .json file is JSON lines
                yield from _iter_jsonl(path, cursor, keep, max_row_bytes)
                return
            raise DataError(
                f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); a broken .json file cannot be skipped "
                f"row by row, fix it (or store the rows as JSON lines)"
            ) from e
        lists = [k for k, v in document.items() if isinstance(v, list)] if isinstance(document, dict) else []
        if isinstance(document, dict) and len(lists) == 1 and all(isinstance(r, dict) for r in document[lists[0]]):
            key = lists[0]
            elements = ((r, f"{path} {key}[{i}]") for i, r in enumerate(document[key]))
        elif isinstance(document, dict):
            elements = iter([(document, f"{path}:1")])
        else:
            raise DataError(f"{path}: expected a JSON array of row objects, got a JSON {type(document).__name__}")
    for index, (value, where) in enumerate(elements):
        if index < cursor.row:
            continue
        cursor.row = index + 1
        if not keep(index):
            continue
        if not isinstance(value, dict):
            yield SourceRow(None, where, f"expected a JSON object per row, got a JSON {type(value).__name__}")
        else:
            yield SourceRow(value, where)


def _rows_of_batch(batch, base: int, cursor: FileCursor, keep: Callable[[int], bool], path: str):
    import pyarrow as pa

    start = max(cursor.row - base, 0)
    if start >= batch.num_rows:
        return
    mine = [i for i in range(start, batch.num_rows) if keep(base + i)]
    values = batch.take(pa.array(mine, type=pa.int64())).to_pylist() if mine else []
    by_index = dict(zip(mine, values))
    for i in range(start, batch.num_rows):
        cursor.row = base + i + 1
        if i in by_index:
            yield SourceRow(by_index[i], f"{path} row {base + i}")
    cursor.row = base + batch.num_rows


def _iter_parquet(path: str, cursor: FileCursor, keep: Callable[[int], bool]) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    f = _open_binary(path, streaming=False)
    try:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {e}); fix the file") from e
        base = 0
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if base + n <= cursor.row:
                base += n
                continue
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[group]):
                yield from _rows_of_batch(batch, base, cursor, keep, path)
                base += batch.num_rows
    finally:
        f.close()


def _iter_arrow(path: str, cursor: FileCursor, keep: Callable[[int], bool]) -> Iterator[SourceRow]:
    import pyarrow as pa

    source = pa.memory_map(path) if not _is_remote(path) else _open_binary(path, streaming=True)
    try:
        try:
            reader = pa.ipc.open_stream(source)
            batches: Iterator = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        base = 0
        for batch in batches:
            if base + batch.num_rows > cursor.row:
                yield from _rows_of_batch(batch, base, cursor, keep, path)
            base += batch.num_rows
    except pa.ArrowInvalid as e:
        raise DataError(f"{path} is not a readable arrow file ({e}); re-save the dataset") from e
    finally:
        source.close()


def _iter_token_file(path: str, cursor: FileCursor, keep: Callable[[int], bool], *, kind: str) -> Iterator[SourceRow]:
    documents = TokenDocuments(path, kind)
    for index in range(cursor.row, len(documents)):
        cursor.row = index + 1
        if keep(index):
            yield SourceRow({"input_ids": documents[index]}, f"{path} row {index}")


_READERS = {
    "jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet, "arrow": _iter_arrow,
    "npy": partial(_iter_token_file, kind="npy"), "bin": partial(_iter_token_file, kind="bin"),
}


def iter_file_rows(
    data_file: DataFile,
    cursor: FileCursor | None = None,
    keep: Callable[[int], bool] | None = None,
    *,
    max_row_bytes: int = 0,
) -> Iterator[SourceRow]:
    """Rows of one file from `cursor` on (advanced as rows are consumed); `keep(i)` selects row slots. A JSON
    line longer than `max_row_bytes` (0: no limit) becomes a bad row, checked before it is parsed or held."""
    reader = _READERS[data_file.kind]
    if data_file.kind in ("jsonl", "json"):
        reader = partial(reader, max_row_bytes=max_row_bytes)
    return reader(data_file.path, cursor or FileCursor(), keep or (lambda i: True))


# ---------------------------------------------------------------------------------------------- streaming


class ShardedRowStream:
    """One shard's rows of one dataset, one epoch at a time, resumable at any row.

    `next_row()` returns the next `SourceRow` of the current epoch or None at its end; `start_epoch(e)`
    begins epoch e (the file order is re-drawn per epoch when `shuffle_files`). `rows_in_epoch` counts rows
    this shard returned; `global_rows_in_epoch` all rows the epoch had (known in row-sharding mode).
    """

    def __init__(
        self,
        files: list[DataFile],
        *,
        shard: int,
        num_shards: int,
        seed: int,
        name: str,
        shuffle_files: bool,
        max_row_bytes: int = 0,
    ) -> None:
        if not files:
            raise DataError(f"{name}: no data files")
        self.files = files
        self.shard = shard
        self.num_shards = num_shards
        self.seed = seed
        self.name = name
        self.shuffle_files = shuffle_files
        self.max_row_bytes = max_row_bytes
        self.by_files = len(files) >= FILE_SHARDING_MIN_FILES_PER_SHARD * num_shards and num_shards > 1
        self.epoch = 0
        self.file_pos = 0  # index into this epoch's list of files this shard reads
        self.file_base = 0  # global row index of the current file's first row (row-sharding mode)
        self.cursor = FileCursor()
        self.rows_in_epoch = 0
        self._order = self._epoch_files(0)
        self._rows: Iterator[SourceRow] | None = None

    # -- epoch layout
    def _epoch_files(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        if self.shuffle_files and len(order) > 1:
            order = CounterRNG(self.seed, "files", self.name, epoch).permutation(len(order))
        if self.by_files:
            order = order[self.shard :: self.num_shards]
        return order

    def start_epoch(self, epoch: int) -> None:
        self._close()
        self.epoch = epoch
        self.file_pos = 0
        self.file_base = 0
        self.cursor = FileCursor()
        self.rows_in_epoch = 0
        self._order = self._epoch_files(epoch)

    @property
    def global_rows_in_epoch(self) -> int | None:
        return None if self.by_files else self.file_base

    # -- reading
    def _keep(self, index_in_file: int) -> bool:
        if self.by_files or self.num_shards == 1:
            return True
        return (self.file_base + index_in_file) % self.num_shards == self.shard

    def next_row(self) -> SourceRow | None:
        while self.file_pos < len(self._order):
            if self._rows is None:
                data_file = self.files[self._order[self.file_pos]]
                self._rows = iter_file_rows(data_file, self.cursor, self._keep, max_row_bytes=self.max_row_bytes)
            row = next(self._rows, None)
            if row is not None:
                self.rows_in_epoch += 1
                return row
            self._rows = None
            self.file_base += self.cursor.row
            self.file_pos += 1
            self.cursor = FileCursor()
        return None

    def _close(self) -> None:
        if self._rows is not None:
            self._rows.close()  # type: ignore[attr-defined]
            self._rows = None

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "file_pos": self.file_pos,
            "file_base": self.file_base,
            "row": self.cursor.row,
            "byte_offset": self.cursor.byte_offset,
            "rows_in_epoch": self.rows_in_epoch,
            "num_files": len(self.files),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_files"] != len(self.files):
            raise DataError(
                f"{self.name}: the data state was saved with {state['num_files']} files but {len(self.files)} "
                f"are there now; resume with the same data files"
            )
        self.start_epoch(state["epoch"])
        self.file_pos = state["file_pos"]
        self.file_base = state["file_base"]
        self.cursor = FileCursor(state["row"], state["byte_offset"])
        self.rows_in_epoch = state["rows_in_epoch"]


def bad_row_error(row: SourceRow) -> BadRowError:
    """The error a row that could not be decoded stands for."""
    return BadRowError(
        f"{row.where}: {row.error}; fix the row or set data.skip_bad_rows = true to skip and count such rows"
    )
