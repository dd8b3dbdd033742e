"""Tests of rewards.py: extraction, equivalence, the time limit, the rewards and the Grader."""

import json
import math
import os
import random
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
from conftest import shared_file

import rewards
from rewards import (Grader, accuracy_reward, compute_rewards, cosine_reward, extract_answer,
                     format_reward, is_equiv, limr_reward)

# A comparison that passes the converter's size guards but that sympy cannot finish quickly:
# simplify() expands a 4-variable polynomial of degree 200.
SLOW = "(x+y+z+w)^{200}"


@pytest.fixture(scope="module", autouse=True)
def warm_helper():
    """Start this process's sympy helper once, so that time bounds measure comparisons only."""
    assert is_equiv("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}")


# ----- extraction -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("First \\boxed{1}, then finally \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("$\\boxed{\\left\\{ 1, \\frac{2}{3} \\right\\}}$", "\\left\\{ 1, \\frac{2}{3} \\right\\}"),
    ("so the answer is $\\boxed 7$.", "7"),
    ("\\fbox{x^{2}+1}", "x^{2}+1"),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
    ("The answer is 3 but we box \\boxed{4}", "4"),
    ("<think>3 + 4</think>\n<answer> 7 </answer>", "7"),
    ("<answer>\\boxed{9}</answer> later <answer>8</answer>", "9"),
    ("Adding, the answer is $\\frac{3}{4}$, as required.", "\\frac{3}{4}"),
    ("Therefore the answer is 12.\nDone", "12"),
    ("Final Answer: The final answer is $\\$18.90$. I hope it is correct.", "\\$18.90"),
    ("Final Answer: The final answer is 5. I hope it is correct.", "5"),
    ("Janet sells 9 eggs.\n#### 18", "18"),
    ("The answer is: 2", "2"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text", [
    "", "We have not finished the computation of", "\\boxed{}", "\\boxed{ }",
    "so the result is \\boxed{\\frac{1}{", "<answer></answer>", "The answer is", "####",
])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


# ----- equivalence ----------------------------------------------------------------------------

EQUIVALENT = [
    ("3", "3.0"), ("025", "25"), ("\\frac12", "0.5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\frac 34", "3/4"), ("\\frac9{19}", "\\frac{9}{19}"), ("-\\frac{3}{8}", "\\frac{-3}{8}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("x = 3", "3"), ("f(x) = 2x", "2x"),
    ("(B)", "B"), ("\\text{(C)}", "C"), ("\\text{Evelyn}", "Evelyn"), ("\\text{east}", "East"),
    ("10,\\!080", "10080"), ("1,000", "1000"), ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("\\$32,\\!348", "32348"), ("5.4 \\text{ cents}", "5.4"), ("15\\mbox{ cm}^2", "15"),
    ("864 \\mbox{ inches}^2", "864"), ("10 inches", "10"), ("90^\\circ", "90"), ("90^{\\circ}", "90"),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"), ("17.5\\%", "17.5"), ("17.5%", "0.175"),
    ("x \\in [-2,7]", "[-2,7]"), ("5.", "5"), ("1\\frac{4}{5}", "\\frac{9}{5}"),
    ("137 \\frac{1}{2}", "137.5"), ("\\sqrt{8}", "2\\sqrt2"), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("5\\sqrt[3]{4}", "\\sqrt[3]{500}"), ("\\pi", "3.1415927"), ("\\frac13", "0.333333"),
    ("-2 + 7i", "7i-2"), ("1 - 12i", "-12i+1"), ("x^2+2x+1", "(x+1)^2"), ("(a+5)(b+2)", "ab+2a+5b+10"),
    ("\\sin^2 x + \\cos^2 x", "1"), ("\\cot x", "\\frac{\\cos x}{\\sin x}"), ("\\log_{2} 8", "3"),
    ("2^{-2/3}", "\\frac{1}{\\sqrt[3]{4}}"), ("\\binom{6}{2}", "15"), ("\\frac{100!}{2^{50}}", "\\frac{100!}{2^{50}}"),
    ("e^{i\\pi}", "-1"), ("\\lfloor 2.7 \\rfloor", "2"), ("6.72\\times10^{-5}", ".0000672"),
    ("(-\\infty, 0]", "(-\\infty,0]"), ("(2,\\infty)", "x > 2"), ("-2 < x \\le 1", "(-2,1]"),
    ("\\frac{1}{2} \\le x \\le 8", "[\\frac{1}{2}, 8]"), ("k \\geqslant 2", "k\\ge2"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(3,\\infty)\\cup(-\\infty,2)"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1-\\sqrt{5}, 1+\\sqrt{5}"), ("3 \\pm 2 \\sqrt{2}", "3+2\\sqrt2, 3-2\\sqrt2"),
    ("1,-2", "\\{-2, 1\\}"), ("x=1, x=-2", "-2,1"), ("\\{3\\}", "3"),
    ("(1,1), (3,2)", "(3,2),(1,1)"),
    ("\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", "\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}"),
    ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "(0.2, -3.6)"),
    ("y = 2x + 3", "2x - y + 3 = 0"), ("5x - 7y + 11z + 4 = 0", "-10x + 14y - 22z - 8 = 0"),
    ("\\emptyset", "\\varnothing"), (27.0, "27"), ("\\boxed{42}", "42"),
]

