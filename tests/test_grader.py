"""Tests of grader.py: extraction, equivalence, the time limit and the Grader pool."""

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from conftest import shared_file

from mathrl import grader
from mathrl.grader import Grader, extract_answer, is_equiv

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


# Spellings real model outputs use (issue 15.9), each with near misses that must stay wrong.
EQUIVALENT_SPELLINGS = [
    ("1.5e3", "1500"), ("6.02e23", "6.02\\times10^{23}"), ("1e-5", "0.00001"), ("3E4", "30000"),
    ("2.5e-3", "\\frac{1}{400}"), ("-4.2e1", "-42"),
    ("x <= 3", "x \\le 3"), ("x >= 2", "[2,\\infty)"), ("-1 <= x < 3", "[-1,3)"), ("x<=3", "(-\\infty,3]"),
    ("25 percent", "25\\%"), ("25 \\text{percent}", "25"), ("25 percent", "0.25"), ("12.5 per cent", "0.125"),
    ("1; 2; 3", "1, 2, 3"), ("2 and 3", "3, 2"), ("1, 2, and 3", "\\{1,2,3\\}"),
    ("x = 2 and x = -3", "-3, 2"),
    ("\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"),
    ("\\left(\\begin{array}{rr} 1 & -2 \\\\ 3 & 4 \\end{array}\\right)",
     "\\begin{bmatrix} 1 & -2 \\\\ 3 & 4 \\end{bmatrix}"),
    ("\\left[\\begin{array}{c} 1 \\\\ 3 \\end{array}\\right]", "(1, 3)"),
    ("(B) 12", "B"), ("B) 12", "B"), ("\\text{(D) } \\frac{1}{2}", "D"), ("(A) 12", "\\text{(A)}"),
]

NOT_EQUIVALENT_SPELLINGS = [
    ("1.5e3", "1.5"), ("1.5e3", "15000"), ("2e", "2"), ("1e5", "e^5"), ("2e3", "2e^3"), ("e^3", "1000"),
    ("x <= 3", "x < 3"), ("x >= 2", "x \\le 2"), ("x >= 2", "(2,\\infty)"), ("25 percent", "25.1"),
    ("25 percent", "0.025"), ("1; 2", "1, 3"), ("1; 2; 3", "1, 2, 4"), ("2 and 3", "2, 4"),
    ("2 and 3", "5"), ("2 and 3", "(2,3)"),
    ("\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}"),
    ("(B) 12", "C"), ("(A) 12", "12"), ("B) 12", "12"), ("B.5", "B"), ("ABC", "B"), ("(F) 2", "F"),
]


@pytest.mark.parametrize("pred, gold", EQUIVALENT + EQUIVALENT_SPELLINGS)
def test_equivalent(pred, gold):
    assert is_equiv(pred, gold)
    assert is_equiv(gold, pred)


@pytest.mark.parametrize("pred, gold", NOT_EQUIVALENT + NOT_EQUIVALENT_SPELLINGS)
def test_not_equivalent(pred, gold):
    assert not is_equiv(pred, gold)
    assert not is_equiv(gold, pred)


# Cases from tools/bench/grader_vs_math_verify.py where math-verify 0.9.0 and grader.py disagree; the
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


# ----- answers by kind (issue 23) -------------------------------------------------------------
# Cases written from the mathematics for each kind of answer the grader used to miss, each with
# near misses that must stay wrong. tools/bench/grader_vs_math_verify.py scores both graders on them.

