"""Our grader against Hugging Face's math-verify on (prediction, gold) pairs with known verdicts.

The pairs are built from real gold answers (MATH-500 and OlympiadBench): equivalent rewrites that
must be accepted (identity, every completion style, \\dfrac, 0.5 for \\frac12, x = 3 for 3, units,
percent, reordered sets, thousands separators, ...) and wrong answers that must be rejected
(perturbed numbers, swapped tuples, flipped interval ends, sign changes, a dropped element, ...).
Each grader sees the same completion text; math-verify parses the gold as `\\boxed{gold}`.
The script prints how often each grader matches the intended verdict, where they disagree, and
every case where a grader calls a wrong answer right. Then it scores both graders on the cases by kind
of tests/test_grader.py (issue 23), written from the mathematics: equivalence, extraction (on the
completions with a `\\boxed` and on all of them) and the wrong answers each calls right.

math-verify is a development dependency: this script is the only file that imports it.
Run from the project root:  .venv/bin/python tools/bench/grader_vs_math_verify.py [--limit N]
(--limit 0 prints only the table of the test cases by kind)
"""

import argparse
import json
import logging
import re
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mathrl import grader  # noqa: E402

STYLES = {
    "boxed": lambda x: f"Putting it together, the answer is $\\boxed{{{x}}}$.",
    "fbox": lambda x: f"So we get \\fbox{{{x}}}",
    "answer-tag": lambda x: f"<think>reasoning</think>\n<answer>{x}</answer>",
    "the-answer-is": lambda x: f"Adding these up. The answer is ${x}$.",
    "minerva": lambda x: f"Final Answer: The final answer is ${x}$. I hope it is correct.",
    "gsm8k": lambda x: f"She pays 3 + 4 = 7 dollars.\n#### {x}",
}


# ----- equivalent rewrites (verdict: right) ---------------------------------------------------

def as_fraction(gold: str) -> Fraction | None:
    match = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}|(-?\d+(?:\.\d+)?)", gold.strip())
    if not match:
        return None
    if match.group(4):
        return Fraction(match.group(4))
    value = Fraction(int(match.group(2)), int(match.group(3)))
    return -value if match.group(1) else value


def to_decimal(gold):
    value = as_fraction(gold)
    if value is None or value.denominator == 1:
        return None
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return None if denominator != 1 else format(float(value), ".10g")


def to_dfrac(gold):
    return gold.replace("\\frac", "\\dfrac") if "\\frac" in gold else None


def to_slash(gold):
    match = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold.strip())
    return f"{match.group(1)}{match.group(2)}/{match.group(3)}" if match else None


def unsimplified(gold):
    match = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold.strip())
    return f"{match.group(1)}\\frac{{{3 * int(match.group(2))}}}{{{3 * int(match.group(3))}}}" if match else None


def with_variable(gold):
    if re.search(r"=|,|\\in|\\ge|\\le|\\text|[<>]", gold):
        return None  # already an equation or relation, a list, or words
    return f"x = {gold}"


def with_unit(gold):
    return f"{gold}\\text{{ cm}}" if as_fraction(gold) is not None else None


def with_percent(gold):
    return f"{gold}\\%" if re.fullmatch(r"\d+(\.\d+)?", gold.strip()) else None


def with_degrees(gold):
    return f"{gold}^\\circ" if re.fullmatch(r"\d+", gold.strip()) else None


def with_thousands(gold):
    return f"{int(gold):,}" if re.fullmatch(r"\d{4,}", gold.strip()) else None


def as_float_text(gold):
    return f"{gold}.0" if re.fullmatch(r"-?\d+", gold.strip()) else None


def spaced(gold):
    if is_thousands(gold):
        return None
    spaced_text = re.sub(r"([+=,])", r" \1 ", gold)
    if "\\left" not in gold and "\\right" not in gold and re.fullmatch(r"\(.*\)", gold.strip()):
        spaced_text = "\\left( " + spaced_text.strip()[1:-1] + " \\right)"
    return spaced_text if spaced_text != gold else None


def commuted(gold):
    """a + b -> b + a for a sum of two terms outside any bracket."""
    if "," in gold or "=" in gold or "\\pm" in gold:
        return None
    terms = grader._split_top_level(gold, "+")
    if len(terms) != 2 or not terms[0].strip() or terms[0].strip().endswith(("^", "_")):
        return None
    return f"{terms[1].strip()} + {terms[0].strip()}"