NOT_EQUIVALENT = [
    ("1+\\frac{1}{e}", "1-\\frac{1}{e}"), ("(1,2)", "(2,1)"), ("[0,1)", "[0,1]"), ("(0,1)", "[0,1]"),
    ("27649", "27648"), ("3.2101", "3.21"), ("0.33", "\\frac13"), ("0.3333", "\\frac{1}{3}"),
    ("85.71", "\\frac{600}{7}"), ("3.14", "\\pi"), ("2", "-2"), ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("x^2+2x+1", "(x+1)^3"), ("2n", "2k"), ("n", "N"), ("(x+1)^{999}", "(x+1)^{999}+1"),
    ("1,2,3", "1,2"), ("1,1,2", "1,2"), ("(1,2,3)", "(1,2)"), ("-2", "-2,-2"),
    ("\\text{even}", "\\text{neve}"), ("B", "C"), ("(B)", "(C)"), ("2+7i", "2-7i"),
    ("y=2x", "y=-2x"), ("x=3", "y=3"), ("m \\geqslant 2", "k \\geqslant 2"), ("x < 3", "(-\\infty,3]"),
    ("\\sqrt{2}", "\\sqrt{3}"), ("(-\\infty,0)\\cup\\{2\\}", "(-\\infty,0)\\cup\\{1\\}"), ("\\infty", "-\\infty"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}"),
    ("|x|", "x"), ("\\lfloor n/2 \\rfloor", "\\lfloor n/3 \\rfloor"), ("1+1", "3"),
    (None, "3"), ("", ""), ("3", None), ("3", ""),
]


@pytest.mark.parametrize("pred, gold", EQUIVALENT)
def test_equivalent(pred, gold):
    assert is_equiv(pred, gold)
    assert is_equiv(gold, pred)


@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT)
def test_not_equivalent(pred, gold):
    assert not is_equiv(pred, gold)
    assert not is_equiv(gold, pred)


# Cases from bench/grader_vs_math_verify.py where math-verify 0.9.0 and rewards.py disagree; the
# verdicts are decided by the mathematics (math-verify is not imported here).
@pytest.mark.parametrize("completion, gold, correct", [
    ("$\\boxed{52_9}$", "52_8", False),  # different bases are different numbers
    ("$\\boxed{4210_{6}}$", "4210_{5}", False),
    ("$\\boxed{16, 3, 1}$", "16,3,1,1", False),  # (w, d, a, b) = (16, 3, 1, 1): a value is missing
    ("$\\boxed{-2}$", "-2,-2", False),  # a = -2 and b = -2: one value is missing
    ("$\\boxed{(-\\infty, 0) \\cup\\{2\\}.}$", "(-\\infty, 0) \\cup\\{1\\}.", False),
    ("$\\boxed{f(x)=a x-b, where b is an arbitrary integer}$", "f(x)=a x+b, where b is an arbitrary integer", False),
    ("$\\boxed{3 < x \\le 4}$", "(3,4]", True),
    ("$\\boxed{x \\le 0}$", "(-\\infty, 0]", True),
    ("$\\boxed{904.77868}$", "288 \\pi", True),  # 288 pi rounded to 8 significant digits
    ("$\\boxed{1024 - 804.24772}$", "1024-256 \\pi", True),
    ("$\\boxed{4.5\\%}$", "4.5", True),  # MATH drops the percent sign of percent answers
    ("$\\boxed{m_{\\max } = n^{2}-n-1}$", "m_{\\max }=n^{2}-n-1", True),
    ("So we get \\fbox{p - q}", "p - q", True),
    ("$\\boxed{(1,2)}$", "\\{1,2\\}", False),  # an ordered pair (or interval) is not a set
    ("$\\boxed{1,1}$", "1", False),
    ("$\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}$", "(1,2)", True),  # a column vector as a tuple
    ("$\\boxed{i}$", "\\sqrt{-1}", True),
    ("$\\boxed{x>2}$", "(2,\\infty)", True),
    ("$\\boxed{5 dollars}$", "5", True),
    ("$\\boxed{\\text{north}}$", "north", True),
    ("<think>reasoning</think>\n<answer>90^\\circ</answer>", "90", True),
])
def test_cases_where_math_verify_disagrees(completion, gold, correct):
    assert is_equiv(extract_answer(completion), gold) is correct


