"""Generate the small, reproducible test assets under ``tests/assets/``.

    python scripts/make_test_assets.py [--out tests/assets] [--seed 1234]

Writes:
  tokenizer/                 byte-level BPE (``tokenizers``), ChatML special tokens, a Qwen3-like chat template
                             (system / user / assistant with ``reasoning_content`` as ``<think>..</think>`` / tools
                             / tool responses; earlier turns' reasoning dropped, as Qwen3 does). len <= 2048.
  chat.jsonl                 {"messages": [...], optional "tools": [...]}: arithmetic, facts, multi-turn, system
                             prompts that change the answer's form, tool calls, reasoning.
  chat_eval.jsonl            held out: same generators, disjoint rows.
  sharegpt.jsonl             {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}
  prompt_completion.jsonl    {"prompt": "Q: ...\\nA:", "completion": " ..."}
  text.jsonl                 {"text": "..."}: plain sentences from the same facts.

The answers follow fixed patterns ("What is 12 + 7?" -> "12 + 7 = 19."), so a tiny model's loss falls
clearly within ~100 steps. Everything comes from one seeded ``random.Random``; running the script twice
gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

MAX_VOCAB = 2048  # the debug model's vocab_size; len(tokenizer) must not exceed it
BPE_VOCAB = 1536  # byte alphabet (256) + merges; special/added tokens come on top

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Like Qwen3: structural markers the model generates itself are added tokens but not "special", so
# decode(skip_special_tokens=True) keeps them.
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Qwen3's template, plus list-of-parts content ({"type": "text", "text": ...}) joined into a string.
CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}{{- part -}}{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- set text = render_content(message.content) %}
    {%- if ns.multi_step_tool and message.role == "user" and not(text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# ---------------------------------------------------------------------------------------------------------
# Facts

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
    "open": "closed", "early": "late", "full": "empty", "old": "new", "hard": "soft", "left": "right",
    "loud": "quiet", "wet": "dry", "strong": "weak", "rich": "poor",
}
ANIMAL_SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "lion": "roar",
    "owl": "hoot", "pig": "oink", "horse": "neigh", "frog": "croak", "bee": "buzz", "mouse": "squeak",
}
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown", "a lemon": "yellow",
}
WORDS = [
    "apple", "river", "cat", "garden", "yellow", "planet", "music", "window", "bread", "orange", "tiger",
    "pencil", "cloud", "mountain", "sugar", "rocket", "book", "silver", "winter", "dragon",
]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Keep answers short.",
    "You are a friendly tutor who answers clearly.",
]
UPPERCASE_SYSTEM = "Always answer in uppercase letters."
NUMBER_ONLY_SYSTEM = "Reply with the number only."

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example 12 * 7"}},
            "required": ["expression"],
        },
    },
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

OPS = {"+": (lambda a, b: a + b, "plus"), "-": (lambda a, b: a - b, "minus"), "*": (lambda a, b: a * b, "times")}


# ---------------------------------------------------------------------------------------------------------
# Question / answer pairs: (question, answer, reasoning, number-only answer or None)

QA = tuple[str, str, str, "str | None"]


def arithmetic_qa(rng: random.Random) -> QA:
    op = rng.choice(list(OPS))
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == "-" and b > a:
        a, b = b, a
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
    fn, word = OPS[op]
    c = fn(a, b)
    question = rng.choice(
        [f"What is {a} {op} {b}?", f"What is {a} {word} {b}?", f"Compute {a} {op} {b}.", f"Calculate {a} {op} {b}."]
    )
    answer = f"{a} {op} {b} = {c}."
    reasoning = f"The user wants {a} {word} {b}. {a} {op} {b} = {c}."
    return question, answer, reasoning, str(c)


def capital_qa(rng: random.Random) -> QA:
    country, city = rng.choice(list(CAPITALS.items()))
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
    return question, f"The capital of {country} is {city}.", f"{city} is the capital city of {country}.", None


def opposite_qa(rng: random.Random) -> QA:
    word, opposite = rng.choice(list(OPPOSITES.items()))
    question = rng.choice([f"What is the opposite of {word}?", f"Give the opposite of the word '{word}'."])
    return question, f"The opposite of {word} is {opposite}.", f"The antonym of {word} is {opposite}.", None


def animal_qa(rng: random.Random) -> QA:
    animal, sound = rng.choice(list(ANIMAL_SOUNDS.items()))
    question = rng.choice([f"What sound does a {animal} make?", f"What does a {animal} say?"])
    return question, f"A {animal} says {sound}.", f"A {animal} makes the sound {sound}.", None


def color_qa(rng: random.Random) -> QA:
    thing, color = rng.choice(list(COLORS.items()))
    return f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}.", f"{thing} is usually {color}.", None


def letters_qa(rng: random.Random) -> QA:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        question = f"How many letters are in the word '{word}'?"
        return question, f"The word '{word}' has {len(word)} letters.", f"I count the letters of {word}: {len(word)}.", str(len(word))
    question = f"Spell '{word}' backwards."
    return question, f"'{word}' backwards is '{word[::-1]}'.", f"Reversing {word} letter by letter gives {word[::-1]}.", None


QA_GENERATORS: list[tuple[Callable[[random.Random], QA], float]] = [
    (arithmetic_qa, 0.4), (capital_qa, 0.15), (opposite_qa, 0.1), (animal_qa, 0.1), (color_qa, 0.1), (letters_qa, 0.15),
]


def sample_qa(rng: random.Random) -> QA:
    generators, weights = zip(*QA_GENERATORS)
    return rng.choices(generators, weights=weights)[0](rng)


# ---------------------------------------------------------------------------------------------------------
# Conversations


def single_turn(rng: random.Random) -> dict:
    question, answer, reasoning, number = sample_qa(rng)
    messages: list[dict] = []
    roll = rng.random()
    if roll < 0.15:
        messages.append({"role": "system", "content": UPPERCASE_SYSTEM})
        answer = answer.upper()
    elif roll < 0.25 and number is not None:
        messages.append({"role": "system", "content": NUMBER_ONLY_SYSTEM})
        answer = number
    elif roll < 0.55:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    user_content: str | list = question
    if rng.random() < 0.1:  # OpenAI-style content parts
        user_content = [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": user_content})
    assistant = {"role": "assistant", "content": answer}
    if rng.random() < 0.25:
        assistant["reasoning_content"] = reasoning
    messages.append(assistant)
    return {"messages": messages}


def multi_turn(rng: random.Random) -> dict:
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.5:  # an arithmetic chain: later turns refer to the previous result
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        value = a + b
        messages += [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {value}.", "reasoning_content": f"Add {a} and {b}."},
        ]
        for _ in range(rng.randint(1, 2)):
            k = rng.randint(2, 5)
            if rng.random() < 0.5:
                messages.append({"role": "user", "content": f"Now multiply that by {k}."})
                messages.append({"role": "assistant", "content": f"{value} * {k} = {value * k}."})
                value *= k
            else:
                messages.append({"role": "user", "content": f"Now add {k} to that."})
                messages.append({"role": "assistant", "content": f"{value} + {k} = {value + k}."})
                value += k
        if rng.random() < 0.5:
            messages[-1]["reasoning_content"] = "I apply the operation to the previous result."
    else:
        for _ in range(rng.randint(2, 3)):
            question, answer, reasoning, _ = sample_qa(rng)
            messages.append({"role": "user", "content": question})
            assistant = {"role": "assistant", "content": answer}
            if rng.random() < 0.3:
                assistant["reasoning_content"] = reasoning
            messages.append(assistant)
    return {"messages": messages}


def tool_call_conversation(rng: random.Random) -> dict:
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "You are a helpful assistant with tools."})
    if rng.random() < 0.6:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        op = rng.choice(["+", "*"])
        result = OPS[op][0](a, b)
        expression = f"{a} {op} {b}"
        messages += [
            {"role": "user", "content": f"Use the calculator to compute {expression}."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}],
            },
            {"role": "tool", "content": str(result)},
            {"role": "assistant", "content": f"{expression} = {result}."},
        ]
        if rng.random() < 0.5:
            messages[-1]["reasoning_content"] = f"The calculator returned {result}."
        tools = [CALCULATOR_TOOL]
    else:
        city = rng.choice(list(CAPITALS.values()))
        temperature, condition = rng.randint(-5, 35), rng.choice(WEATHER)
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}],
            },
            {"role": "tool", "content": json.dumps({"city": city, "temperature_c": temperature, "condition": condition})},
            {"role": "assistant", "content": f"It is {temperature}°C and {condition} in {city}."},
        ]
        tools = [WEATHER_TOOL, CALCULATOR_TOOL]
    return {"messages": messages, "tools": tools}


def conversations(rng: random.Random) -> Iterator[dict]:
    kinds = [single_turn, multi_turn, tool_call_conversation]
    while True:
        yield rng.choices(kinds, weights=[0.6, 0.28, 0.12])[0](rng)


def to_sharegpt(row: dict) -> dict | None:
    """ShareGPT form of a conversation without tools (reasoning dropped: ShareGPT has no field for it)."""
    if "tools" in row:
        return None
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = []
    for message in row["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        turns.append({"from": names[message["role"]], "value": content})
    return {"conversations": turns}


def prompt_completion(rng: random.Random) -> dict:
    question, answer, _, _ = sample_qa(rng)
    return {"prompt": f"Q: {question}\nA:", "completion": f" {answer}"}


def text_passage(rng: random.Random) -> dict:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        _, answer, reasoning, _ = sample_qa(rng)
        sentences.append(answer if rng.random() < 0.7 else reasoning[0].upper() + reasoning[1:])
    return {"text": " ".join(sentences)}


def unique_rows(source: Iterator[dict], n: int, exclude: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        row = next(source)
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key not in exclude:
            exclude.add(key)
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(corpus: list[str]):
    """Byte-level BPE like Qwen2/3: GPT-4-style split with single digits, no prefix space, no normalizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    if tokenizer.get_vocab_size(with_added_tokens=True) > MAX_VOCAB:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, more than {MAX_VOCAB}")
    return tokenizer