# Whole completions, graded with extraction: (completion, gold, correct).
EXTRACTION_CASES = {
    "answer phrase": [
        ("So the final answer: 12", "12", True),
        ("Final Answer: $\\frac{3}{5}$", "\\frac35", True),
        ("**Final Answer:** 42", "42", True),
        ("**Final Answer**\n\n$x = -4$", "-4", True),
        ("### Final Answer\n\\[\n\\frac{\\pi}{6}\n\\]", "\\frac{\\pi}{6}", True),
        ("My final answer is 250.", "250", True),
        ("The final answer to the problem is 7/8.", "\\frac78", True),
        ("final answer is: $-3$", "-3", True),
        ("Counting both cases, final answer 9", "9", True),
        ("Final Answer: $\\frac{3}{5}$", "\\frac53", False),
        ("**Final Answer**\n\n$x = -4$", "4", False),
        ("Before the final answer we check the case n = 2.", "2", False),  # prose, not a marker
    ],
    "text after the phrase": [
        ("The answer is 5. Let me know if you need anything else!", "5", True),
        ("The answer is 18<|im_end|>", "18", True),
        ("The answer is \\(\\frac{1}{4}\\).", "\\frac14", True),
        ("The answer is \\( 2\\sqrt{3} \\) square units.", "2\\sqrt3", True),
        ("The answer is 64, which is a perfect square.", "64", True),
        ("The final answer is 3.5. I hope this helps!", "3.5", True),
        ("The answer is 12 because each pair is counted once.", "12", True),
        ("The answer is **17**.", "17", True),
        ("The final answer is $\\frac{7}{2}$.</s>", "\\frac72", True),
        ("The answer is 5. Let me know if you need anything else!", "6", False),
        ("The answer is 18<|im_end|>", "81", False),
        ("The answer is \\(\\frac{1}{4}\\).", "\\frac12", False),
        ("The answer is 12 because 3 \\cdot 4 = 12.", "4", False),
    ],
    "several boxes": [
        ("The solutions are $\\boxed{2}$ and $\\boxed{3}$.", "2, 3", True),
        ("x = \\boxed{2} or x = \\boxed{-5}", "-5, 2", True),
        ("So $x = \\boxed{3}$ and $y = \\boxed{-1}$.", "(3,-1)", True),
        ("We find $a=\\boxed{4}$, $b=\\boxed{7}$.", "(4, 7)", True),
        ("$\\boxed{1}, \\boxed{2}, \\boxed{4}$", "\\{1,2,4\\}", True),
        ("The roots are \\boxed{-1} and \\boxed{\\frac{1}{2}}.", "\\frac12, -1", True),
        ("\\boxed{7}\n\n\\boxed{7}", "7", True),  # the same answer boxed twice
        ("Half of it is \\boxed{3}. Doubling the whole gives \\boxed{12}.", "12", True),  # prose between
        ("The solutions are $\\boxed{2}$ and $\\boxed{3}$.", "3", False),
        ("So $x = \\boxed{3}$ and $y = \\boxed{-1}$.", "(-1,3)", False),
        ("$\\boxed{1}, \\boxed{2}, \\boxed{4}$", "\\{1,2\\}", False),
        ("\\boxed{1} or \\boxed{2} or \\boxed{3}", "2", False),  # hedging over candidates
        ("x = \\boxed{2} or x = \\boxed{-5}", "2", False),
        ("Half of it is \\boxed{3}. Doubling the whole gives \\boxed{12}.", "3, 12", False),
    ],
    "box corrected later": [
        ("We first get \\boxed{5}. Wait, that double counts. The answer is 4.", "4", True),
        ("\\boxed{10}\n\nHmm, I missed a case, so the final answer is 11.", "11", True),
        ("\\boxed{12}. I hope the answer is clear.", "12", True),  # "clear" is not an answer
        ("The answer is 3, we box it: \\boxed{3}", "3", True),
        ("We first get \\boxed{5}. Wait, that double counts. The answer is 4.", "5", False),
        ("\\boxed{10}\n\nHmm, I missed a case, so the final answer is 11.", "10", False),
    ],
}

# The opt-in fallback: (completion, the answer it states); with no marker, the default gives None.
CLOSING_STATEMENTS = [
    ("Adding the two parts, the total is $42$.", "42"),
    ("Therefore, the number of apples is 17.", "17"),
    ("We solve and get\nx = 5", "5"),
    ("Thus the probability equals \\(\\frac{1}{6}\\).", "\\frac{1}{6}"),
    ("Collecting terms we get\n\\[\n\\frac{3}{8}\n\\]", "\\frac{3}{8}"),
    ("The area of the triangle is 24 square units.", "24"),
    ("Hence $m + n = 19$.", "19"),
    ("The sum is 2 + 3 = 5.\nHope this helps!", "5"),
]

