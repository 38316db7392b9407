"""Data sources: local jsonl / json / parquet / globs / save_to_disk folders, http on loopback, memory fs."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import threading
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sft_data_fakes import FakeTokenizer, texts_of

from posttrain.config.sections import DataSection
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.errors import DataError
from posttrain.datasets.sources import (
    DataFile,
    FileCursor,
    ShardedRowStream,
    iter_file_rows,
    resolve_data_files,
)

ROWS = [{"text": f"row {i}", "i": i} for i in range(23)]


def read_all(spec: str) -> list[dict]:
    out = []
    for data_file in resolve_data_files(spec):
        for row in iter_file_rows(data_file):
            assert row.error is None, row.error
            out.append(row.value)
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_arrow_stream(path: Path, rows, batch_rows: int = 5) -> None:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)


def write_save_to_disk_folder(folder: Path, rows, n_files: int = 2) -> Path:
    """What `datasets.Dataset.save_to_disk` writes: data-XXXXX-of-NNNNN.arrow + state.json + dataset_info.json."""
    folder.mkdir(parents=True)
    per = -(-len(rows) // n_files)
    names = []
    for k in range(n_files):
        name = f"data-{k:05d}-of-{n_files:05d}.arrow"
        write_arrow_stream(folder / name, rows[k * per : (k + 1) * per])
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


# ------------------------------------------------------------------------------------------- local files


def test_jsonl_rows_carry_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    rows = list(iter_file_rows(resolve_data_files(str(path))[0]))
    assert [r.value for r in rows] == [{"text": "a"}, {"text": "b"}]
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"]  # the blank line is not a row


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    assert read_all(str(path)) == ROWS


def test_json_array_object_and_json_lines(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(ROWS, indent=1))
    assert read_all(str(tmp_path / "arr.json")) == ROWS
    rows = list(iter_file_rows(DataFile(str(tmp_path / "arr.json"), "json")))
    assert rows[0].where.startswith(f"{tmp_path / 'arr.json'}:") and rows[1].where != rows[0].where
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": ROWS}))
    assert read_all(str(tmp_path / "obj.json")) == ROWS
    write_jsonl(tmp_path / "lines.json", ROWS)  # a .json file that is really JSON lines
    assert read_all(str(tmp_path / "lines.json")) == ROWS


def test_parquet_row_groups_and_resume(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=4)
    assert read_all(str(path)) == ROWS
    cursor = FileCursor(row=9)  # resume in the middle of the third row group
    rest = [r.value for r in iter_file_rows(DataFile(str(path), "parquet"), cursor)]
    assert rest == ROWS[9:] and cursor.row == len(ROWS)


def test_glob_reads_files_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[10:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:10])
    (tmp_path / "README.md").write_text("not data")
    assert [f.kind for f in resolve_data_files(str(tmp_path / "*"))] == ["jsonl", "jsonl"]
    assert read_all(str(tmp_path / "*.jsonl")) == ROWS


def test_save_to_disk_folder_without_datasets_package(tmp_path):
    folder = write_save_to_disk_folder(tmp_path / "ds", ROWS)
    files = resolve_data_files(str(folder))
    assert [f.kind for f in files] == ["arrow", "arrow"]
    assert read_all(str(folder)) == ROWS
    cursor = FileCursor(row=7)
    assert [r.value for r in iter_file_rows(files[0], cursor)] == ROWS[7:12]


def test_dataset_dict_folder_uses_train_split(tmp_path):
    root = tmp_path / "dd"
    write_save_to_disk_folder(root / "train", ROWS)
    write_save_to_disk_folder(root / "test", ROWS[:3], n_files=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert read_all(str(root)) == ROWS


def test_stream_resumes_mid_file_with_byte_offset(tmp_path):
    files = [DataFile(str(write_jsonl(tmp_path / f"{k}.jsonl", ROWS[k * 12 : (k + 1) * 12])), "jsonl") for k in (0, 1)]
    stream = ShardedRowStream(files, shard=0, num_shards=1, seed=0, name="t", shuffle_files=False)
    head = [stream.next_row().value for _ in range(15)]
    state = stream.state_dict()
    assert state["byte_offset"] > 0
    resumed = ShardedRowStream(files, shard=0, num_shards=1, seed=0, name="t", shuffle_files=False)
    resumed.load_state_dict(state)
    tail = []
    while (row := resumed.next_row()) is not None:
        tail.append(row.value)
    assert head + tail == ROWS


# ------------------------------------------------------------------------------------------- http on loopback


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single-range GETs (as real object stores serve), logging requests."""

    requests: list[tuple[str, str | None]] = []

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        _RangeHandler.requests.append((self.path, self.headers.get("Range")))
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start_s, end_s = rng.split("=", 1)[1].split("-")
        start, end = int(start_s), min(int(end_s) if end_s else size - 1, size - 1)
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._range_left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        left = getattr(self, "_range_left", None)
        if left is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(left))


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: _RangeHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    _RangeHandler.requests = []
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_jsonl_is_streamed_and_resumable(http_root):
    root, url = http_root
    write_jsonl(root / "a.jsonl", ROWS)
    assert read_all(f"{url}/a.jsonl") == ROWS
    assert all(rng is None for _, rng in _RangeHandler.requests)  # one plain streaming GET, no ranges
    files = resolve_data_files(f"{url}/a.jsonl")
    stream = ShardedRowStream(files, shard=0, num_shards=1, seed=0, name="t", shuffle_files=False)
    head = [stream.next_row().value for _ in range(5)]
    resumed = ShardedRowStream(files, shard=0, num_shards=1, seed=0, name="t", shuffle_files=False)
    resumed.load_state_dict(stream.state_dict())
    tail = []
    while (row := resumed.next_row()) is not None:
        tail.append(row.value)
    assert head + tail == ROWS


