"""Training on your own data without a conversion script: `[data.columns]` maps your column names, Alpaca rows
(instruction / input / output) are detected by `auto`, a row-level system prompt is used, and a folder laid out
like a Hugging Face dataset repo (what `hf://datasets/<org>/<name>` lists) is read as its train split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.config import ConfigError, parse_config
from posttrain.config.sections import DataSection
from posttrain.datasets.columns import rename_columns
from posttrain.datasets.dataloader import build_sft_dataloader
from posttrain.datasets.errors import BadRowError, DataError
from posttrain.datasets.preference import load_preference_pairs
from posttrain.datasets.sft_format import detect_format, tokenize_row
from posttrain.datasets.sources import iter_file_rows, resolve_data_files
from posttrain.datasets.tokenizer import HFTokenizer

TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return HFTokenizer(TOKENIZER)


def user_assistant(user: str, answer: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def test_alpaca_rows_are_detected_and_rendered_as_one_chat_turn(tok) -> None:
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert detect_format(row, "a.jsonl:1") == "alpaca"
    sample = tokenize_row(row, "auto", "a.jsonl:1", tok)
    ids, mask = tok.tokenize_messages(user_assistant("Add the numbers.\n\n2 and 3", "5"))
    assert sample.input_ids.tolist() == ids and sample.loss_mask.tolist() == mask
    no_input = tokenize_row({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", "a.jsonl:2", tok)
    assert no_input.input_ids.tolist() == tok.tokenize_messages(user_assistant("Say hi.", "hi"))[0]
    with pytest.raises(BadRowError, match=r"a.jsonl:3: the row has no 'output' field"):
        tokenize_row({"instruction": "x"}, "alpaca", "a.jsonl:3", tok)


def test_a_system_column_becomes_the_first_message(tok) -> None:
    expected = tok.tokenize_messages(user_assistant("2 + 3?", "5", system="Be brief."))[0]
    rows = [
        {"messages": user_assistant("2 + 3?", "5"), "system": "Be brief."},
        {"prompt": "2 + 3?", "completion": "5", "system": "Be brief."},  # plain strings: rendered as chat
        {"instruction": "2 + 3?", "output": "5", "system": "Be brief."},
    ]
    for i, row in enumerate(rows):
        assert tokenize_row(row, "auto", f"s.jsonl:{i}", tok).input_ids.tolist() == expected, row


def test_columns_map_your_names_to_the_fields(tok, tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"{a} + {a}?", "answer": str(2 * a), "sys": "Math."} for a in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSection(path=str(path), num_workers=0, shuffle_buffer=0, packing="padding",
                       columns={"prompt": "question", "completion": "answer", "system": "sys"})
    loader = build_sft_dataloader(data, tok, seq_len=64, micro_batch_size=1, dp_rank=0, dp_world_size=1, seed=0,
                                  num_epochs=1)
    batches = list(loader)
    assert len(batches) == 4
    expected = tok.tokenize_messages(user_assistant("0 + 0?", "0", system="Math."))[0]
    assert batches[0]["input_ids"][0, : len(expected)].tolist() == expected

    with pytest.raises(BadRowError, match=r"x.jsonl:1: data.columns.prompt = 'question', but the row has no "
                                          r"'question' column \(it has \['q'\]\)"):
        rename_columns({"q": "?"}, {"prompt": "question"}, "x.jsonl:1")
    assert rename_columns({"a": 1, "b": 2}, {"text": "a"}, "x") == {"b": 2, "text": 1}


def test_columns_for_preference_rows(tok, tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"q": "2 + 3?", "good": "5", "bad": "6"}) + "\n")
    pairs, _ = load_preference_pairs(str(path), tok, seq_len=128,
                                     columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert pairs[0].chosen_ids.tolist() == tok.tokenize_prompt_completion("2 + 3?", "5")[0]


def test_columns_in_the_config(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[data]\npath = "x.jsonl"\n[data.columns]\nprompt = "question"\ncompletion = "answer"\n')
    assert parse_config(["--config", str(config)]).data.columns == {"prompt": "question", "completion": "answer"}
    config.write_text('[data.columns]\nquestion = "prompt"\n')
    with pytest.raises(ConfigError, match=r"c.toml: data.columns.question is not a field the formats read"):
        parse_config(["--config", str(config)])


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_a_folder_laid_out_like_a_hub_dataset_repo_reads_its_train_split(tmp_path: Path, caplog) -> None:
    repo = tmp_path / "repo"  # what hf://datasets/<org>/<name> lists
    rows = [{"instruction": f"Double {i}.", "output": str(2 * i)} for i in range(6)]
    write_parquet(repo / "data" / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(repo / "data" / "train-00001-of-00002.parquet", rows[3:])
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", [{"instruction": "held out", "output": "x"}])
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    (repo / ".cache" / "x.jsonl").parent.mkdir()
    (repo / ".cache" / "x.jsonl").write_text("{}\n")
    with caplog.at_level(logging.INFO, logger="posttrain.datasets.sources"):
        files = resolve_data_files(str(repo))
    assert [Path(f.path).name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert "1 file(s) of the split(s) ['test'] left out" in caplog.text
    assert [r.value for f in files for r in iter_file_rows(f)] == rows

    only_splits = tmp_path / "splits"
    for name in ("train.jsonl", "test.jsonl"):
        (only_splits / name).parent.mkdir(exist_ok=True)
        (only_splits / name).write_text(json.dumps(rows[0]) + "\n")
    assert [Path(f.path).name for f in resolve_data_files(str(only_splits))] == ["train.jsonl"]
    (only_splits / "train.jsonl").unlink()
    with pytest.raises(DataError, match=r"holds only the split\(s\) \['test'\], no train split"):
        resolve_data_files(str(only_splits))


def test_hf_dataset_urls_go_through_huggingface_hubs_filesystem() -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs("hf://datasets/org/name")  # no network until something is listed
    assert type(fs).__name__ == "HfFileSystem" and root == "datasets/org/name"
    assert fs.unstrip_protocol(f"{root}/data/train.parquet") == "hf://datasets/org/name/data/train.parquet"