# (prediction, gold, equal), checked both ways round.
EQUIVALENCE_CASES = {
    "label on the left": [
        ("5", "AB = 5", True), ("\\overline{AC} = 2\\sqrt{3}", "2\\sqrt3", True), ("BC=\\frac{7}{2}", "3.5", True),
        ("\\angle ABC = 45^\\circ", "45", True), ("m\\angle A = 60", "60^\\circ", True), ("[ABC] = 84", "84", True),
        ("\\text{Area} = 12\\text{ cm}^2", "12", True), ("\\text{perimeter} = 30", "30", True),
        ("AB:BC = 2:3", "2:3", True), ("\\frac{AB}{BC} = \\frac{2}{3}", "\\frac23", True),
        ("AB:BC = 2:3", "\\frac{2}{3}", True), ("a = 2, b = 3", "(2,3)", True), ("b = 3, a = 2", "(2, 3)", True),
        ("\\text{width} = 4, \\text{length} = 6", "(4, 6)", True), ("m = 5, n = 12", "5, 12", True),
        ("5", "AB = 6", False), ("AB = 5", "BC = 5", False), ("a = 3, b = 2", "(2, 3)", False),
        ("AB:BC = 2:3", "3:2", False), ("2:3", "\\frac32", False), ("x^2 = 4", "4", False),
        ("2x + 3y = 6", "6", False), ("\\angle ABC = 45^\\circ", "135", False),
        ("\\text{width} = 4, \\text{length} = 6", "(6, 4)", False),
    ],
    "solution lists": [
        ("x = 1 \\text{ or } x = -3", "-3, 1", True), ("x = 2 or x = 5", "\\{2, 5\\}", True), ("1 or 2", "2, 1", True),
        ("x = -1 and x = 4", "4,-1", True), ("x_1 = 2, x_2 = 3", "2, 3", True), ("x_2 = 3, x_1 = 2", "(2,3)", True),
        ("x = 3, x = 3, x = -1", "\\{-1, 3\\}", True), ("\\{2, 2, 5\\}", "\\{2, 5\\}", True),
        ("-1, -1, 2", "\\{2, -1\\}", True), ("[1, 4, 9]", "1, 4, 9", True), ("x = 1, y = 2, z = 3", "(1,2,3)", True),
        ("x \\in \\{1, 2\\}", "1, 2", True), ("\\langle 1, -2, 3 \\rangle", "(1,-2,3)", True),
        ("x = 1 \\text{ or } x = -3", "-1, 3", False), ("1 or 2", "1", False), ("x = 3, x = 3, x = -1", "3", False),
        ("\\{2, 2, 5\\}", "\\{2, 5, 7\\}", False), ("1, 1, 2", "1, 2", False), ("[1, 4]", "1, 4", False),
        ("x = 1, y = 2, z = 3", "(1,3,2)", False), ("x = 2, y = 1", "(1,2)", False), ("[1, 4, 9]", "1, 4, 8", False),
        ("x = 2 or x = 5", "2, 5, 7", False), ("\\langle 1, -2, 3 \\rangle", "(1, 2, 3)", False),
    ],
    "relations": [
        ("-x > -2", "x < 2", True), ("-x > -2", "(-\\infty, 2)", True), ("-x \\le 3", "x \\ge -3", True),
        ("-y < 5", "y > -5", True), ("3 > -x", "x > -3", True), ("2 > -x > -3", "(-2, 3)", True),
        ("x \\approx 2.47", "2.47", True), ("\\approx 0.667", "0.667", True), ("\\sqrt{2} \\approx 1.414", "\\sqrt2", True),
        ("x \u2248 3.5", "\\frac72", True), ("-3 \\le x < 4", "[-3, 4)", True), ("4 > x \\geq -3", "[-3,4)", True),
        ("x \\in (-3, 4]", "-3 < x \\le 4", True),
        ("x < -1 \\text{ or } x > 2", "(-\\infty,-1)\\cup(2,\\infty)", True),
        ("x \\le 0 or x \\ge 1", "(-\\infty, 0] \\cup [1, \\infty)", True),
        ("x > 2", "x < 2", False), ("-x > -2", "x > 2", False), ("-x > 2", "x < 2", False),
        ("-x \\le 3", "x \\le -3", False), ("2 > -x > -3", "(-3, 2)", False), ("x \\approx 2.47", "2.48", False),
        ("\\sqrt{2} \\approx 1.414", "1.5", False), ("-3 \\le x < 4", "(-3, 4)", False),
        ("x < -1 \\text{ or } x > 2", "(-1, 2)", False),
        ("x < -1 \\text{ and } x > 2", "(-\\infty,-1)\\cup(2,\\infty)", False),  # "and" is not "or"
        ("m > 2", "-k < -2", False),
    ],
    "percent": [
        ("40 pct", "40\\%", True), ("40 pct.", "0.4", True), ("40 Percent", "40", True), ("40\\text{ pct}", "40", True),
        ("12.5 per-cent", "12.5\\%", True),
        ("40 pct", "4", False), ("40 pct", "0.04", False), ("40 Percent", "40.5", False),
    ],
    "matrix in parentheses": [
        ("\\left(\\begin{matrix} 1 & 0 \\\\ 0 & 1 \\end{matrix}\\right)",
         "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", True),
        ("\\left[\\begin{matrix} 2 & -1 \\\\ 3 & 5 \\end{matrix}\\right]",
         "\\begin{bmatrix} 2 & -1 \\\\ 3 & 5 \\end{bmatrix}", True),
        ("(\\begin{matrix} 1 \\\\ 2 \\end{matrix})", "(1, 2)", True),
        ("\\left(\\begin{matrix} 1 & 0 \\\\ 0 & 1 \\end{matrix}\\right)",
         "\\begin{pmatrix} 0 & 1 \\\\ 1 & 0 \\end{pmatrix}", False),
        ("(\\begin{matrix} 1 \\\\ 2 \\end{matrix})", "(2, 1)", False),
    ],
    "JSON-escaped LaTeX": [
        ("\\\\frac{3}{4}", "\\frac34", True), ("2\\\\sqrt{5}", "\\sqrt{20}", True),
        ("\\\\begin{pmatrix} 1 \\\\\\\\ 2 \\\\end{pmatrix}", "(1,2)", True), ("\\\\left( 1, 2 \\\\right)", "(1,2)", True),
        ("\\\\pi", "\\pi", True),
        ("\\\\frac{3}{4}", "\\frac43", False), ("2\\\\sqrt{5}", "\\sqrt{10}", False),
        ("\\\\begin{pmatrix} 1 \\\\\\\\ 2 \\\\end{pmatrix}", "(2,1)", False),
    ],
    "digit grouping": [
        ("10,00,000", "1000000", True), ("1,23,45,678", "12345678", True), ("1'250'000", "1250000", True),
        ("1_000_000", "1000000", True), ("2.500.000", "2500000", True), ("12\\,345", "12345", True),
        ("12 345.5", "12345.5", True), ("1\u202f000", "1000", True),
        ("10,00,000", "100000", False), ("1.000.000", "1", False), ("1'250'000", "125000", False),
        ("1.000", "1000", False),  # one dot is a decimal point
    ],
    "times": [
        ("\\text{3:45 PM}", "3:45 \\text{ p.m.}", True), ("\\text{10:30}", "10:30", True), ("09:15", "9:15", True),
        ("4:05\\text{ a.m.}", "4:05 AM", True), ("\\text{7:00 pm}", "7:00 PM", True),
        ("3:45 \\text{ a.m.}", "3:45 \\text{ p.m.}", False), ("\\text{10:30}", "10:03", False),
        ("4:05 AM", "4:50 AM", False),
    ],
    "commuted factors": [
        ("\\sqrt{2}\\cdot 3 + \\sqrt{3}\\cdot 2", "3\\sqrt2+2\\sqrt3", True),
        ("r h \\pi \\cdot 2 + 2\\pi r^2", "2\\pi r^2 + 2\\pi r h", True), ("b a^2 + 1", "1 + a^2 b", True),
        ("i\\sqrt{3}\\cdot 2 - 1", "-1+2\\sqrt3 i", True), ("3^n \\cdot 2 + 1", "2\\cdot3^{n}+1", True),
        ("\\sqrt{2}\\cdot 3 + \\sqrt{3}\\cdot 2", "2\\sqrt2+3\\sqrt3", False), ("b^2 a + 1", "1 + a^2 b", False),
        ("3^n \\cdot 2 + 1", "2^n \\cdot 3 + 1", False),
    ],
}