def test_a_list_written_as_a_tuple():
    assert is_equiv("(3,5,7)", "3, 5, 7") and is_equiv("(7,5,3)", "3, 5, 7")  # the gold list is unordered
    assert is_equiv("3, 5, 7", "(3,5,7)") and not is_equiv("7, 5, 3", "(3,5,7)")  # the gold tuple is ordered
    assert not is_equiv("(3,5)", "3, 5")  # two items in parentheses may be an open interval


def test_plain_numbers_and_their_structures_never_reach_sympy(monkeypatch):
    calls = []
    monkeypatch.setattr(rewards, "_in_sympy_helper", lambda *args: calls.append(args) or False)
    fast = [("42", "42", True), ("42", "42.0", True), ("1,000", "1000", True), ("\\frac{1}{2}", "0.5", True),
            ("-3/4", "-\\frac34", True), ("x = 7", "7", True), ("50\\%", "0.5", True), ("(1,2)", "(1,2.0)", True),
            ("[0,1)", "[0, 1]", False), ("1,2,3", "3,2,1", True), ("17", "18", False), ("0.3333333", "1/3", True),
            ("\\$18.90", "18.9", True), ("\\text{(B)}", "B", True), ("12", "\\frac{25}{2}", False)]
    for pred, gold, expected in fast:
        assert is_equiv(pred, gold) is expected, (pred, gold)
    assert calls == []
    assert not is_equiv("\\sqrt{8}", "2\\sqrt{2}")  # the stub says "not equal": this pair does reach sympy
    assert len(calls) == 1


def test_converter_size_guards():
    for text in ["10^{10^{10^{10}}}", "9^{9^{9}}", "1000!!", "(x+1)^{100000}", "\\binom{10^{6}}{3}", "1" * 500]:
        with pytest.raises(rewards.ConversionError):
            rewards.latex_to_sympy(text)
    assert rewards.latex_to_sympy("2^{1009}") == 2**1009
    with pytest.raises(rewards.ConversionError):
        rewards.latex_to_sympy("\\frac{1}{0}")


# ----- time limit -----------------------------------------------------------------------------

def _garbage(n: int) -> str:
    rng = random.Random(0)
    return "".join(rng.choice("\\{}()[]^_0123456789xyz+-*/=,. frac sqrt") for _ in range(n))


PATHOLOGICAL = ["10^{10^{10^{10}}}", _garbage(5000), "\\frac{1{2}", "}}{{x", "\\frac{1}{0}", "(" * 3000 + "1",
                "-" * 3000 + "1", "\\boxed{" * 2000, SLOW, "\\tan(10^{9999})", "2^{2^{2^{2^{2^{2}}}}}",
                "\\sin(\\sin(\\sin(\\sin(\\sin(\\sin(\\sin(\\sin(x))))))))"]


@pytest.mark.parametrize("pred", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_input_is_false_within_the_limit(pred):
    for gold in ("1", "x^2+1"):
        start = time.monotonic()
        assert is_equiv(pred, gold, timeout=1.0) is False
        assert time.monotonic() - start < 1.5
    assert extract_answer(pred + " \\boxed{") is None


def test_time_limit_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(_timed_is_equiv(SLOW, "1", 1.0)))
    thread.start()
    thread.join(timeout=30)
    (equal, seconds), = results
    assert equal is False and 0.5 < seconds < 1.5  # stopped by the limit, not finished early
    assert _timed_is_equiv("\\sqrt{12}", "2\\sqrt{3}", 3.0)[0] is True  # the helper still works


def _timed_is_equiv(pred, gold, timeout):
    start = time.monotonic()
    return is_equiv(pred, gold, timeout=timeout), time.monotonic() - start


