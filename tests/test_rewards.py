"""Tests of rewards.py: the rewards and their weighted combination."""

import math

import pytest

from mathrl.grader import Grader
import rewards
from rewards import (CosineShape, accuracy_reward, compute_rewards, cosine_reward, format_reward,
                     limr_reward)


# ----- rewards --------------------------------------------------------------------------------

# Open-RS's shape (the default): characters, no clamp, a right answer 1.0 -> 0.5, a wrong one 0.0 -> -0.5
@pytest.mark.parametrize("correct, length, expected", [
    (True, 0, 1.0), (True, 500, 0.75), (True, 1000, 0.5), (True, 1500, 0.75), (True, 2000, 1.0),
    (False, 0, 0.0), (False, 500, -0.25), (False, 1000, -0.5), (False, 1500, -0.25), (False, 2000, 0.0),
])
def test_cosine_reward_open_rs_shape(correct, length, expected):
    assert cosine_reward(correct, length) == pytest.approx(expected)


def test_cosine_reward_options_and_errors():
    shape = CosineShape(max_len=1000, unit="tokens", clamp=True, correct=(2.0, 1.0), wrong=(-1.0, -0.5))
    assert cosine_reward(True, 300, shape) == pytest.approx(1.0 + 0.5 * 1.0 * (1 + math.cos(math.pi * 0.3)))
    assert cosine_reward(False, 300, shape) == pytest.approx(-0.5 + 0.5 * -0.5 * (1 + math.cos(math.pi * 0.3)))
    assert cosine_reward(True, 5000, shape) == pytest.approx(1.0)  # clamped at max_len
    assert cosine_reward(False, 5000, shape) == pytest.approx(-0.5)
    assert CosineShape.from_flags(3584, "chars", False, "1:0.5", "0:-0.5") == CosineShape(max_len=3584)
    with pytest.raises(ValueError, match="length"):
        cosine_reward(True, -1)
    with pytest.raises(ValueError, match="--cosine-max-len"):
        CosineShape(max_len=0)
    with pytest.raises(ValueError, match="--cosine-unit"):
        CosineShape(unit="words")
    with pytest.raises(ValueError, match="--cosine-wrong"):
        CosineShape.from_flags(1000, "chars", False, "1:0.5", "-0.5")
    with pytest.raises(ValueError, match="--cosine-correct"):
        CosineShape.from_flags(1000, "chars", False, "1:nan", "0:-0.5")


@pytest.mark.parametrize("completion, truncated, expected", [
    ("so $\\boxed{\\frac{1}{2}}$", False, 1.0),
    ("so $\\boxed{0.5}$", False, 1.0),
    ("so $\\boxed{\\frac{1}{3}}$", False, -0.5),
    ("The answer is 0.5", False, -1.0),  # right, but not boxed
    ("first \\boxed{0.5} and again \\boxed{0.5}", False, 1.0),  # the last box is graded
    ("\\boxed{0.4} no wait \\boxed{0.5}", False, 1.0),
    ("\\boxed{0.5} no wait \\boxed{0.4}", False, -0.5),
    ("\\boxed{0.5} " * 4, False, 1.0),
    ("\\boxed{0.5} " * 5, False, -1.0),  # 5 or more boxes
    ("so $\\boxed{\\frac{1}{2}}$ and then", True, -1.0),  # cut off before end of sequence
    ("", False, -1.0),
    ("所以答案是一半" * 3 + " \\boxed{0.5}", False, -1.0),  # over 30% outside the allowed characters
    ("所以答案是 \\boxed{0.5}", False, 1.0),  # 5 of 17: under 30%
    ("∴ ∑ ≤ ≠ \\boxed{0.5}", False, 1.0),  # U+2200-22FF are allowed
    ("abcde" * 5 + " \\boxed{0.5}", False, -1.0),  # a 5-character piece 5 times in a row
    ("abcde" * 4 + " \\boxed{0.5}", False, 1.0),  # 4 times is fine
    ("abcd" * 10 + " \\boxed{0.5}", False, -1.0),  # "abcdabcd" (8 characters) 5 times
    ("abcd\n" * 10 + " \\boxed{0.5}", False, 1.0),  # pieces never span a line break
    ("\\boxed 0.5", False, -1.0),  # "\boxed" without a brace: nothing to parse
    ("\\boxed{{{{0.5}}}}", False, 1.0),  # braces nested 4 deep (the box's own included) parse
    ("\\boxed{{{{{0.5}}}}}", False, -1.0),  # 5 deep do not
    ("\\boxed{0.5} then \\boxed{{{{{0.4}}}}}", False, 1.0),  # the last box that parses is graded
])
def test_limr_reward(completion, truncated, expected):
    assert limr_reward(completion, "\\frac{1}{2}", truncated) == expected


