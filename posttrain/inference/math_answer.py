"""The math-answer rule: find the final answer in generated text and compare it with a gold answer.

Used by generation evaluation (``posttrain.evaluation.generation``) and by the RL rewards
(``posttrain.rl.rewards``, the "math_answer" reward); it lives in the inference layer, below both, so that
neither has to import the other.

The final answer is the content of the last ``\\boxed{...}`` (nested braces allowed), else the last number in
the text. Numbers compare exactly as fractions: "1,234" == "1234", "12.0" == "12", "3/4" == "0.75" ==
"\\frac{3}{4}"; anything else compares as a normalised string.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

_NUMBER = r"[+-]?\d(?:\d|,\d{3}(?!\d))*(?:\.\d+)?(?:/\d+(?!\.\d))?"
_LAST_NUMBER = re.compile(r"(?<![\w./])" + _NUMBER)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}$")
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` (and `\\fbox{...}`) in `text`, in order; nested braces are kept
    whole, an unclosed box is ignored."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i])
                    break
    return found


def last_number(text: str) -> str | None:
    """The last number in `text` (sign, thousands commas, decimals, a/b fractions), or None."""
    numbers = _LAST_NUMBER.findall(text.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def extract_math_answer(text: str) -> str | None:
    """The final answer: the last non-empty `\\boxed{}` content, else the last number, else None."""
    boxes = [b.strip() for b in boxed_contents(text) if b.strip()]
    if boxes:
        return boxes[-1]
    return last_number(text)


def _strip_latex(s: str) -> str:
    s = s.strip().replace("\u2212", "-")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,!;: ]", "", s)  # thin spaces
    s = s.replace("\\left", "").replace("\\right", "").replace("$", "")
    return s.strip().rstrip(".").strip()


def parse_number(s: str) -> Fraction | None:
    """`s` as an exact Fraction when it is one number ("-1,234", "12.0", ".5", "3/4", "\\frac{3}{4}"; in
    "x = 5" the right-hand side), else None. `\\text{}`, `$` and a trailing period are ignored."""
    s = _strip_latex(s)
    if "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    s = s.replace(" ", "")
    frac = _FRAC.match(s)
    if frac:
        sign, num, den = frac.groups()
        a, b = parse_number(num), parse_number(den)
        if a is None or b is None or b == 0:
            return None
        return -(a / b) if sign == "-" else a / b
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if "/" in s:
        num, _, den = s.partition("/")
        if _PLAIN_NUMBER.match(num) and _PLAIN_NUMBER.match(den) and float(den) != 0:
            return Fraction(num) / Fraction(den)
        return None
    if _PLAIN_NUMBER.match(s):
        return Fraction(s)
    return None


def _normalise_text(s: str) -> str:
    return re.sub(r"\s+", "", _strip_latex(s)).lower()


def answers_match(predicted: str | None, gold: Any) -> bool:
    """Numeric equality when both parse as numbers, else equality of the normalised strings."""
    if predicted is None:
        return False
    gold = str(gold)
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    if a is not None or b is not None:
        return False
    return _normalise_text(predicted) == _normalise_text(gold)


def canonical_number(s: str) -> str:
    """An integer-valued numeric answer as plain digits ("1,234" / "12.0" -> "1234" / "12"); anything else with
    thousands commas removed. For exact-match scorers that expect the oracle's plain form."""
    value = parse_number(s)
    if value is not None and value.denominator == 1:
        return str(value.numerator)
    stripped = _strip_latex(s)
    return stripped.replace(",", "") if _THOUSANDS.match(stripped) else stripped


def math_answer_reward(text: str, sample: dict) -> float:
    """1.0 when the completion's final answer (`extract_math_answer`) equals sample["answer"], else 0.0."""
    return 1.0 if answers_match(extract_math_answer(text), sample["answer"]) else 0.0