def test_time_limit_in_a_process_pool_worker():
    with ProcessPoolExecutor(1) as pool:
        assert pool.submit(_timed_is_equiv, "\\sqrt{8}", "2\\sqrt{2}", 60.0).result()[0]  # starts its helper
        equal, seconds = pool.submit(_timed_is_equiv, SLOW, "1", 1.0).result(timeout=30)
        assert equal is False and 0.5 < seconds < 1.5
        assert pool.submit(_timed_is_equiv, "\\sqrt{12}", "2\\sqrt{3}", 3.0).result()[0] is True


def test_a_stuck_helper_is_killed_and_replaced():
    helper = rewards._SYMPY_HELPER
    assert is_equiv("\\sqrt{8}", "2\\sqrt{2}")
    stuck = helper.process.pid
    os.kill(stuck, signal.SIGSTOP)  # stuck where its own timer cannot stop it
    try:
        equal, seconds = _timed_is_equiv("\\sqrt{12}", "2\\sqrt{3}", 1.0)
    finally:
        if helper.process is not None and helper.process.pid == stuck:
            os.kill(stuck, signal.SIGCONT)
    assert equal is False and seconds < 1.5
    assert is_equiv("\\sqrt{12}", "2\\sqrt{3}") and helper.process.pid != stuck


# ----- rewards --------------------------------------------------------------------------------

@pytest.mark.parametrize("correct, length, expected", [
    (True, 0, 1.0), (True, 500, 0.75), (True, 1000, 0.5), (True, 5000, 0.5),
    (False, 0, -1.0), (False, 500, -0.75), (False, 1000, -0.5), (False, 5000, -0.5),
])
def test_cosine_reward_boundaries(correct, length, expected):
    assert cosine_reward(correct, length, 1000) == pytest.approx(expected)


def test_cosine_reward_formula_and_errors():
    expected = 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.3))
    assert cosine_reward(True, 300, 1000) == pytest.approx(expected)
    assert cosine_reward(False, 300, 1000, min_wrong=-2.0, max_wrong=0.0) == pytest.approx(
        0.0 + 0.5 * (-2.0) * (1 + math.cos(math.pi * 0.3)))
    with pytest.raises(ValueError, match="max_len"):
        cosine_reward(True, 10, 0)
    with pytest.raises(ValueError, match="length"):
        cosine_reward(True, -1, 10)


@pytest.mark.parametrize("completion, truncated, expected", [
    ("so $\\boxed{\\frac{1}{2}}$", False, 1.0),
    ("so $\\boxed{0.5}$", False, 1.0),
    ("so $\\boxed{\\frac{1}{3}}$", False, -0.5),
    ("The answer is 0.5", False, -1.0),  # right, but not boxed
    ("first \\boxed{0.5} and again \\boxed{0.5}", False, -1.0),  # several boxed answers
    ("\\boxed{0.4} no wait \\boxed{0.5}", False, -1.0),
    ("so $\\boxed{\\frac{1}{2}}$ and then", True, -1.0),  # cut off before end of sequence
    ("", False, -1.0),
])
def test_limr_reward(completion, truncated, expected):
    assert limr_reward(completion, "\\frac{1}{2}", truncated) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<think>2 + 2 = 4</think> The answer is \\boxed{4}.", 1.0),
    ("  <think>\nadd\n</think>\n<answer>4</answer>\n", 1.0),
    ("<think>add</think>\n#### 4", 1.0),
    ("<think>add</think> The answer is 4", 1.0),
    ("<think>add</think>", 0.0),  # no answer after the reasoning
    ("<think>add</think> four, I think", 0.0),  # text, but no final answer
    ("<think> </think> \\boxed{4}", 0.0),  # blank reasoning
    ("add</think> \\boxed{4}", 0.0),  # missing opening tag
    ("\\boxed{4} <think>add</think>", 0.0),  # answer first
    ("<think>a</think><think>b</think> \\boxed{4}", 0.0),
    ("<think>add \\boxed{4}", 0.0),  # reasoning never closed
])
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


def test_accuracy_reward():
    assert accuracy_reward("so $\\boxed{\\dfrac{3}{4}}$", "0.75") == 1.0
    assert accuracy_reward("so $\\boxed{\\dfrac{4}{3}}$", "0.75") == 0.0
    assert accuracy_reward("I am not sure", "0.75") == 0.0


