"""HFTokenizer: a Hugging Face tokenizer plus chat rendering with a loss mask derived from the full rendering.

The tokenizer's own chat template is the single source of truth: the ids we train on are exactly the ids
``tokenizer.apply_chat_template(messages)`` produces, so training and serving never skew. The loss mask is
found in the *full* rendering of the conversation, never from per-prefix diffs: templates such as Qwen3's
rewrite history (earlier turns lose their ``<think>`` block once a later user turn exists), so a prefix render
is not a prefix of the full render.

How assistant spans are found (works for any template, with or without ``{% generation %}`` tags):

1. Rendering three tiny probe conversations tells us, for this template, the assistant *header* (what
   ``add_generation_prompt`` appends, e.g. ``<|im_start|>assistant\\n``; and the header of a turn in history)
   and the *end-of-turn* strings (the first added token rendered after an assistant message, e.g.
   ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``).
2. In the full text, for each assistant message in order: the next header after the previous span starts
   the turn; the message content must follow it (before any other header), and the turn ends with the first
   end-of-turn string after the content. The span runs from the end of the header through the end-of-turn
   string, so it holds the rendered ``<think>`` block (when the template renders one), the content, any tool
   calls, and the end-of-turn token: everything the model generates for that turn.
3. Char spans become token positions through the fast tokenizer's offset mapping (a token is in the mask when
   it overlaps a span).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi, GPT-2 style)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

logger = logging.getLogger(__name__)

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")
# Tried in order when the tokenizer has no pad token (a pad id is never trained on: labels mask it out).
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>")

_PROBE_USER_1 = "PROBEUSERQ7K"
_PROBE_ASSISTANT_1 = "PROBEASSISTANTQ7K"
_PROBE_USER_2 = "PROBEUSERZ3W"


class HFTokenizer:
    """A ``transformers.AutoTokenizer`` with chat rendering + loss masks, pad-token setup and token additions.

    Args:
        path: a local tokenizer folder (or anything ``AutoTokenizer.from_pretrained`` accepts).
        add_special_tokens: extra special tokens (e.g. semantic-ID tokens) to add after loading.
        pad_token: the pad token to use; added to the vocabulary (with a warning) when missing.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        add_special_tokens: Sequence[str] = (),
        pad_token: str | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        self.hf = AutoTokenizer.from_pretrained(self.path)
        self._probes: dict[str, _TemplateProbe] = {}
        if add_special_tokens:
            self.add_special_tokens(list(add_special_tokens))
        self._ensure_pad_token(pad_token)
        self.adds_bos = self._detect_adds_bos()

    # ----------------------------------------------------------------------------------------------------
    # Vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must cover: base vocabulary plus added tokens."""
        return len(self.hf)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def eos_id(self) -> int | None:
        return None if self.hf.eos_token_id is None else int(self.hf.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        return None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` when it is a single vocabulary entry, else None."""
        return self.hf.get_vocab().get(token)

    def stop_ids(self, generation_config_dir: str | Path | None = None) -> tuple[int, ...]:
        """Where generation stops, most specific first: the chat template's end-of-turn token(s), the eos token,
        whichever other common end-of-turn tokens the vocabulary has, and the eos ids of
        ``generation_config_dir/generation_config.json`` when there is one."""
        ids = [self.token_id(token) for token in self.end_of_turn_tokens()]
        ids.append(self.eos_id)
        ids += [self.token_id(token) for token in END_OF_TURN_TOKENS]
        config = Path(generation_config_dir) / "generation_config.json" if generation_config_dir else None
        if config is not None and config.is_file():
            eos = json.loads(config.read_text()).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else (eos or [])
        return tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    def end_of_turn_tokens(self) -> list[str]:
        """The token(s) the chat template writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ...);
        empty without a chat template."""
        if not getattr(self.hf, "chat_template", None):
            return []
        try:
            return list(self._probe({}, None).end_of_turn)
        except ValueError:  # a template the probe cannot read: the fixed list in stop_ids still applies
            return []

    def add_special_tokens(self, tokens: Iterable[str]) -> int:
        """Add tokens that must never be split (special tokens, semantic-ID tokens); returns how many were new.

        Adding tokens grows ``vocab_size``: the model's embedding and output layers must be resized to match.
        """
        from tokenizers import AddedToken

        vocab = self.hf.get_vocab()
        new: list[str] = []
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"special tokens must be non-empty strings, got {token!r}")
            if token not in vocab and token not in new:
                new.append(token)
        if not new:
            return 0
        before = len(self.hf)
        added = self.hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
        logger.warning(
            "added %d special token(s) to the tokenizer at %s (vocab %d -> %d); the model's embedding and "
            "output layers must be resized to %d",
            added, self.path, before, len(self.hf), len(self.hf),
        )
        return int(added)

    def _ensure_pad_token(self, pad_token: str | None) -> None:
        hf = self.hf
        if pad_token is not None:
            if pad_token not in hf.get_vocab():
                before = len(hf)
                hf.add_special_tokens({"pad_token": pad_token})
                logger.warning(
                    "pad token %r is not in the vocabulary of %s: added it (vocab %d -> %d); the model's "
                    "embedding must be resized to %d",
                    pad_token, self.path, before, len(hf), len(hf),
                )
            else:
                hf.pad_token = pad_token
            return
        if hf.pad_token is not None:
            return
        vocab = hf.get_vocab()
        for candidate in PAD_CANDIDATES:
            if candidate in vocab:
                hf.pad_token = candidate
                logger.info("tokenizer at %s has no pad token; using the existing %r", self.path, candidate)
                return
        if hf.eos_token is not None:
            hf.pad_token = hf.eos_token
            logger.info("tokenizer at %s has no pad token; using eos %r", self.path, hf.eos_token)
            return
        before = len(hf)
        hf.add_special_tokens({"pad_token": "<|pad|>"})
        logger.warning(
            "tokenizer at %s has no pad, eos or known padding token: added '<|pad|>' (vocab %d -> %d); the "
            "model's embedding must be resized to %d",
            self.path, before, len(hf), len(hf),
        )

    def _detect_adds_bos(self) -> bool:
        """Whether the tokenizer's own post-processor prepends BOS to plain text (Llama yes, Qwen no)."""
        if self.bos_id is None:
            return False
        with_special = self.hf("a", add_special_tokens=True)["input_ids"]
        return bool(with_special) and with_special[0] == self.bos_id

    # ----------------------------------------------------------------------------------------------------
    # Plain text

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` without the tokenizer's automatic special tokens; BOS/EOS only on request."""
        ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"tokenizer at {self.path} has no bos token; call encode(..., add_bos=False)")
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self._require_eos())
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def tokenize_text(self, text: str) -> list[int]:
        """A pretraining-style document: BOS when the tokenizer normally adds one, the text, then EOS."""
        return self.encode(text, add_bos=self.adds_bos, add_eos=True)

    def tokenize_prompt_completion(
        self, prompt: str | Sequence[Mapping[str, Any]], completion: str | Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], list[bool]]:
        """Ids and loss mask for a prompt/completion pair; only the completion (and its EOS) is trained.

        Plain strings are tokenized separately (prompt, then completion + EOS). Lists of messages
        (conversational prompt/completion) are rendered together with the chat template, and only the
        assistant turns inside ``completion`` are trained.
        """
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt_ids = self.encode(prompt, add_bos=self.adds_bos)
            completion_ids = self.encode(completion, add_eos=True)
            return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)
        if isinstance(prompt, str) or isinstance(completion, str):
            raise ValueError("prompt and completion must both be strings or both be lists of messages")
        messages = list(prompt) + list(completion)
        ids, spans = self._render_with_spans(messages, tools=None, add_generation_prompt=False, template_kwargs={})
        mask = [False] * len(ids)
        for index, start, end in spans:
            if index >= len(prompt):
                mask[start:end] = [True] * (end - start)
        return ids, mask

    def _require_eos(self) -> int:
        if self.eos_id is None:
            raise ValueError(f"tokenizer at {self.path} has no eos token; set eos_token in its tokenizer_config.json")
        return self.eos_id

    # ----------------------------------------------------------------------------------------------------
    # Chat

    def render_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat template's text for ``messages`` (validated and normalized first)."""
        self._require_chat_template()
        normalized = normalize_messages(messages)
        return self.hf.apply_chat_template(
            normalized,
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **dict(chat_template_kwargs or {}),
        )

    def tokenize_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[list[int], list[bool]]:
        """Render the whole conversation with the tokenizer's chat template; return ``(input_ids, loss_mask)``.

        ``input_ids`` equal ``apply_chat_template(messages, tools=tools, tokenize=True)``. ``loss_mask`` is True
        on what the model generates in each assistant turn (rendered reasoning block, content, tool calls and
        the end-of-turn token) and False on role headers and every other role's tokens.
        """
        ids, spans = self._render_with_spans(
            messages, tools=tools, add_generation_prompt=add_generation_prompt,
            template_kwargs=dict(chat_template_kwargs or {}),
        )
        mask = [False] * len(ids)
        for _, start, end in spans:
            mask[start:end] = [True] * (end - start)
        return ids, mask

    def _require_chat_template(self) -> None:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(
                f"tokenizer at {self.path} has no chat template; use a chat/instruct tokenizer, add a "
                "'chat_template' to its tokenizer_config.json (or chat_template.jinja), or use a text dataset format"
            )

    def _render_with_spans(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
    ) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Ids of the full rendering and, per assistant message, ``(message_index, first_token, end_token)``."""
        self._require_chat_template()
        if not self.hf.is_fast:
            raise ValueError(f"tokenizer at {self.path} is not a fast tokenizer; loss masks need offset mappings")
        normalized = normalize_messages(messages)
        text = self.hf.apply_chat_template(
            normalized,
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )
        # apply_chat_template(tokenize=True) encodes its rendering exactly like this.
        encoding = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        offsets = encoding["offset_mapping"]

        probe = self._probe(template_kwargs, tools)
        char_spans = probe.assistant_char_spans(text, normalized)
        # Offsets are monotone, so each char span maps to a contiguous token range found by bisection; a token
        # is in the span when it overlaps it.
        starts = [start for start, _ in offsets]
        ends = [end for _, end in offsets]
        spans = []
        for index, char_start, char_end in char_spans:
            first = bisect.bisect_right(ends, char_start)
            end = bisect.bisect_left(starts, char_end)
            if end > first:
                spans.append((index, first, end))
        return ids, spans

    def _probe(self, template_kwargs: dict[str, Any], tools: Sequence[Mapping[str, Any]] | None) -> _TemplateProbe:
        # Tools only change the system preamble, but some tokenizers keep a separate "tool_use" template.
        tools = list(tools) if tools else None
        key = json.dumps([template_kwargs, tools], sort_keys=True, default=str)
        if key not in self._probes:
            self._probes[key] = _TemplateProbe.from_tokenizer(self.hf, template_kwargs, tools)
        return self._probes[key]

    def save(self, out_dir: str | Path) -> None:
        """Write the tokenizer files (including any added tokens and the pad token) to ``out_dir``."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out_dir))