def test_http_parquet_reads_row_groups_by_range(http_root):
    root, url = http_root
    pq.write_table(pa.Table.from_pylist(ROWS), root / "a.parquet", row_group_size=5)
    assert read_all(f"{url}/a.parquet") == ROWS
    assert any(rng is not None for _, rng in _RangeHandler.requests)


def test_http_missing_url_is_one_clear_error(http_root):
    _, url = http_root
    with pytest.raises(DataError, match=r"data.path = 'http://127.0.0.1:\d+/nope.jsonl': no such file"):
        resolve_data_files(f"{url}/nope.jsonl")


# ------------------------------------------------------------------------------------------- fsspec memory fs


def test_memory_filesystem_files_globs_and_save_to_disk_folder(tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"/t-{uuid.uuid4().hex}"
    with fs.open(f"{base}/a.jsonl", "wb") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS[:10]).encode())
    with fs.open(f"{base}/b.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(ROWS[10:]), f, row_group_size=4)
    assert read_all(f"memory://{base}/a.jsonl") == ROWS[:10]
    assert read_all(f"memory://{base}/*") == ROWS
    assert read_all(f"memory://{base}") == ROWS  # a plain folder of data files
    local = write_save_to_disk_folder(tmp_path / "ds", ROWS)
    for p in local.iterdir():
        fs.pipe(f"{base}/ds/{p.name}", p.read_bytes())
    assert read_all(f"memory://{base}/ds") == ROWS
    with pytest.raises(DataError, match="no such file"):
        resolve_data_files(f"memory://{base}/missing.jsonl")


def test_http_dataset_through_dataloader_workers(http_root):
    root, url = http_root
    write_jsonl(root / "a.jsonl", ROWS)
    loader = build_sft_dataloader(
        DataSection(path=f"{url}/a.jsonl", num_workers=2, shuffle_buffer=4), FakeTokenizer(),
        seq_len=32, micro_batch_size=2, dp_rank=0, dp_world_size=1, seed=0, num_epochs=1,
    )
    assert sorted(texts_of(list(loader))) == sorted(r["text"] for r in ROWS)