R1_PROMPT = "<｜begin▁of▁sentence｜>system<｜User｜>1+1?<｜Assistant｜><think>\n"


@pytest.mark.parametrize("completion, expected", [
    ("2 + 2 = 4\n</think>\n\nThe answer is \\boxed{4}.", 1.0),
    ("add\n</think>\nno answer", 1.0),  # Open-RS checks the closing tag only
    ("add</think> \\boxed{4}", 0.0),  # no newlines around it
    ("a\n</think>\nb\n</think>\n \\boxed{4}", 0.0),  # twice
    ("<think>\nadd\n</think>\n \\boxed{4}", 1.0),
])
def test_format_reward_after_a_prompt_that_opens_think(completion, expected):
    assert format_reward(completion, R1_PROMPT) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<think>2 + 2 = 4</think> The answer is \\boxed{4}.", 1.0),
    ("  <think>\nadd\n</think>\n<answer>4</answer>\n", 1.0),
    ("<think>add</think>\n#### 4", 1.0),
    ("<think>add</think> The answer is 4", 1.0),
    ("<think>add</think>", 0.0),  # no answer after the reasoning
    ("<think>add</think> four, I think", 0.0),  # text, but no final answer
    ("<think> </think> \\boxed{4}", 0.0),  # blank reasoning
    ("add\n</think>\n \\boxed{4}", 0.0),  # missing opening tag: the prompt did not open it
    ("\\boxed{4} <think>add</think>", 0.0),  # answer first
    ("<think>a</think><think>b</think> \\boxed{4}", 0.0),
    ("<think>add \\boxed{4}", 0.0),  # reasoning never closed
])
def test_format_reward_full_layout(completion, expected):
    assert format_reward(completion) == expected
    assert format_reward(completion, "<|im_start|>assistant\n") == expected


def test_accuracy_reward():
    assert accuracy_reward("so $\\boxed{\\dfrac{3}{4}}$", "0.75") == 1.0
    assert accuracy_reward("so $\\boxed{\\dfrac{4}{3}}$", "0.75") == 0.0
    assert accuracy_reward("I am not sure", "0.75") == 0.0


COMPLETIONS = ["<think>ok</think> \\boxed{4}", "<think>ok</think> \\boxed{5}", "The answer is 4",
               "\\boxed{4} \\boxed{4}", "<think>ok</think> \\boxed{4} and"]
TOKENS, TRUNCATED = [100, 200, 300, 50, 1000], [False, False, False, False, True]


def _expected_columns():
    correct = [1, 0, 1, 1, 1]
    cosine = [cosine_reward(bool(c), len(text)) for c, text in zip(correct, COMPLETIONS)]  # characters
    return {"correct": correct, "accuracy": correct, "format": [1, 1, 0, 0, 1], "cosine": cosine,
            "limr": [1.0, -0.5, -1.0, 1.0, -1.0]}


def test_compute_rewards_open_rs_weights():
    columns = compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, {"format": 1.0, "cosine": 2.0})
    expected = _expected_columns()
    assert set(columns) == {"format", "cosine", "correct", "total"}
    assert columns["correct"] == expected["correct"] and columns["format"] == expected["format"]
    assert columns["cosine"] == pytest.approx(expected["cosine"])
    assert columns["total"] == pytest.approx([f + 2 * c for f, c in zip(expected["format"], expected["cosine"])])