# --------------------------------------------------------------------------------------------------------
# Messages


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated shallow copies: content parts joined to a string; assistant tool-call turns get content ''.

    Raises ValueError naming the message index for a non-dict message, an unknown role or a missing content.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty; a conversation needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {', '.join(KNOWN_ROLES)}")
        copy = dict(message)
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                content = ""
            else:
                raise ValueError(f"message {i} ({role}) has no 'content'")
        copy["content"] = _content_text(content, i)
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"message {i}: 'reasoning_content' must be a string, got {type(reasoning).__name__}")
        if reasoning is None:
            copy.pop("reasoning_content", None)
        out.append(copy)
    return out


def _content_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise ValueError(
                    f"message {index}: content part {part!r} is not text; only {{'type': 'text', 'text': ...}} "
                    "parts are supported"
                )
        return "".join(texts)
    raise ValueError(f"message {index}: content must be a string or a list of text parts, got {type(content).__name__}")


# --------------------------------------------------------------------------------------------------------
# Template probing


class _TemplateProbe:
    """What a chat template writes around assistant turns, learned by rendering two tiny conversations."""

    def __init__(self, headers: list[str], end_of_turn: list[str]) -> None:
        self.headers = sorted(set(h for h in headers if h), key=len, reverse=True)  # longest first
        self.anchor = min(self.headers, key=len)  # shortest: where every header variant starts
        self.end_of_turn = [e for e in dict.fromkeys(end_of_turn) if e]

    @classmethod
    def from_tokenizer(cls, hf: Any, template_kwargs: dict[str, Any], tools: list | None = None) -> _TemplateProbe:
        def render(messages: list[dict], generation: bool) -> str:
            return hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation, **template_kwargs
            )

        user_1 = {"role": "user", "content": _PROBE_USER_1}
        assistant_1 = {"role": "assistant", "content": _PROBE_ASSISTANT_1}
        user_2 = {"role": "user", "content": _PROBE_USER_2}
        try:
            prompt = render([user_1], False)
            with_generation = render([user_1], True)
            final = render([user_1, assistant_1], False)
            history = render([user_1, assistant_1, user_2], False)
        except Exception as e:  # templates may raise on anything; say which step failed
            raise ValueError(f"could not probe the chat template with a user/assistant/user conversation: {e}") from e

        # Header variants: the generation prompt (what precedes generated text at inference) and the header of
        # an assistant turn in history. Not the final turn's: Qwen3 renders an empty <think> block there, which
        # the model generates and must be trained on.
        headers = []
        if with_generation.startswith(prompt) and len(with_generation) > len(prompt):
            headers.append(with_generation[len(prompt):])
        if history.startswith(prompt) and _PROBE_ASSISTANT_1 in history:
            headers.append(history[len(prompt): history.index(_PROBE_ASSISTANT_1)])
        headers += [h.rstrip() for h in headers]
        headers = [h for h in headers if h]
        if not headers:
            raise ValueError("could not find the assistant header in the chat template's rendering")

        end_of_turn = []
        for rendering in (final, history):
            after = rendering[rendering.index(_PROBE_ASSISTANT_1) + len(_PROBE_ASSISTANT_1):]
            token = _leading_added_token(hf, after.lstrip())
            if token:
                end_of_turn.append(token)
        if not end_of_turn and hf.eos_token:
            end_of_turn.append(hf.eos_token)
        return cls(headers, end_of_turn)

    def assistant_char_spans(self, text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
        """``(message_index, start, end)`` char spans of each assistant turn's generated text in ``text``."""
        spans = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            anchor = text.find(self.anchor, cursor)
            if anchor < 0:
                raise ValueError(
                    f"message {i} (assistant): no assistant header {self.anchor!r} in the rendered conversation "
                    "after the previous assistant turn; the chat template did not render this message"
                )
            next_anchor = text.find(self.anchor, anchor + len(self.anchor))
            turn_limit = len(text) if next_anchor < 0 else next_anchor
            content_start, content_end = _find_content(text, message["content"], anchor + len(self.anchor), turn_limit)
            if content_start is None:
                raise ValueError(
                    f"message {i} (assistant): its content was not found in the rendered conversation between its "
                    "header and the next assistant header; the chat template changed or dropped it"
                )
            end = content_end
            eot_positions = [(text.find(e, content_end, turn_limit), e) for e in self.end_of_turn]
            eot_positions = [(p, e) for p, e in eot_positions if p >= 0]
            if eot_positions:
                position, eot = min(eot_positions)
                end = position + len(eot)
            # The generated text starts after the longest header variant that fits before the content (or,
            # for an empty content, before the end-of-turn token).
            limit = content_start if message["content"].strip() else end
            start = anchor + len(self.anchor)
            for header in self.headers:
                if text.startswith(header, anchor) and anchor + len(header) <= limit:
                    start = anchor + len(header)
                    break
            spans.append((i, start, end))
            cursor = end
        return spans


def _find_content(text: str, content: str, start: int, limit: int) -> tuple[int | None, int]:
    """Where an assistant message's content is rendered in ``text[start:limit]`` (templates may strip it).

    Empty content (a pure tool-call turn) matches right after the header start.
    """
    candidates = [content.strip()]
    if "</think>" in content:  # templates that split inline reasoning out of the content
        candidates.append(content.split("</think>")[-1].strip())
    for candidate in candidates:
        if not candidate:
            return start, start
        position = text.find(candidate, start, limit)
        if position >= 0:
            return position, position + len(candidate)
    return None, start


def _leading_added_token(hf: Any, text: str) -> str | None:
    """The added/special token ``text`` starts with, if any (e.g. '<|im_end|>' in '<|im_end|>\\n...')."""
    if not text:
        return None
    ids = hf(text, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    added = getattr(hf, "added_tokens_decoder", {}) or {}
    first = ids[0]
    if first in added or first in set(getattr(hf, "all_special_ids", [])):
        token = added[first].content if first in added else hf.convert_ids_to_tokens(first)
        return token if text.startswith(token) else None
    return None