def is_thousands(gold):
    return re.fullmatch(r"-?\d{1,3}(,(\\!)? ?\d{3})+", gold.replace("\\$", "").strip()) is not None


def top_level_items(gold):
    return [gold] if is_thousands(gold) else grader._split_top_level(gold, ",")


def reordered(gold):
    items = top_level_items(gold)
    if len(items) < 2 or gold.strip()[0] in "([" and len(items) == 2 and not gold.strip().startswith("("):
        return None
    if gold.strip()[:1] in "([" and grader._encloses(gold.strip(), 0):
        return None  # a tuple or an interval: order matters
    return ", ".join(reversed(items)) if len(set(items)) > 1 else None


def as_set(gold):
    items = top_level_items(gold)
    if len(items) < 2 or (gold.strip()[:1] in "([" and grader._encloses(gold.strip(), 0)):
        return None
    return "\\{" + ", ".join(items) + "\\}"


def in_parentheses(gold):
    """A bare list of three or more answers written as a tuple: 1, 2, 3 -> (1, 2, 3)."""
    items = top_level_items(gold)
    if len(items) < 3 or gold.strip()[:1] in "([\\" or any("=" in item for item in items):
        return None
    return "(" + ", ".join(items) + ")"


def column_as_tuple(gold):
    match = re.fullmatch(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", gold.strip())
    if not match or "&" in match.group(1):
        return None
    return "(" + ", ".join(row.strip() for row in match.group(1).split("\\\\")) + ")"


def plus_minus(gold):
    if "\\{" in gold or "," in gold:
        return None
    match = re.fullmatch(r"(.+?)\s*\\pm\s*(.+)", gold)
    return f"{match.group(1)} + {match.group(2)}, {match.group(1)} - {match.group(2)}" if match else None


def merged_root(gold):
    match = re.fullmatch(r"(\d+)\s*\\sqrt\{(\d+)\}", gold.strip())
    return f"\\sqrt{{{int(match.group(1)) ** 2 * int(match.group(2))}}}" if match else None


def rationalized(gold):
    """\\frac{a\\sqrt{b}}{c} -> \\frac{ab}{c\\sqrt{b}}."""
    match = re.fullmatch(r"\\frac\{(\d*)\s*\\sqrt\{(\d+)\}\}\{(\d+)\}", gold.strip())
    if not match:
        return None
    a, b, c = int(match.group(1) or 1), int(match.group(2)), match.group(3)
    return f"\\frac{{{a * b}}}{{{c}\\sqrt{{{b}}}}}"


def root_as_power(gold):
    return re.sub(r"\\sqrt\{([^{}]+)\}", r"(\1)^{1/2}", gold) if "\\sqrt{" in gold and "," not in gold else None


def sign_inside(gold):
    match = re.fullmatch(r"-\\frac\{([^{}]+)\}\{([^{}]+)\}", gold.strip())
    return f"\\frac{{-{match.group(1)}}}{{{match.group(2)}}}" if match else None


GE = "\\ge"


def as_inequality(gold):
    """(a, b] -> a < x \\le b;  (a, \\infty) -> x > a."""
    text = gold.strip()
    if text[:1] not in "([" or text[-1:] not in ")]" or not grader._encloses(text, 0):
        return None
    items = grader._split_top_level(text[1:-1], ",")
    if len(items) != 2:
        return None
    low, high = (item.strip() for item in items)
    lower = "<" if text[0] == "(" else "\\le"
    upper = "<" if text[-1] == ")" else "\\le"
    if low == "-\\infty" and high == "\\infty":
        return None
    if "\\infty" not in text and text[0] + text[-1] == "()":
        return None  # (2, 4) may be a point rather than an interval
    if high == "\\infty":
        return f"x {'>' if lower == '<' else GE} {low}"
    if low == "-\\infty":
        return f"x {upper} {high}"
    return f"{low} {lower} x {upper} {high}"


def lowercase_word(gold):
    match = re.fullmatch(r"\\text\{([A-Za-z]{3,})\}", gold.strip())
    return match.group(1).lower() if match and match.group(1) != match.group(1).lower() else None


def numeric_value(gold):
    """The value of a constant gold answer when our converter and math-verify's parser agree on
    it (so that neither grader decides the verdict of the pairs built from it)."""
    from math_verify import parse

    if "," in gold or "=" in gold or re.search(r"\\infty|\\text|_|\\pm|\\in", gold):
        return None
    try:
        ours = grader.latex_to_sympy(grader.normalize_answer(gold))
        theirs = parse(f"\\boxed{{{gold}}}")[0]
        if ours.free_symbols or ours.is_Rational or abs(complex(ours.evalf(30)) - complex(theirs.evalf(30))) > 1e-20:
            return None
        value = complex(ours.evalf(30))
    except Exception:
        return None
    return value.real if value.imag == 0 and value.real != 0 else None


def decimal_8_digits(gold):
    value = numeric_value(gold)
    return None if value is None else format(value, ".8g")


RIGHT = {"identity": lambda g: g, "dfrac": to_dfrac, "decimal": to_decimal, "slash": to_slash,
         "unsimplified": unsimplified, "x=": with_variable, "unit": with_unit, "percent": with_percent,
         "degrees": with_degrees, "thousands": with_thousands, "float": as_float_text, "spacing": spaced, "commuted": commuted,
         "reordered": reordered, "set": as_set, "pm": plus_minus,
         "merged-root": merged_root, "rationalized": rationalized, "root-as-power": root_as_power,
         "sign-inside": sign_inside, "inequality": as_inequality, "lowercase": lowercase_word,
         "decimal-8sig": decimal_8_digits, "in-parentheses": in_parentheses,
         "column-as-tuple": column_as_tuple}


# ----- wrong answers (verdict: wrong) ---------------------------------------------------------

def perturbed(gold):
    """The last number + 1 (the first when a unit follows: 15 cm^2 -> 16 cm^2, not cm^3)."""
    numbers = list(re.finditer(r"\d+", gold))
    if not numbers:
        return None
    last = numbers[0] if re.search(r"\\(text|mbox)", gold) else numbers[-1]
    return gold[: last.start()] + str(int(last.group()) + 1) + gold[last.end():]


def swapped(gold):
    text = gold.strip()
    if text[:1] != "(" or not grader._encloses(text, 0):
        return None
    items = grader._split_top_level(text[1:-1], ",")
    if len(items) < 2 or items[0].strip() == items[1].strip():
        return None
    return "(" + ",".join([items[1], items[0]] + items[2:]) + ")"


def flipped_end(gold):
    text = gold.strip()
    if text[:1] not in "([" or text[-1:] not in ")]" or not grader._encloses(text, 0):
        return None
    if len(grader._split_top_level(text[1:-1], ",")) != 2:
        return None
    if "\\infty" in grader._split_top_level(text[1:-1], ",")[1]:
        return {"(": "[", "[": "("}[text[0]] + text[1:]
    return text[:-1] + {")": "]", "]": ")"}[text[-1]]


def negated(gold):
    value = as_fraction(gold)
    if value == 0 or "," in gold or "=" in gold or "\\in" in gold:
        return None
    return gold.strip()[1:] if gold.strip().startswith("-") else f"-{gold.strip()}"


def sign_flipped(gold):
    return gold.replace("+", "-", 1) if "+" in gold and "\\pm" not in gold else None


def dropped_item(gold):
    items = top_level_items(gold)
    if len(items) < 2 or (gold.strip()[:1] in "([" and grader._encloses(gold.strip(), 0)):
        return None
    return ", ".join(items[:-1])


def rounded_coarsely(gold):
    value = as_fraction(gold)
    if value is None or to_decimal(gold) is not None or value.denominator == 1:
        return None
    return f"{float(value):.2f}"


def times_ten(gold):
    value = as_fraction(gold)
    return None if value in (None, 0) else f"10 \\cdot {gold}" if "\\frac" in gold else str(value * 10)


def decimal_3_digits(gold):
    value = numeric_value(gold)
    return None if value is None else format(value, ".3g")


def doubled(gold):
    if "," in gold or "=" in gold or not re.search(r"[a-z]", re.sub(r"\\[a-zA-Z]+", "", gold)):
        return None
    return f"2\\left({gold}\\right)"


def renamed_variable(gold):
    letters = set(re.findall(r"(?<![\\a-zA-Z])[a-z](?![a-zA-Z])", gold)) - {"e", "i"}
    if len(letters) != 1 or "," in gold or "=" in gold:
        return None
    letter = letters.pop()
    other = "m" if letter != "m" else "k"
    return re.sub(rf"(?<![\\a-zA-Z]){letter}(?![a-zA-Z])", other, gold)


def pair_as_set(gold):
    """(a, b) -> \\{a, b\\}: an ordered pair or an interval is not a two-element set."""
    text = gold.strip()
    if text[:1] != "(" or text[-1:] != ")" or not grader._encloses(text, 0):
        return None
    items = grader._split_top_level(text[1:-1], ",")
    return "\\{" + ",".join(items) + "\\}" if len(items) == 2 else None


WRONG = {"perturbed": perturbed, "swapped": swapped, "flipped-end": flipped_end, "negated": negated,
         "sign-flipped": sign_flipped, "dropped-item": dropped_item, "rounded-2dp": rounded_coarsely,
         "times-ten": times_ten, "decimal-3sig": decimal_3_digits, "doubled": doubled,
         "renamed-var": renamed_variable, "pair-as-set": pair_as_set}


def load_golds(math500: Path, olympiadbench: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Gold answers, and (solution, gold) pairs of MATH-500 (its solutions end in a boxed answer)."""
    golds, solutions = [], []
    if math500.exists():
        rows = [json.loads(line) for line in math500.open()]
        golds += [row["answer"] for row in rows]
        solutions += [(row["solution"], row["answer"]) for row in rows]
    if olympiadbench.exists():
        for line in olympiadbench.open():
            answers = [a.strip().strip("$").strip() for a in json.loads(line)["final_answer"]]
            golds.append(", ".join(a.replace("$", "") for a in answers))
    return golds, solutions


def build_pairs(golds: list[str], solutions: list[tuple[str, str]]) -> list[tuple[str, str, str, str, bool]]:
    """(family, style, completion, gold, verdict) for every applicable rewrite of every gold."""
    pairs = [("solution", "math500", solution, gold, True) for solution, gold in solutions]
    style_names = [s for s in STYLES if s != "gsm8k"]
    for index, gold in enumerate(golds):
        families = [(name, make, True) for name, make in RIGHT.items()]
        families += [(name, make, False) for name, make in WRONG.items()]
        for name, make, verdict in families:
            prediction = make(gold)
            if prediction is None or prediction == gold and not verdict:
                continue
            pairs.append((name, "boxed", STYLES["boxed"](prediction), gold, verdict))
        style = style_names[index % len(style_names)]
        if style != "boxed":
            pairs.append(("identity", style, STYLES[style](gold), gold, True))
        if re.fullmatch(r"-?\d+", gold.strip()):
            pairs.append(("identity", "gsm8k", STYLES["gsm8k"](gold), gold, True))
            pairs.append(("identity", "boxed-space", f"so \\boxed {gold.strip()}$.", gold, True))
    return pairs


def math_verify_verdict(completion: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"\\boxed{{{gold}}}"), parse(completion)))
    except Exception:
        return False


def math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{pred}}}")))
    except Exception:
        return False


def score_cases_by_kind():
    """Both graders on the cases by kind of tests/test_grader.py: a table, and the totals."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_grader as cases  # noqa: E402  (imports pytest; the cases are plain data)

    rows = []  # (table, kind, input, gold, verdict, ours, theirs)
    for kind, group in cases.EXTRACTION_CASES.items():
        for completion, gold, verdict in group:
            rows.append(("extraction", kind, completion, gold, verdict,
                         grader.is_equiv(grader.extract_answer(completion), gold),
                         math_verify_verdict(completion, gold)))
    for completion, stated in cases.CLOSING_STATEMENTS:  # an evaluation protocol's fallback, opt-in
        rows.append(("extraction", "closing statement", completion, stated, True,
                     grader.is_equiv(grader.extract_answer(completion, closing_statement=True), stated),
                     math_verify_verdict(completion, stated)))
    for kind, group in cases.EQUIVALENCE_CASES.items():
        for pred, gold, verdict in group:
            rows.append(("equivalence", kind, pred, gold, verdict,
                         grader.is_equiv(pred, gold), math_verify_equal(pred, gold)))

    print("\ncases by kind of tests/test_grader.py")
    print(f"{'table':12} {'kind':24} {'cases':>6} {'ours ok':>8} {'m-v ok':>8}")
    for table, kind in dict.fromkeys((r[0], r[1]) for r in rows):
        group = [r for r in rows if (r[0], r[1]) == (table, kind)]
        print(f"{table:12} {kind:24} {len(group):6} {sum(r[5] == r[4] for r in group):8} "
              f"{sum(r[6] == r[4] for r in group):8}")
    subsets = {"equivalence": [r for r in rows if r[0] == "equivalence"],
               "extraction": [r for r in rows if r[0] == "extraction"],
               "extraction, boxed": [r for r in rows if r[0] == "extraction" and "boxed" in r[2]]}
    for name, group in subsets.items():
        print(f"{name:18} rate: ours {sum(r[5] == r[4] for r in group) / len(group):.3f}, "
              f"math-verify {sum(r[6] == r[4] for r in group) / len(group):.3f} ({len(group)} cases)")
    print(f"wrong answers called right: ours {sum(r[5] and not r[4] for r in rows)}, "
          f"math-verify {sum(r[6] and not r[4] for r in rows)} (of {sum(not r[4] for r in rows)})")
    for r in rows:
        if r[5] != r[4]:
            print(f"  ours misses [{r[0]}/{r[1]}] verdict={r[4]}: {r[2]!r} vs gold {r[3]!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = ROOT.parent / "shared" / "data"
    parser.add_argument("--math500", type=Path, default=data / "math500" / "test.jsonl")
    parser.add_argument("--olympiadbench", type=Path, default=data / "olympiadbench" / "test.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="grade only the first N pairs")
    parser.add_argument("--show", type=int, default=60, help="list at most this many cases per table")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every expression it cannot parse

    golds, solutions = load_golds(args.math500, args.olympiadbench)
    if not golds:
        sys.exit(f"no gold answers found at {args.math500} or {args.olympiadbench}")
    pairs = build_pairs(golds, solutions)[: args.limit]
    print(f"{len(golds)} gold answers -> {len(pairs)} pairs "
          f"({sum(p[4] for p in pairs)} right, {sum(not p[4] for p in pairs)} wrong)")

    ours, theirs, seconds = [], [], Counter()
    for family, style, completion, gold, verdict in pairs:
        start = time.perf_counter()
        ours.append(grader.is_equiv(grader.extract_answer(completion), gold))
        seconds["ours"] += time.perf_counter() - start
        start = time.perf_counter()
        theirs.append(math_verify_verdict(completion, gold))
        seconds["math-verify"] += time.perf_counter() - start

    print(f"\ntime: ours {seconds['ours']:.1f} s, math-verify {seconds['math-verify']:.1f} s")
    print(f"\n{'family':14} {'verdict':8} {'pairs':>6} {'ours ok':>8} {'m-v ok':>8}")
    families = Counter((p[0], p[4]) for p in pairs)
    for (family, verdict), count in families.items():
        rows = [i for i, p in enumerate(pairs) if (p[0], p[4]) == (family, verdict)]
        ours_ok = sum(ours[i] == verdict for i in rows)
        theirs_ok = sum(theirs[i] == verdict for i in rows)
        print(f"{family:14} {'right' if verdict else 'wrong':8} {count:6} {ours_ok:8} {theirs_ok:8}")
    total_ours = sum(o == p[4] for o, p in zip(ours, pairs))
    total_theirs = sum(t == p[4] for t, p in zip(theirs, pairs))
    print(f"{'all':23} {len(pairs):6} {total_ours:8} {total_theirs:8}")

    disagreements = [i for i in range(len(pairs)) if ours[i] != theirs[i]]
    ours_right = sum(ours[i] == pairs[i][4] for i in disagreements)
    print(f"\nagreement: {len(pairs) - len(disagreements)} / {len(pairs)}; "
          f"{len(disagreements)} disagreements: ours right in {ours_right}, "
          f"math-verify right in {len(disagreements) - ours_right}")
    false_accepts = {"ours": [i for i in range(len(pairs)) if ours[i] and not pairs[i][4]],
                     "math-verify": [i for i in range(len(pairs)) if theirs[i] and not pairs[i][4]]}
    for name, rows in false_accepts.items():
        print(f"wrong answers called right by {name}: {len(rows)}")

    def show(title, rows):
        print(f"\n{title} ({len(rows)})")
        for i in rows[: args.show]:
            family, style, completion, gold, verdict = pairs[i]
            print(f"  [{family}/{style}] verdict={'right' if verdict else 'wrong'} ours={ours[i]} "
                  f"math-verify={theirs[i]}\n    gold: {gold}\n    completion: {completion!r}")

    show("disagreements where math-verify matches the verdict",
         [i for i in disagreements if theirs[i] == pairs[i][4]])
    show("disagreements where ours matches the verdict", [i for i in disagreements if ours[i] == pairs[i][4]])
    show("both graders miss the verdict", [i for i in range(len(pairs)) if ours[i] == theirs[i] != pairs[i][4]])
    show("wrong answers called right by ours", false_accepts["ours"])
    score_cases_by_kind()


if __name__ == "__main__":
    main()