def test_compute_rewards_all_columns_and_errors():
    weights = {"accuracy": 1.0, "format": 0.5, "cosine": 0.0, "limr": 2.0}
    columns = compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, weights)
    expected = _expected_columns()
    for name in weights:
        assert columns[name] == pytest.approx(expected[name]), name
    assert columns["total"] == pytest.approx(
        [sum(w * expected[name][i] for name, w in weights.items()) for i in range(5)])
    with pytest.raises(ValueError, match="unknown rewards"):
        compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, {"length": 1.0})
    with pytest.raises(ValueError, match="lengths differ"):
        compute_rewards(COMPLETIONS, ["4"] * 4, TOKENS, TRUNCATED, {"accuracy": 1.0})
    with pytest.raises(ValueError, match="lengths differ"):
        compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, {"format": 1.0}, prompts=["p"])


def test_compute_rewards_prompts_choose_the_format_rule_and_tokens_are_an_option():
    completions = ["think\n</think>\n\\boxed{4}", "<think>think</think> \\boxed{4}"]
    for prompts, expected in ((["q<think>\n"] * 2, [1.0, 0.0]), (["q"] * 2, [0.0, 1.0])):
        columns = compute_rewards(completions, ["4", "4"], [10, 10], [False, False], {"format": 1.0}, prompts=prompts)
        assert columns["format"] == expected
    by_tokens = CosineShape(max_len=20, unit="tokens")
    columns = compute_rewards(completions, ["4", "5"], [10, 20], [False, False], {"cosine": 1.0}, cosine=by_tokens)
    assert columns["cosine"] == pytest.approx([0.75, -0.5])


def test_compute_rewards_limr_grades_the_box_limr_parses():
    # extract_answer reads the last box (5 deep, 0.4); LIMR's pattern cannot, so it grades the 0.5 before it
    completion = "\\boxed{0.5} then \\boxed{{{{{0.4}}}}}"
    for answer, expected in (("0.5", 1.0), ("0.4", -0.5)):
        columns = compute_rewards([completion], [answer], [10], [False], {"limr": 1.0, "accuracy": 1.0})
        assert columns["limr"] == [expected] == [limr_reward(completion, answer, False)]
        assert columns["accuracy"] == [float(answer == "0.4")]


def test_compute_rewards_with_a_grader_pool_matches_in_process_grading():
    completions = COMPLETIONS + ["\\boxed{4} then \\boxed{{{{{5}}}}}"]
    args = (completions, ["4"] * 6, TOKENS + [10], TRUNCATED + [False], {"cosine": 1.0, "limr": 1.0})
    with Grader(num_workers=1) as grader:
        pooled = compute_rewards(*args, grader=grader)
    assert pooled == compute_rewards(*args)
    assert pooled["correct"] == _expected_columns()["correct"] + [0.0]
    assert pooled["limr"] == _expected_columns()["limr"] + [1.0]


def test_overlong_reward_is_dapos_eq_13_by_hand():
    """L_max = 100, L_cache = 20: 0 up to 80 tokens, then -(|y| - 80) / 20, -1 at the limit."""
    shape = rewards.OverlongShape(max_len=100, buffer=20)
    by_hand = {0: 0.0, 50: 0.0, 80: 0.0, 81: -0.05, 90: -0.5, 95: -0.75, 100: -1.0}
    for length, expected in by_hand.items():
        assert rewards.overlong_reward(length, shape) == pytest.approx(expected, abs=1e-12), length
    scores = rewards.compute_rewards(["a", "b", "c"], ["1", "1", "1"], [10, 90, 100], [False, False, True],
                                     {"overlong": 1.0}, overlong=shape)
    assert scores["overlong"] == pytest.approx([0.0, -0.5, -1.0]) and scores["total"] == scores["overlong"]


@pytest.mark.parametrize("buffer", [0, 101])
def test_overlong_needs_a_buffer_inside_the_completion_limit(buffer):
    with pytest.raises(ValueError, match="--overlong-buffer"):
        rewards.OverlongShape.from_flags(100, buffer, used=True)
    assert rewards.OverlongShape.from_flags(100, buffer, used=False).buffer == buffer  # unused: not checked
