"""Prompts for RL: a finite, deterministic, resumable stream of prompt samples.

`PromptSource(spec, seed=...)` where `spec` is
- a jsonl file or glob (files in sorted order), one prompt per line:
  `{"messages": [{"role": ..., "content": ...}, ...], "answer": ...}` (ending with a user turn), or
  `{"prompt": "...", "answer": ...}` (`"question"` is read like `"prompt"`). Other keys of the row (e.g. "task",
  "entry") are carried into the sample. A missing or malformed field raises `DataError` naming `file:line`.
- `"reasoning_gym:<task>[,<task>...]"`: items generated offline by reasoning-gym's own datasets (`size` per
  task per epoch, row r of an epoch is task r % n_tasks, item r // n_tasks). Dataset seeds are derived from
  `seed` so that two seeds never share an item's random stream (reasoning-gym item i uses Random(seed + i)):
  train with one seed and evaluate with another. "arithmetic" is short for reasoning-gym's "basic_arithmetic";
  `task_configs` ({task: {option: value}}) passes dataset options such as digit counts.

Each sample is a new dict: {"messages": [...], "answer": str, "task": str, "id": str, ...}; reasoning-gym
samples also carry "entry" (reasoning-gym's item) and "task_config", which the "reasoning_gym" reward uses to
score with the task's own `score_answer`. `system_prompt` is prepended as a system turn (unless the row already
starts with one); `instruction` is appended to the last user turn after a blank line (e.g.
"Put the final answer in \\boxed{}.").

Order: epoch e visits every row once, shuffled by Random(f"{seed}/{e}") (or in file order with
shuffle=False); `next_batch(n)` continues across epochs. `state_dict()` is (epoch, position) plus what checks
that a resumed run reads the same prompts, so a resumed run continues with exactly the next prompts.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import random
from typing import Any

from posttrain.datasets.errors import DataError

REASONING_GYM_PREFIX = "reasoning_gym:"
_SEED_STRIDE = 10**9  # reasoning-gym items per (seed, task) range; ranges never overlap
TASK_ALIASES = {"arithmetic": "basic_arithmetic"}  # short names -> reasoning-gym dataset names


class PromptSource:
    """`next_batch(n) -> list[dict]` of prompt samples, epoch after epoch (see the module docstring)."""

    def __init__(
        self,
        spec: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        system_prompt: str | None = None,
        instruction: str | None = None,
        require_answer: bool = True,
        size: int = 10_000,
        task_configs: dict[str, dict[str, Any]] | None = None,
        field: str = "grpo.prompts",
    ) -> None:
        self.spec = spec.strip()
        self.seed = int(seed)
        self.shuffle = shuffle
        self.system_prompt = system_prompt
        self.instruction = instruction
        self.field = field
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None
        if self.spec.startswith(REASONING_GYM_PREFIX):
            self._rows = _ReasoningGymRows(self.spec[len(REASONING_GYM_PREFIX):], seed=self.seed, size=size,
                                           task_configs=task_configs or {}, field=field)
        else:
            if task_configs:
                raise ValueError(f"{field}: task_configs only apply to a 'reasoning_gym:<tasks>' spec")
            self._rows = _FileRows(self.spec, require_answer=require_answer, field=field)
        if len(self._rows) == 0:
            raise DataError(f"{field} = {self.spec!r} holds no prompts")

    def __len__(self) -> int:
        """Prompts per epoch."""
        return len(self._rows)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            order = list(range(len(self._rows)))
            if self.shuffle:
                random.Random(f"posttrain-prompts/{self.seed}/{self.epoch}").shuffle(order)
            self._order = order
        return self._order

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        """The next `n` prompt samples (crossing into the next epoch, reshuffled, when this one ends)."""
        batch = []
        for _ in range(n):
            if self.position >= len(self._rows):
                self.epoch += 1
                self.position = 0
                self._order = None
            index = self._epoch_order()[self.position]
            self.position += 1
            batch.append(self._sample(index))
        return batch

    def _sample(self, index: int) -> dict[str, Any]:
        sample = self._rows.get(index)
        messages = sample["messages"]
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if self.instruction:
            last = messages[-1]
            last["content"] = f"{last['content']}\n\n{self.instruction}"
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "seed": self.seed, "shuffle": self.shuffle, "num_rows": len(self._rows),
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; fails when the prompts it was saved over are not the same."""
        for key, now in (("spec", self.spec), ("seed", self.seed), ("shuffle", self.shuffle),
                         ("num_rows", len(self._rows))):
            if state.get(key) != now:
                raise ValueError(
                    f"{self.field}: the checkpoint's prompt stream had {key} = {state.get(key)!r} but this run has "
                    f"{now!r}; resuming would not continue with the same prompts (restore the prompt settings "
                    "or start a new output_dir)"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None


# ---------------------------------------------------------------------------------------------------------

def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "user":
        raise DataError(
            f"{where}: a prompt's messages must end with a user turn (the last is {messages[-1]['role']!r}); "
            "remove the answer turn, the policy generates it"
        )
    return messages


def prompt_from_row(row: Any, where: str, *, require_answer: bool = True) -> dict[str, Any]:
    """One prompt sample from one row (see the module docstring); `DataError` naming `where` when malformed."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a prompt row must be a JSON object, got {type(row).__name__}")
    sample = dict(row)
    if "messages" in sample:
        sample["messages"] = _check_messages(sample["messages"], where)
    else:
        key = "prompt" if "prompt" in sample else "question" if "question" in sample else None
        if key is None:
            raise DataError(f"{where}: a prompt row needs 'messages' or 'prompt' (found keys: {sorted(row)})")
        text = sample.pop(key)
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: '{key}' must be a non-empty string")
        sample["messages"] = [{"role": "user", "content": text}]
    answer = sample.get("answer")
    if answer is None:
        if require_answer:
            raise DataError(f"{where}: the row has no 'answer' (the rewards compare against it)")
        sample["answer"] = ""
    elif isinstance(answer, (str, int, float)) and not isinstance(answer, bool):
        sample["answer"] = str(answer)
    else:
        raise DataError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
    sample["id"] = str(sample.get("id", where))
    return sample


class _FileRows:
    """Every row of the jsonl files behind a path or glob, parsed and checked up front (prompt sets are small)."""

    def __init__(self, spec: str, *, require_answer: bool, field: str) -> None:
        if not spec:
            raise DataError(f"{field} is empty; set it to a jsonl file or glob, or 'reasoning_gym:<task>'")
        if any(c in spec for c in "*?["):
            paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not paths:
                raise DataError(f"{field} = {spec!r} matches no files (relative paths start from {os.getcwd()})")
        elif os.path.isfile(spec):
            paths = [spec]
        else:
            raise DataError(f"{field} = {spec!r}: no such file (relative paths start from {os.getcwd()})")
        self.rows: list[dict[str, Any]] = []
        for path in paths:
            task = os.path.splitext(os.path.basename(path))[0]
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{path}:{line_no}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
                    sample = prompt_from_row(row, where, require_answer=require_answer)
                    sample.setdefault("task", task)
                    self.rows.append(sample)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> dict[str, Any]:
        return copy.deepcopy(self.rows[index])


class _ReasoningGymRows:
    """Virtual rows: row r is item r // n_tasks of task r % n_tasks, generated on access."""

    def __init__(self, tasks: str, *, seed: int, size: int, task_configs: dict[str, dict], field: str) -> None:
        self.tasks = [TASK_ALIASES.get(t.strip(), t.strip()) for t in tasks.split(",") if t.strip()]
        task_configs = {TASK_ALIASES.get(name, name): config for name, config in task_configs.items()}
        if not self.tasks:
            raise DataError(f"{field}: name at least one task, e.g. 'reasoning_gym:basic_arithmetic,gsm_symbolic'")
        unknown = set(task_configs) - set(self.tasks)
        if unknown:
            raise ValueError(f"{field}: task_configs name tasks not in the spec: {sorted(unknown)}")
        if size < 1:
            raise ValueError(f"{field}: size (items per task per epoch) must be >= 1, got {size}")
        try:
            import reasoning_gym
        except ImportError as e:
            raise ImportError(
                f"{field} = 'reasoning_gym:...' needs the reasoning-gym package: pip install reasoning-gym"
            ) from e
        self.size = size
        self.datasets: list[Any] = []
        self.configs: list[dict[str, Any]] = []
        for k, task in enumerate(self.tasks):
            config = dict(task_configs.get(task, {}))
            config["seed"] = (seed * 1000 + k + 1) * _SEED_STRIDE
            config["size"] = size
            try:
                self.datasets.append(reasoning_gym.create_dataset(task, **config))
            except Exception as e:  # unknown task or bad config: say which
                raise ValueError(f"{field}: reasoning-gym task {task!r} with config {config} failed: {e}") from e
            self.configs.append(config)

    def __len__(self) -> int:
        return self.size * len(self.tasks)

    def get(self, index: int) -> dict[str, Any]:
        k, item = index % len(self.tasks), index // len(self.tasks)
        entry = self.datasets[k][item]
        return {
            "messages": [{"role": "user", "content": entry["question"]}],
            "answer": str(entry["answer"]),
            "task": self.tasks[k],
            "id": f"reasoning_gym:{self.tasks[k]}:{self.configs[k]['seed']}+{item}",
            "entry": entry,
            "task_config": dict(self.configs[k]),
        }

