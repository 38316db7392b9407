"""The pieces of scripts/gpu_smollm2_lora_dpo.sh that decide what is trained on: preference pairs from sampled
answers, sampled completions kept with their question, SFT rows made from GRPO prompt rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _scripts import load_script

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


pairs_script = load_script("make_self_preference_pairs")
sft_script = load_script("make_math_sft_from_prompts")
eval_math = load_script("eval_math")


def test_pairs_match_distinct_right_answers_with_distinct_wrong_ones() -> None:
    completions = ["= 12. The answer is 12.", "The answer is 13.", "= 12. The answer is 12.", "It is 12", "14", " "]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    pairs = pairs_script.pairs_for_question("What is 5 + 7?", completions, rewards)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("= 12. The answer is 12.", "The answer is 13."), ("It is 12", "14")]  # a repeat and a blank are not used
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 5 + 7?"}]
    assert pairs_script.pairs_for_question("q", ["a", "b"], [1.0, 1.0]) == []  # nothing wrong: nothing to prefer


def test_the_math_reward_decides_chosen_and_rejected() -> None:
    from posttrain.rl.rewards import get_reward_fn

    reward = get_reward_fn("math_answer")
    row = {"question": "Calculate 40 - -82.", "answer": "122"}
    completions = ["40 - -82 = 122\nThe answer is 122.", "40 - -82 = -42\nThe answer is -42.", "The answer is 1,22"]
    pairs = pairs_script.pairs_for_question(row["question"], completions, [reward(c, row) for c in completions])
    assert len(pairs) == 1 and pairs[0]["chosen"][0]["content"].endswith("122.")


def test_sampled_completions_stay_with_their_question() -> None:
    """Questions of different lengths are batched sorted by length; sample j of question i must land at
    i * n + j. Near-zero temperature makes every sample the greedy answer, which is known per question."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    questions = ["What is 123456 + 654321 + 111111 + 222222?", "1 + 1", "What is 7 * 8?"]
    kwargs = dict(batch_size=4, max_new_tokens=6, device=torch.device("cpu"))
    greedy = eval_math.generate_completions(model, tokenizer, questions, **kwargs)
    assert len(set(greedy)) == 3, greedy  # distinct answers, or the check below could not see a mix-up
    sampled = eval_math.generate_completions(model, tokenizer, questions, temperature=1e-4, num_samples=2, **kwargs)
    assert sampled == [g for g in greedy for _ in range(2)]
    with pytest.raises(ValueError, match="temperature > 0"):
        eval_math.generate_completions(model, tokenizer, questions, num_samples=2, **kwargs)


def test_sft_rows_from_prompt_rows_keep_only_solutions_that_reach_the_answer() -> None:
    def prompt(expression: str | None, answer: str) -> dict:
        meta = {"expression": expression} if expression else {}
        return {"question": f"Calculate {expression}.", "answer": answer, "entry": {"metadata": meta}}

    rows, dropped = sft_script.sft_rows([prompt("12 + 7 * 2", "26"), prompt("3 - 5", "4"), prompt(None, "1")])
    assert dropped == {"no_expression": 1, "answer_mismatch": 1}
    assert rows == [{"messages": [
        {"role": "user", "content": "Calculate 12 + 7 * 2."},
        {"role": "assistant", "content": "12 + 7 * 2\n= 12 + 14\n= 26\nThe answer is 26."},
    ]}]