COMPLETIONS = ["<think>ok</think> \\boxed{4}", "<think>ok</think> \\boxed{5}", "The answer is 4",
               "\\boxed{4} \\boxed{4}", "<think>ok</think> \\boxed{4} and"]
TOKENS, TRUNCATED = [100, 200, 300, 50, 1000], [False, False, False, False, True]


def _expected_columns():
    correct = [1, 0, 1, 1, 1]
    cosine = [cosine_reward(bool(c), n, 1000) for c, n in zip(correct, TOKENS)]
    return {"correct": correct, "accuracy": correct, "format": [1, 1, 0, 0, 1], "cosine": cosine,
            "limr": [1.0, -0.5, -1.0, -1.0, -1.0]}


def test_compute_rewards_open_rs_weights():
    columns = compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, 1000, {"format": 1.0, "cosine": 2.0})
    expected = _expected_columns()
    assert set(columns) == {"format", "cosine", "correct", "total"}
    assert columns["correct"] == expected["correct"] and columns["format"] == expected["format"]
    assert columns["cosine"] == pytest.approx(expected["cosine"])
    assert columns["total"] == pytest.approx([f + 2 * c for f, c in zip(expected["format"], expected["cosine"])])


def test_compute_rewards_all_columns_and_errors():
    weights = {"accuracy": 1.0, "format": 0.5, "cosine": 0.0, "limr": 2.0}
    columns = compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, 1000, weights)
    expected = _expected_columns()
    for name in weights:
        assert columns[name] == pytest.approx(expected[name]), name
    assert columns["total"] == pytest.approx(
        [sum(w * expected[name][i] for name, w in weights.items()) for i in range(5)])
    with pytest.raises(ValueError, match="unknown rewards"):
        compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, 1000, {"length": 1.0})
    with pytest.raises(ValueError, match="lengths differ"):
        compute_rewards(COMPLETIONS, ["4"] * 4, TOKENS, TRUNCATED, 1000, {"accuracy": 1.0})


def test_grader_matches_in_process_grading_and_survives_timeouts_and_dead_workers():
    completions = COMPLETIONS + [f"\\boxed{{{SLOW}}}", "\\boxed{\\frac{\\sqrt{2}}{2}}"]
    answers = ["4"] * 5 + ["1", "\\frac{1}{\\sqrt{2}}"]
    expected = [True, False, True, True, True, False, True]
    with Grader(num_workers=2, timeout=1.0) as grader:
        assert grader.correct(completions, answers) == expected
        for process in list(grader._pool._processes.values()):
            process.kill()  # a worker dies between batches (e.g. out of memory)
            process.join()
        assert grader.correct(completions, answers) == expected
        columns = compute_rewards(COMPLETIONS, ["4"] * 5, TOKENS, TRUNCATED, 1000, {"cosine": 1.0}, grader=grader)
        assert columns["correct"] == _expected_columns()["correct"]
        with pytest.raises(ValueError):
            grader.correct(["\\boxed{1}"], [])


# ----- real data ------------------------------------------------------------------------------

def _jsonl(relative):
    with shared_file(relative).open() as handle:
        return [json.loads(line) for line in handle]


def test_math500_solutions_give_the_gold_answer():
    rows = _jsonl("math500/test.jsonl")
    agree = sum(is_equiv(extract_answer(row["solution"]), row["answer"]) for row in rows)
    assert agree >= 0.99 * len(rows)


def _gold_answers():
    yield "math500", [row["answer"] for row in _jsonl("math500/test.jsonl")]
    yield "gsm8k", [row["answer"].split("####")[-1].strip() for row in _jsonl("gsm8k/test.jsonl")]
    yield "aime24", [row["answer"] for row in _jsonl("aime24/test.jsonl")]
    yield "amc23", [row["answer"] for row in _jsonl("amc23/test.jsonl")]
    yield "olympiadbench", [a for row in _jsonl("olympiadbench/test.jsonl") for a in row["final_answer"]]


def test_every_gold_answer_is_equivalent_to_itself_and_to_itself_boxed():
    for name, golds in _gold_answers():
        assert golds, name
        for gold in golds:
            assert is_equiv(gold, gold), (name, gold)
            assert is_equiv(extract_answer(f"\\boxed{{{gold}}}"), gold), (name, gold)


def test_grading_math500_against_itself_is_fast():
    golds = [row["answer"] for row in _jsonl("math500/test.jsonl")]
    start = time.monotonic()
    assert all(is_equiv(gold, gold) for gold in golds)
    assert time.monotonic() - start < 5.0
