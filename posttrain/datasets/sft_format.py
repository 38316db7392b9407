"""SFT row formats: a row (dict) -> token ids and a loss mask, through the tokenizer.

Formats (`data.format`; `auto` decides per row by the fields present, in this order):
- chat: `messages`: [{role, content, ...}] with roles system / user / assistant / tool (developer kept as is).
  Extra keys of a message (e.g. `reasoning_content`, `tool_calls`) pass through to the chat template; a
  row-level `tools` list is handed to the template when the tokenizer takes `tools=`.
- sharegpt: `conversations`: [{from, value}], with `from` mapped: human/user -> user, gpt/assistant/model/
  chatgpt/bard -> assistant, system -> system, tool/function/observation/function_response/ipython -> tool,
  function_call -> assistant. A row-level `system` string becomes the first message.
- prompt_completion: `prompt` + `completion` strings (loss on the completion); lists of messages in both
  (TRL's conversational form) are rendered as one chat, trained on the completion's assistant turns.
- alpaca: `instruction` (+ optional `input`) + `output`, rendered with the chat template as one user turn
  (the instruction, then a blank line and the input when there is one) and the assistant's answer.
- text: `text` (continued pre-training; every token is trained: `tokenize_text` may return ids alone).
A row-level `system` string becomes the first message of a chat, ShareGPT, prompt/completion or Alpaca row
(a prompt/completion row of plain strings is then rendered with the chat template); `[data.columns]` maps a
dataset's own column names to these fields (columns.py).
- tokens: `input_ids` (+ optional `loss_mask` or `labels`, `document_ids`): already token ids, no tokenizer
  (see token_format.py).
- `module:attr`: the user's `fn(row, where, tokenizer) -> (input_ids, loss_mask)` or a `TokenizedSample`
  (posttrain/extensions.py); `tokenizer` is None in a run without one.
Every problem with a row raises `BadRowError` naming `file:line` and the field, e.g.
`data/a.jsonl:7: messages[2].role is 'bot'; ...`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from posttrain.datasets.errors import BadRowError, DataError
from posttrain.datasets.token_format import token_row_arrays

FORMATS = ("chat", "sharegpt", "prompt_completion", "alpaca", "text", "tokens")
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_response": "tool",
    "ipython": "tool",
    "function_call": "assistant",
}
_FIX = "fix the row or set data.skip_bad_rows = true to skip and count such rows"
logger = logging.getLogger(__name__)
_reported_template_drop = False  # once per process (each data worker reports its first)


class SFTTokenizer(Protocol):
    eos_id: int
    pad_id: int | None

    def tokenize_messages(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]: ...
    def tokenize_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[bool]]: ...
    def tokenize_text(self, text: str) -> list[int] | tuple[list[int], list[bool]]: ...


@dataclass
class TokenizedSample:
    """One document: token ids, the loss mask over them (True = this token is a training target), origin."""

    input_ids: np.ndarray  # int64 [n]
    loss_mask: np.ndarray  # bool [n]
    where: str
    # int64 [n] 0, 0, 1, 1, ...: several documents in one sample (pre-packed token rows); None: one document
    segment_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def detect_format(row: dict[str, Any], where: str) -> str:
    """chat / sharegpt / prompt_completion / text from the fields the row has."""
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    if "input_ids" in row:
        return "tokens"
    hint = ""
    if "chosen" in row or "rejected" in row:
        hint = " (chosen/rejected is a preference row, for the dpo recipe)"
    elif "prompt" in row:
        hint = " (a prompt needs a completion field next to it)"
    elif "instruction" in row:
        hint = " (an instruction needs an output field next to it)"
    raise BadRowError(
        f"{where}: the row has none of the fields messages, conversations, prompt+completion, instruction+output or "
        f"text (nor input_ids) (it has {sorted(row)}){hint}; {_FIX}, map your columns with [data.columns], or set "
        "data.format"
    )


def _require(row: dict[str, Any], field: str, fmt: str, where: str) -> Any:
    if field not in row or row[field] is None:
        raise BadRowError(
            f"{where}: the row has no '{field}' field, which data.format = {fmt} needs (it has {sorted(row)}); "
            f"{_FIX}, or set data.format"
        )
    return row[field]


def _check_content(value: Any, field: str, where: str, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (str, list)):
        raise BadRowError(f"{where}: {field} must be a string (or a list of content parts), got "
                          f"{type(value).__name__}; {_FIX}")


def chat_messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The validated `messages` of a chat row."""
    messages = _require(row, "messages", "chat", where)
    if not isinstance(messages, list) or not messages:
        raise BadRowError(f"{where}: messages must be a non-empty list of {{role, content}} objects; {_FIX}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRowError(f"{where}: messages[{i}] must be an object with role and content; {_FIX}")
        if "role" not in message and "from" in message:  # a sharegpt turn inside `messages`
            message = _sharegpt_turn(message, i, "messages", where)
        role = message.get("role")
        if role is None:
            raise BadRowError(f"{where}: messages[{i}] has no 'role' field; {_FIX}")
        if role not in CHAT_ROLES:
            raise BadRowError(
                f"{where}: messages[{i}].role is {role!r}, expected one of {', '.join(CHAT_ROLES)}; {_FIX}"
            )
        if "content" not in message and not message.get("tool_calls"):
            raise BadRowError(f"{where}: messages[{i}] ({role}) has no 'content' field; {_FIX}")
        _check_content(message.get("content"), f"messages[{i}].content", where,
                       allow_none=bool(message.get("tool_calls")))
        out.append(message)
    return out


def _sharegpt_turn(turn: dict[str, Any], i: int, field: str, where: str) -> dict[str, Any]:
    if "from" not in turn:
        if "role" in turn:  # already role/content
            return turn
        raise BadRowError(f"{where}: {field}[{i}] has no 'from' field; {_FIX}")
    speaker = turn["from"]
    role = SHAREGPT_ROLES.get(str(speaker).lower())
    if role is None:
        raise BadRowError(
            f"{where}: {field}[{i}].from is {speaker!r}, expected one of {', '.join(sorted(SHAREGPT_ROLES))}; "
            f"{_FIX}"
        )
    if "value" not in turn:
        raise BadRowError(f"{where}: {field}[{i}] ({speaker}) has no 'value' field; {_FIX}")
    _check_content(turn["value"], f"{field}[{i}].value", where, allow_none=False)
    message = {k: v for k, v in turn.items() if k not in ("from", "value")}
    message["role"] = role
    message["content"] = turn["value"]
    return message


def sharegpt_messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """A ShareGPT row's `conversations` as chat messages."""
    turns = _require(row, "conversations", "sharegpt", where)
    if not isinstance(turns, list) or not turns:
        raise BadRowError(f"{where}: conversations must be a non-empty list of {{from, value}} objects; {_FIX}")
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRowError(f"{where}: conversations[{i}] must be an object with from and value; {_FIX}")
        messages.append(_sharegpt_turn(turn, i, "conversations", where))
    return chat_messages({"messages": messages}, where)


def _system_message(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The row's `system` string as a leading message ([] when the row has none)."""
    system = row.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise BadRowError(f"{where}: system must be a string, got {type(system).__name__}; {_FIX}")
    return [{"role": "system", "content": system}]


def _with_system(messages: list[dict[str, Any]], row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        return messages
    return _system_message(row, where) + messages


def alpaca_messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """An Alpaca row (instruction, optional input, output) as user / assistant messages."""
    instruction = _require(row, "instruction", "alpaca", where)
    output = _require(row, "output", "alpaca", where)
    extra = row.get("input") or ""
    for field, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise BadRowError(f"{where}: {field} must be a string, got {type(value).__name__}; {_FIX}")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return _system_message(row, where) + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _takes_tools(tokenizer: SFTTokenizer) -> bool:
    try:
        return "tools" in inspect.signature(tokenizer.tokenize_messages).parameters
    except (TypeError, ValueError):
        return False


def _report_template_drop(messages: list[dict[str, Any]], ids: list[int], tokenizer: Any, where: str) -> None:
    """Log the first message whose text the chat template left out (e.g. Qwen3 renders no `developer` turn)."""
    global _reported_template_drop
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return
    rendered = decode(ids)
    for i, message in enumerate(messages):
        content = message.get("content")
        if message["role"] != "assistant" and isinstance(content, str) and content.strip():
            if content.strip() not in rendered:
                _reported_template_drop = True
                logger.warning("%s: messages[%d] (role %r) is not in what the chat template rendered: the template "
                               "dropped it, so the model never sees it (logged once; map the role to one the "
                               "template renders)", where, i, message["role"])
                return


def _tokenize(row: dict[str, Any], fmt: str, where: str, tokenizer: SFTTokenizer) -> tuple[list[int], list[bool]]:
    if fmt == "chat" or fmt == "sharegpt":
        messages = chat_messages(row, where) if fmt == "chat" else sharegpt_messages(row, where)
        messages = _with_system(messages, row, where)
        tools = row.get("tools")
        if tools and _takes_tools(tokenizer):
            ids, mask = tokenizer.tokenize_messages(messages, tools=tools)  # type: ignore[call-arg]
        else:
            ids, mask = tokenizer.tokenize_messages(messages)
        if not _reported_template_drop:
            _report_template_drop(messages, ids, tokenizer, where)
        return ids, mask
    if fmt == "alpaca":
        messages = chat_messages({"messages": alpaca_messages(row, where)}, where)
        ids, mask = tokenizer.tokenize_messages(messages)
        if not _reported_template_drop:
            _report_template_drop(messages, ids, tokenizer, where)
        return ids, mask
    if fmt == "prompt_completion":
        prompt = _require(row, "prompt", fmt, where)
        completion = _require(row, "completion", fmt, where)
        system = _system_message(row, where)
        if system and isinstance(prompt, str) and isinstance(completion, str):  # a system turn needs the chat form
            prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": completion}]
        if isinstance(prompt, list):
            prompt = _with_system(prompt, row, where)
        if isinstance(prompt, list) and isinstance(completion, list):
            chat_messages({"messages": prompt + completion}, where)  # validate roles and contents
            return tokenizer.tokenize_prompt_completion(prompt, completion)  # type: ignore[arg-type]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadRowError(
                f"{where}: prompt and completion must both be strings (or both lists of messages), got "
                f"{type(prompt).__name__} and {type(completion).__name__}; {_FIX}"
            )
        return tokenizer.tokenize_prompt_completion(prompt, completion)
    if fmt == "text":
        text = _require(row, "text", fmt, where)
        if not isinstance(text, str):
            raise BadRowError(f"{where}: text must be a string, got {type(text).__name__}; {_FIX}")
        encoded = tokenizer.tokenize_text(text)
        if isinstance(encoded, tuple):
            return encoded
        return list(encoded), [True] * len(encoded)  # a plain id list: every token is trained
    raise DataError(f"data.format = {fmt!r} is not one of auto, {', '.join(FORMATS)}")


_USER_FORMATS: dict[str, Any] = {}


def load_user_format(fmt: str) -> Any:
    """The user's row format `module:attr`, imported once per process (each dataloader worker imports it)."""
    if fmt not in _USER_FORMATS:
        from posttrain.extensions import load_callable

        try:
            _USER_FORMATS[fmt] = load_callable(fmt, key="data.format")
        except ValueError as e:
            raise DataError(str(e)) from e
    return _USER_FORMATS[fmt]


def tokenize_row(
    row: dict[str, Any], fmt: str, where: str, tokenizer: SFTTokenizer | None, *, vocab_size: int | None = None
) -> TokenizedSample:
    """Validate one row in format `fmt` ("auto" detects it, "module:attr" is the user's) and tokenize it.

    `tokenizer` may be None for token rows; `vocab_size` (when known) bounds their ids."""
    if fmt == "auto":
        fmt = detect_format(row, where)
    if fmt == "tokens":
        ids, mask, segments = token_row_arrays(row, where, vocab_size=vocab_size)
        return TokenizedSample(ids, mask, where, segments)
    if ":" in fmt:
        try:
            out = load_user_format(fmt)(row, where, tokenizer)
        except DataError:
            raise
        except Exception as e:  # the user's format refused the row: a bad row like any other
            raise BadRowError(f"{where}: data.format = {fmt} refused the row ({type(e).__name__}: {e}); {_FIX}") from e
        if isinstance(out, TokenizedSample):
            return out
        ids, mask = out
        if len(ids) != len(mask):
            raise DataError(f"data.format = {fmt}: returned {len(ids)} ids but {len(mask)} mask values for {where}")
        return TokenizedSample(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), where)
    if tokenizer is None:
        raise DataError(
            f"{where}: a {fmt} row needs a tokenizer and this run has none; set tokenizer.path, or give "
            f"pre-tokenized rows (input_ids) with data.format = tokens"
        )
    try:
        ids, mask = _tokenize(row, fmt, where, tokenizer)
    except DataError:
        raise
    except Exception as e:  # the chat template or tokenizer refused the row
        raise BadRowError(f"{where}: the tokenizer could not render this row ({type(e).__name__}: {e}); {_FIX}") from e
    if len(ids) != len(mask):
        raise DataError(f"the tokenizer returned {len(ids)} ids but {len(mask)} mask values for {where}")
    return TokenizedSample(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), where)
