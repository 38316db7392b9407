"""Prompt sources: row formats, clear errors, epochs with a per-epoch shuffle, exact resume, reasoning-gym items,
and the arithmetic task generator of the debug GRPO run."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.datasets.errors import DataError
from posttrain.rl.prompts import PromptSource
from posttrain.inference.math_answer import math_answer_reward

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _numbered(tmp_path: Path, n: int = 10, name: str = "p.jsonl") -> Path:
    return _write(tmp_path / name, [{"prompt": f"q{i}", "answer": str(i)} for i in range(n)])


def test_row_formats_system_prompt_and_instruction(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        {"prompt": "1 + 1 = ?", "answer": "2"},
        {"question": "2 + 2 = ?", "answer": 4, "task": "adding", "extra": [1]},
        "",  # blank lines are not rows
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "3 + 3 = ?"}],
         "answer": "6"},
    ])
    source = PromptSource(str(path), shuffle=False, system_prompt="You add.", instruction="Put the final answer in \\boxed{}.")
    assert len(source) == 3
    a, b, c = source.next_batch(3)
    assert a["messages"] == [{"role": "system", "content": "You add."},
                             {"role": "user", "content": "1 + 1 = ?\n\nPut the final answer in \\boxed{}."}]
    assert (a["answer"], a["task"], a["id"]) == ("2", "mixed", f"{path}:1")
    assert (b["answer"], b["task"], b["extra"], b["id"]) == ("4", "adding", [1], f"{path}:2")
    assert "question" not in b and "prompt" not in a
    assert c["messages"][0] == {"role": "system", "content": "Be terse."}  # the row's own system turn wins
    assert c["messages"][1]["content"].endswith("\\boxed{}.") and len(c["messages"]) == 2
    # samples are fresh copies: editing one does not change later epochs
    a["messages"][0]["content"] = "changed"
    assert source.next_batch(1)[0]["messages"][0]["content"] == "You add."


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "bad.jsonl:2: not valid JSON"),
        ('["a list"]', "bad.jsonl:2: a prompt row must be a JSON object"),
        ('{"answer": "1"}', "bad.jsonl:2: a prompt row needs 'messages' or 'prompt'"),
        ('{"prompt": "q"}', "bad.jsonl:2: the row has no 'answer'"),
        ('{"prompt": "", "answer": "1"}', "bad.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"prompt": "q", "answer": {"a": 1}}', "bad.jsonl:2: 'answer' must be a string or a number"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"}',
         "bad.jsonl:2: a prompt's messages must end with a user turn"),
        ('{"messages": [{"role": "user"}], "answer": "1"}', "bad.jsonl:2: messages\\[0\\] must be an object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1"}, line])
    with pytest.raises(DataError, match=message):
        PromptSource(str(path))


def test_missing_files_and_optional_answers(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        PromptSource(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="matches no files"):
        PromptSource(str(tmp_path / "*.jsonl"))
    path = _write(tmp_path / "open.jsonl", [{"prompt": "write a poem"}])
    assert PromptSource(str(path), require_answer=False).next_batch(1)[0]["answer"] == ""


def test_glob_reads_files_in_sorted_order(tmp_path):
    _write(tmp_path / "b.jsonl", [{"prompt": "b", "answer": "1"}])
    _write(tmp_path / "a.jsonl", [{"prompt": "a", "answer": "1"}])
    source = PromptSource(str(tmp_path / "*.jsonl"), shuffle=False)
    assert [s["task"] for s in source.next_batch(3)] == ["a", "b", "a"]


def test_epochs_cover_every_row_once_each_with_its_own_order(tmp_path):
    path = _numbered(tmp_path, 10)
    source = PromptSource(str(path), seed=1)
    epochs = [[s["answer"] for s in source.next_batch(10)] for _ in range(3)]
    for order in epochs:
        assert Counter(order) == Counter(str(i) for i in range(10))
    assert len({tuple(o) for o in epochs}) == 3 and epochs[0] != [str(i) for i in range(10)]
    assert source.epoch == 2
    again = PromptSource(str(path), seed=1)
    assert [s["answer"] for s in again.next_batch(30)] == [a for order in epochs for a in order]
    other = PromptSource(str(path), seed=2)
    assert [s["answer"] for s in other.next_batch(10)] != epochs[0]
    plain = PromptSource(str(path), shuffle=False)
    assert [s["answer"] for s in plain.next_batch(12)] == [str(i) for i in range(10)] + ["0", "1"]


def test_resume_continues_with_exactly_the_next_prompts(tmp_path):
    path = _numbered(tmp_path, 7)
    reference = PromptSource(str(path), seed=5)
    stream = [s["id"] for s in reference.next_batch(40)]

    first = PromptSource(str(path), seed=5)
    got = [s["id"] for s in first.next_batch(4)] + [s["id"] for s in first.next_batch(6)]  # crosses an epoch
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints hold plain JSON-able values
    resumed = PromptSource(str(path), seed=5)
    resumed.load_state_dict(state)
    got += [s["id"] for s in resumed.next_batch(30)]
    assert got == stream


def test_resume_refuses_a_different_prompt_stream(tmp_path):
    path = _numbered(tmp_path, 7)
    state = PromptSource(str(path), seed=5).state_dict()
    with pytest.raises(ValueError, match="seed = 5 but this run has 6"):
        PromptSource(str(path), seed=6).load_state_dict(state)
    longer = _numbered(tmp_path, 8, name="p8.jsonl")
    state["spec"] = str(longer)
    with pytest.raises(ValueError, match="num_rows = 7 but this run has 8"):
        PromptSource(str(longer), seed=5).load_state_dict(state)


def test_reasoning_gym_prompts_are_deterministic_by_seed_and_resume():
    pytest.importorskip("reasoning_gym")
    spec = "reasoning_gym:basic_arithmetic,gsm_symbolic"
    a = PromptSource(spec, seed=0, size=50, instruction="Put the final answer in \\boxed{}.")
    batch = a.next_batch(8)
    epoch = batch + a.next_batch(92)
    assert Counter(s["task"] for s in epoch) == {"basic_arithmetic": 50, "gsm_symbolic": 50}
    assert len({s["id"] for s in epoch}) == 100
    for s in batch:
        assert s["messages"][-1]["content"] == s["entry"]["question"] + "\n\nPut the final answer in \\boxed{}."
        assert s["answer"] == str(s["entry"]["answer"]) and s["task_config"]["size"] == 50
    same = PromptSource(spec, seed=0, size=50, instruction="Put the final answer in \\boxed{}.")
    assert same.next_batch(8) == batch
    # another seed (e.g. the eval set) draws from a disjoint range of reasoning-gym's item seeds
    held_out = PromptSource(spec, seed=1, size=50)
    assert not {s["id"] for s in held_out.next_batch(100)} & {s["id"] for s in PromptSource(spec, seed=0, size=50).next_batch(100)}
    state = a.state_dict()
    resumed = PromptSource(spec, seed=0, size=50, instruction="Put the final answer in \\boxed{}.")
    resumed.load_state_dict(state)
    assert resumed.next_batch(5) == a.next_batch(5)
    # per-task configs reach the generator
    small = PromptSource("reasoning_gym:arithmetic", seed=0, size=5,
                         task_configs={"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "max_digits": 1}})
    for s in small.next_batch(5):
        assert s["entry"]["metadata"]["num_terms"] == 2 and s["task"] == "basic_arithmetic"
    with pytest.raises(ValueError, match="no_such_task"):
        PromptSource("reasoning_gym:no_such_task", seed=0)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_rl_prompts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_arith_prompts_writes_deterministic_disjoint_splits(tmp_path):
    make = _load_script("make_arith_prompts")
    make.main(["--out-dir", str(tmp_path / "a"), "--seed", "3", "--eval-size", "30", "--sft-wrong-fraction", "0.25"])
    make.main(["--out-dir", str(tmp_path / "b"), "--seed", "3", "--eval-size", "30", "--sft-wrong-fraction", "0.25"])
    for name in ("train.jsonl", "eval.jsonl", "sft.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(x) for x in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (tmp_path / "a" / "sft.jsonl").read_text().splitlines()]
    assert (len(train), len(held_out), len(sft)) == (170, 30, 170)  # 10 x 10 sums and differences
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for row in train + held_out:
        a, op, b, _, _ = row["prompt"].split()
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    wrong = sum(s["messages"][1]["content"] != t["answer"] for s, t in zip(sft, train))
    assert 20 < wrong < 65 and all(s["messages"][0]["content"] == t["prompt"] for s, t in zip(sft, train))
    source = PromptSource(str(tmp_path / "a" / "eval.jsonl"), seed=0)
    sample = source.next_batch(1)[0]
    assert math_answer_reward(sample["answer"], sample) == 1.0