def _cases(groups):
    return [pytest.param(*case, id=f"{kind}-{i}") for kind, cases in groups.items() for i, case in enumerate(cases)]


@pytest.mark.parametrize("completion, gold, correct", _cases(EXTRACTION_CASES))
def test_extraction_by_kind(completion, gold, correct):
    assert grader.grade(completion, gold) is correct


@pytest.mark.parametrize("completion, stated", CLOSING_STATEMENTS)
def test_closing_statement_fallback_is_opt_in(completion, stated):
    assert extract_answer(completion) is None  # rewards never read an unmarked answer
    assert extract_answer(completion, closing_statement=True) == stated


def test_closing_statement_fallback_needs_a_stated_value():
    for text in ["Let me know if you need more help!", "So she walked 3 miles in total.\nHope this helps!"]:
        assert extract_answer(text, closing_statement=True) is None
    assert extract_answer("The answer is 3.\nSo the total is $5$.", closing_statement=True) == "3"  # a marker wins
    assert not is_equiv(extract_answer("Therefore, the number of apples is 17.", closing_statement=True), "71")


@pytest.mark.parametrize("pred, gold, equal", _cases(EQUIVALENCE_CASES))
def test_equivalence_by_kind(pred, gold, equal):
    assert is_equiv(pred, gold) is equal
    assert is_equiv(gold, pred) is equal


