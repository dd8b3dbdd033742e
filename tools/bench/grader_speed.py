"""Speed of grader.is_equiv: throughput on MATH-500 gold answers, and worst cases.

Prints answers per second for three workloads on the 500 MATH-500 gold answers:
  self      is_equiv(gold, gold): the string fast path
  solution  is_equiv(extract_answer(solution), gold): extraction included, as in training
  sympy     is_equiv("0+" + gold, gold) for the scalar expression golds: forces sympy
and the seconds taken by each of a list of pathological inputs (all must be False within the
time limit), and of pathological whole completions graded with extraction included.

Run from the project root:  .venv/bin/python tools/bench/grader_speed.py [--data PATH] [--timeout S]
"""

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mathrl import grader  # noqa: E402


def pathological_inputs() -> dict[str, str]:
    rng = random.Random(0)
    garbage = "".join(rng.choice("\\{}()[]^_0123456789xyz+-*/=,. frac sqrt") for _ in range(5000))
    return {
        "tower 10^{10^{10^{10}}}": "10^{10^{10^{10}}}",
        "5,000 characters of garbage": garbage,
        "unbalanced braces": "\\frac{1{2}}}{",
        "division by zero": "\\frac{1}{0}",
        "3,000 open parentheses": "(" * 3000 + "1",
        "factorial tower 1000!!": "1000!!",
        "tan(10^{9999})": "\\tan(10^{9999})",
        "(x+y+z+w)^{200}": "(x+y+z+w)^{200}",
        "nested sines": "\\sin(\\sin(\\sin(\\sin(\\sin(\\sin(\\sin(\\sin(x))))))))",
        "2,000 nested boxes": "\\boxed{" * 2000,
        "20,000 nested braces": "{" * 20_000 + "1" + "}" * 20_000,
    }


def pathological_completions() -> dict[str, str]:
    """Whole completions, graded with extraction included (grader.grade), as the Grader does."""
    rng = random.Random(0)
    garbage = "".join(rng.choice("\\{}()[]^_0123456789xyz+-*/=,. frac sqrt$") for _ in range(30_000))
    return {
        "30 KB: boxed 15,000-deep braces": "so \\boxed{" + "{" * 15_000 + "1" + "}" * 15_000 + "}",
        "30 KB of garbage, boxed": "\\boxed{" + garbage + "}",
        "30 KB of backslashes, boxed": "\\boxed{" + "\\" * 30_000 + "}",
        "30 KB of dollars after 'answer is'": "The answer is a" + "$" * 30_000 + "b",
        "30 KB of dollars in a box": "\\boxed{a" + "$" * 30_000 + "b}",
        "30 KB of spaces, then a sign-off": "The answer is 2" + " " * 30_000 + "I hope it is correct x",
        "3,000 boxes": "\\boxed{2}" * 3_000,
        "1 MB of prose, then a box": "Let us think. " * 75_000 + "\\boxed{2}",
    }


def is_scalar_expression(gold: str) -> bool:
    """Not a tuple, interval, list, matrix, text, base-n numeral or mixed number."""
    normalized = grader.normalize_answer(gold)
    return (grader._structure(normalized)[0] == "scalar" and "_" not in normalized
            and not grader._is_word(normalized) and not re.match(r"\d+\\frac", gold.replace(" ", "")))


def throughput(pairs: list[tuple[str, str]], timeout: float) -> tuple[float, int]:
    start = time.perf_counter()
    equal = sum(grader.is_equiv(pred, gold, timeout=timeout) for pred, gold in pairs)
    return len(pairs) / (time.perf_counter() - start), equal


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "math500" / "test.jsonl",
                        help="MATH-500 jsonl with 'answer' and 'solution' (default: ../shared/data/math500/test.jsonl)")
    parser.add_argument("--timeout", type=float, default=grader.DEFAULT_TIMEOUT, help="seconds per is_equiv")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"grader_speed: {args.data} does not exist (pass --data PATH)")
    rows = [json.loads(line) for line in args.data.open()]

    sympy_calls = []
    reach_sympy = grader._in_sympy_helper

    def counted(*call):
        sympy_calls.append(call[0])
        return reach_sympy(*call)

    grader._in_sympy_helper = counted

    start = time.perf_counter()
    grader.is_equiv("\\sqrt{8}", "2\\sqrt{2}")
    print(f"sympy helper start-up: {time.perf_counter() - start:.2f} s (once per process)\n")

    golds = [row["answer"] for row in rows]
    workloads = {
        "self": [(gold, gold) for gold in golds],
        "solution": [(grader.extract_answer(row["solution"]), row["answer"]) for row in rows],
        "sympy": [("0+" + grader.normalize_answer(gold), gold) for gold in golds if is_scalar_expression(gold)],
    }
    print(f"{'workload':10} {'pairs':>6} {'equal':>6} {'reached sympy':>14} {'answers/s':>10}")
    for name, pairs in workloads.items():
        if name == "solution":  # time extraction too
            start = time.perf_counter()
            pairs = [(grader.extract_answer(row["solution"]), row["answer"]) for row in rows]
            extraction_seconds = time.perf_counter() - start
        sympy_calls.clear()
        rate, equal = throughput(pairs, args.timeout)
        if name == "solution":
            rate = len(pairs) / (len(pairs) / rate + extraction_seconds)
        print(f"{name:10} {len(pairs):6} {equal:6} {len(sympy_calls):14} {rate:10.0f}")

    print(f"\npathological inputs against gold '1' and 'x^2+1' (limit {args.timeout:.1f} s):")
    worst = 0.0
    for name, text in pathological_inputs().items():
        seconds, verdicts = 0.0, []
        for gold in ("1", "x^2+1"):
            start = time.perf_counter()
            verdicts.append(grader.is_equiv(text, gold, timeout=args.timeout))
            seconds = max(seconds, time.perf_counter() - start)
        worst = max(worst, seconds)
        print(f"  {name:30} {seconds:6.2f} s  {'False' if not any(verdicts) else 'TRUE (wrong)'}")
    print("\npathological completions against gold '1' (extraction included):")
    for name, text in pathological_completions().items():
        start = time.perf_counter()
        verdict = grader.grade(text, "1", timeout=args.timeout)
        seconds = time.perf_counter() - start
        worst = max(worst, seconds)
        print(f"  {name:36} {seconds:6.2f} s  {'False' if not verdict else 'TRUE (wrong)'}")
    print(f"worst case: {worst:.2f} s; helper restarts after a hard timeout: {grader._SYMPY_HELPER.timeouts}")


if __name__ == "__main__":
    main()