def write_tokenizer(tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {}
    for content in SPECIAL_TOKENS + ADDED_TOKENS:
        added[str(tokenizer.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": content in SPECIAL_TOKENS,
        }
    config = {
        # PreTrainedTokenizerFast loads in transformers 4.x and 5.x alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def render_for_training(row: dict) -> str:
    """Approximate ChatML rendering used only as tokenizer training text (the real template adds the rest)."""
    parts = []
    for message in row["messages"]:
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "".join(p["text"] for p in content)
        if message.get("reasoning_content"):
            content = f"<think>\n{message['reasoning_content']}\n</think>\n\n{content}"
        for call in message.get("tool_calls", []):
            content += "\n<tool_call>\n" + json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]}) + "\n</tool_call>"
        parts.append(f"<|im_start|>{message['role']}\n{content}<|im_end|>\n")
    for tool in row.get("tools", []):
        parts.append(json.dumps(tool))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------


def make_assets(out_dir: Path, seed: int = 1234) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    chat = unique_rows(conversations(rng), 400, seen)
    chat_eval = unique_rows(conversations(rng), 60, seen)
    sharegpt = [r for r in (to_sharegpt(row) for row in unique_rows(conversations(rng), 160, seen)) if r][:120]
    pairs = unique_rows(iter(lambda: prompt_completion(rng), None), 200, set())
    texts = unique_rows(iter(lambda: text_passage(rng), None), 300, set())

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "chat.jsonl", chat)
    write_jsonl(out_dir / "chat_eval.jsonl", chat_eval)
    write_jsonl(out_dir / "sharegpt.jsonl", sharegpt)
    write_jsonl(out_dir / "prompt_completion.jsonl", pairs)
    write_jsonl(out_dir / "text.jsonl", texts)

    corpus = [render_for_training(row) for row in chat + sharegpt_as_chat(sharegpt)]
    corpus += [p["prompt"] + p["completion"] for p in pairs] + [t["text"] for t in texts]
    corpus += [CHAT_TEMPLATE]
    write_tokenizer(train_tokenizer(corpus), out_dir / "tokenizer")


def sharegpt_as_chat(rows: list[dict]) -> list[dict]:
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return [{"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate tests/assets (tokenizer + small datasets).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "assets")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    make_assets(args.out, args.seed)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