def test_a_list_written_as_a_tuple():
    assert is_equiv("(3,5,7)", "3, 5, 7") and is_equiv("(7,5,3)", "3, 5, 7")  # the gold list is unordered
    assert is_equiv("3, 5, 7", "(3,5,7)") and not is_equiv("7, 5, 3", "(3,5,7)")  # the gold tuple is ordered
    assert not is_equiv("(3,5)", "3, 5")  # two items in parentheses may be an open interval


def test_plain_numbers_and_their_structures_never_reach_sympy(monkeypatch):
    calls = []
    monkeypatch.setattr(grader, "_in_sympy_helper", lambda *args: calls.append(args) or False)
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
        with pytest.raises(grader.ConversionError):
            grader.latex_to_sympy(text)
    assert grader.latex_to_sympy("2^{1009}") == 2**1009
    with pytest.raises(grader.ConversionError):
        grader.latex_to_sympy("\\frac{1}{0}")


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


# Whole completions whose extraction or normalisation used to take quadratic time (a 30 KB
# completion stalled compute_rewards for 26.5 s): each is graded not correct well within the limit.
PATHOLOGICAL_COMPLETIONS = {
    "20,000 nested braces": "so \\boxed{" + "{" * 20_000 + "1" + "}" * 20_000 + "}",  # was 40 s
    "30 KB of brace pairs": "\\boxed{" + "{}" * 15_000 + "1}",
    "30 KB of backslashes": "\\boxed{" + "\\" * 30_000 + "}",
    "30 KB of escaped braces": "\\boxed{" + "\\{" * 15_000 + "}",
    "30 KB of dollars after the phrase": "The answer is a" + "$" * 30_000 + "b",  # was 15 s
    "30 KB of dollars in a box": "\\boxed{a" + "$" * 30_000 + "b}",  # was 19 s
    "30 KB of spaces before a sign-off": "The answer is 2" + " " * 30_000 + "I hope it is correct x",  # 8 s
    "30 KB of garbage": "\\boxed{" + _garbage(30_000) + "}",
    "3,000 boxes": "\\boxed{2}" * 3_000,
}


@pytest.mark.parametrize("name", PATHOLOGICAL_COMPLETIONS)
def test_pathological_completions_are_not_correct_within_the_limit(name):
    text = PATHOLOGICAL_COMPLETIONS[name]
    start = time.monotonic()
    assert grader.grade(text, "1", timeout=1.0) is False
    assert is_equiv(text, "1", timeout=1.0) is False
    assert time.monotonic() - start < 1.0


def test_normalisation_is_linear_in_the_nesting():
    start = time.monotonic()
    assert grader.normalize_answer("{" * 20_000 + " 1 " + "}" * 20_000) == "1"
    assert grader.normalize_answer("{ {1} + {2} }") == "{1}+{2}"  # not one pair around everything
    assert time.monotonic() - start < 0.5  # peeling one level per rescan took 40 s


def test_answers_longer_than_the_limit_are_not_equal_even_to_themselves():
    long_sum = "+".join(["1"] * (grader.MAX_ANSWER_CHARS // 2 + 1))
    assert not is_equiv(long_sum, long_sum)
    assert is_equiv(long_sum[: grader.MAX_ANSWER_CHARS - 1], long_sum[: grader.MAX_ANSWER_CHARS - 1])


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
    helper = grader._SYMPY_HELPER
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


# ----- Grader pool ----------------------------------------------------------------------------

def test_grader_matches_in_process_grading_and_survives_timeouts_and_dead_workers():
    completions = ["<think>ok</think> \\boxed{4}", "<think>ok</think> \\boxed{5}", "The answer is 4",
                   "\\boxed{4} \\boxed{4}", "<think>ok</think> \\boxed{4} and",
                   f"\\boxed{{{SLOW}}}", "\\boxed{\\frac{\\sqrt{2}}{2}}"]
    answers = ["4"] * 5 + ["1", "\\frac{1}{\\sqrt{2}}"]
    expected = [True, False, True, True, True, False, True]
    with Grader(num_workers=2, timeout=1.0) as pool:
        assert pool.correct(completions, answers) == expected
        for process in list(pool._pool._processes.values()):
            process.kill()  # a worker dies between batches (e.g. out of memory)
            process.join()
        assert pool.correct(completions, answers) == expected
        with pytest.raises(ValueError):
            pool.correct(["\\boxed{1}"], [])


def _descendants(pid: int) -> list[int]:
    """Pids of every process below pid, from /proc (a process's parent is field 4 of its stat)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        below = children.get(stack.pop(), [])
        found += below
        stack += below
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned zombie waits for an init that may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


GRADER_THEN_WAIT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from mathrl.grader import Grader, is_equiv
if __name__ == "__main__":
    assert is_equiv("\\sqrt{8}", "2\\sqrt{2}")  # this process's own sympy helper
    with Grader(num_workers=2) as pool:
        assert pool.correct(["\\boxed{\\sqrt{8}}", "\\boxed{3}"], ["2\\sqrt{2}", "3"]) == [True, True]
        print("graded", flush=True)
        time.sleep(600)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from /proc")
def test_no_process_outlives_a_sigkilled_grader_owner():
    import subprocess
    import sys

    owner = subprocess.Popen([sys.executable, "-c", GRADER_THEN_WAIT, str(Path(grader.__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    descendants = []
    try:
        assert owner.stdout.readline() == "graded\n"
        descendants = _descendants(owner.pid)
        # its sympy helper, the forkserver, the resource tracker, 2 workers and at least one helper of theirs
        assert len(descendants) >= 6, descendants
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, descendants)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in descendants if _running(pid)] == []
    finally:
        owner.kill()
        for pid in descendants:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


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
