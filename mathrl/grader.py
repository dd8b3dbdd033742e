"""Answer checking for math problems: is a completion's final answer the gold one?

A reward needs the final answer of a completion (extraction) and a judgement of whether that
answer is the gold one (equivalence). Equivalence follows the grading conventions of MATH and
Qwen2.5-Math: both answers are normalised (LaTeX spelling, units, percent, thousands separators,
`x = 3` vs `3`), compared exactly when they are plain numbers, and otherwise converted to sympy by
the small converter in this file and compared symbolically, element by element for tuples,
intervals, sets and matrices.

Sympy can take unbounded time on adversarial input, and a grader that hangs stalls training.
The converter refuses inputs that would build huge numbers, and every comparison that reaches
sympy runs in a helper subprocess under a time limit: the helper is killed and restarted when it
overruns. Unlike signal.alarm, this works from any thread and inside worker processes.

Sections:
  1. Extraction: the final answer of a completion.
  2. Normalisation: strip LaTeX spelling that does not change an answer.
  3. LaTeX -> sympy: a recursive-descent converter with size guards.
  4. Equivalence: fast numeric path, structured answers, sympy comparison.
  5. Time limit: the sympy helper subprocess.
  6. Grader: a process pool that grades batches off the trainer's process.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from concurrent.futures.process import BrokenProcessPool
from decimal import Decimal
from fractions import Fraction

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3.0  # seconds per is_equiv call that reaches sympy
ROUNDED_REL_TOL = 1e-6  # a decimal rounding a value with no finite expansion: 6 significant digits
EXACT_REL_TOL = 1e-25  # two closed forms evaluated to 50 digits that agree this closely are equal
MAX_ANSWER_CHARS = 1000  # longer answers are not equal to anything (the longest gold answer has ~200)
MAX_SYMPY_CHARS = 400  # longer scalar expressions are not sent to sympy
MAX_TOKENS = 300
MAX_NESTING = 50
MAX_DIGITS = 10_000  # the converter refuses numbers with more digits (10^{10^{10}})
MAX_SYMBOLIC_EXPONENT = 1000  # and powers such as (x+1)^{10^6}
MAX_FACTORIAL = 1000


# ---------------------------------------------------------------------------------------------
# 1. Extraction
# ---------------------------------------------------------------------------------------------

BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# "the answer is", "the final answer is:", "Final Answer:", "Final answer 7", a "**Final Answer**" heading
# before its line or its math, "the final answer to the problem is"; not a "final answer" inside prose
_TO_THE_PROBLEM = r"(?:[ \t]+(?:to|for)[ \t]+(?:the|this)[ \t]+(?:problem|question))?"
_ANSWER_PHRASE = re.compile(
    rf"\bthe[ \t]+(?:final[ \t]+|correct[ \t]+)?answer{_TO_THE_PROBLEM}(?:[ \t]+is\b[ \t]*:?|[ \t*]*:)[ \t*]*"
    rf"|\bfinal[ \t]+answer{_TO_THE_PROBLEM}"
    r"(?:[ \t]+is\b[ \t]*:?|[ \t*]*:|(?=[ \t*]*(?:\n|\$|\\[(\[]|-?\d)))[ \t*]*",
    re.IGNORECASE)
_CHAT_TOKEN = re.compile(r"<\|[\w.-]{1,40}\|>|</s>")  # <|im_end|>, <|eot_id|>, </s> left in a completion
# What may stand between boxes that together give one answer: "\boxed{2} and \boxed{3}",
# "x = \boxed{1}, y = \boxed{2}", "$\boxed{2}$ or $\boxed{-1}$".
_DELIMITERS = r"(?:\s|\$|\\[\[\]()])*"
_BOX_JOINER = re.compile(rf"{_DELIMITERS}(?:[,;]|and|or|\\q?quad|\\text\{{\s*(?:and|or)\s*\}})?[\s,]*"
                         rf"{_DELIMITERS}(?:[a-zA-Z](?:_\{{?\w+\}}?)?\s*=\s*)?{_DELIMITERS}")
_BOX_RUN_CHARS = 300  # a box of a run starts at most this far before the next one
_NAME_BEFORE_BOX = re.compile(r"([a-zA-Z](?:_\{?\w+\}?)?)\s*=\s*(?:\$|\\[\[(])?\s*$")
# Where the answer after a phrase stops: the end of its sentence, or a clause that explains it
# ("The answer is 5. Let me know...", "the answer is 12, which is...").
_SENTENCE_END = re.compile(  # (?<!...): a long blank run is tried once, not from each of its blanks
    r"(?<=\S)[.!?]\s+(?=[A-Z])|(?<![\s,]),?\s+(?:which|because|since|as|so|where)\b")


def _matching_brace(text: str, open_index: int, stop: int | None = None) -> int | None:
    """Index of the `}` closing the `{` at open_index (escaped `\\{`, `\\}` are skipped), or None
    when it does not close before `stop` (the end of the text by default)."""
    depth = 0
    i = open_index
    stop = len(text) if stop is None else stop
    while i < stop:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_argument(text: str, start: int, stop: int | None = None) -> tuple[str | None, int]:
    """The argument of a `\\boxed` whose name ends at `start`, and where it ends: `{...}` with
    balanced (nested) braces, or `\\boxed 7` up to the next space or `$`. None when the braces do
    not close before `stop`."""
    rest = text[start:] if stop is None else text[start:stop]
    stripped = rest.lstrip(" ")
    if stripped.startswith("{"):
        open_index = start + len(rest) - len(stripped)
        close_index = _matching_brace(text, open_index, stop)
        return (None, start) if close_index is None else (text[open_index + 1 : close_index], close_index + 1)
    if len(stripped) < len(rest):
        word = re.match(r"[^\s$]+", stripped)
        if word:
            return word.group(0), start + len(rest) - len(stripped) + word.end()
    return None, start


def _clean_extracted(answer: str | None) -> str | None:
    """Drop chat tokens, math delimiters, bold marks, the Minerva sign-off and a trailing period; None
    when nothing is left.

    String methods rather than regular expressions anchored at the end: `\\$+$` retries at every
    `$` of a long run, which is quadratic on model output."""
    if answer is None:
        return None
    if "<" in answer:
        answer = _CHAT_TOKEN.sub("", answer)
    answer = answer.strip().strip("*").strip()
    for sign_off in ("I hope it is correct.", "I hope it is correct"):
        if answer.endswith(sign_off):
            answer = answer[: -len(sign_off)].strip()
            break
    answer = answer.lstrip("$")
    end = len(answer.rstrip("$"))
    if 0 < end < len(answer) and answer[end - 1] == "\\":  # \$ is a dollar sign, not a delimiter
        end += 1
    answer = answer[:end].strip().rstrip(".").strip()
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(opener) and answer.endswith(closer):
            answer = answer[len(opener) : -len(closer)].strip()
    answer = answer.rstrip(".").strip().strip("*").strip()  # **17**.
    return answer or None


def _boxed_answer(text: str, boxes: list[re.Match]) -> tuple[str | None, int]:
    """The answer of the last box, and where that box ends. Boxes written one after another with
    only "and", "or", a comma or a variable between them are one answer split over several boxes
    (a solution set boxed one value at a time, "x = \\boxed{1}, y = \\boxed{2}"): their values are
    joined into a list, with the variables when each box has its own; the same value boxed twice
    in a row is said once."""
    answer, end = _box_argument(text, boxes[-1].end())
    values = [_clean_extracted(answer)]
    following = boxes[-1].start()
    if values[0] is None or len(boxes) == 1 or boxes[-2].end() < following - _BOX_RUN_CHARS:
        return values[0], end  # the common case: one box, or boxes far apart
    starts = [following]
    for box in reversed(boxes[:-1]):
        if box.end() < following - _BOX_RUN_CHARS:
            break
        argument, box_end = _box_argument(text, box.end(), stop=following)
        value = _clean_extracted(argument)
        if value is None or following - box_end > 40 or not _BOX_JOINER.fullmatch(text, box_end, following):
            break
        values.append(value)
        following = box.start()
        starts.append(following)
    if len(set(values)) == 1:
        return values[0], end
    values.reverse()
    names = [_NAME_BEFORE_BOX.search(text, max(0, start - 30), start) for start in reversed(starts)]
    names = [name.group(1) if name else None for name in names]
    if None not in names and len(set(names)) == len(names):
        return ", ".join(f"{name} = {value}" for name, value in zip(names, values)), end
    return ", ".join(values), end


_PHRASE_LEAD = 200  # a phrase starts at most this far before its word "answer"


def _last_phrase(text: str, start: int = 0) -> re.Match | None:
    """The last answer phrase from `start` on. The expression runs from just before the first
    "answer" only: on a 1 MB completion without one this costs ~1 ms instead of ~100."""
    found = [i for i in (text.find("nswer", start), text.find("NSWER", start)) if i >= 0]
    if not found:
        return None
    last = None
    for last in _ANSWER_PHRASE.finditer(text, max(start, min(found) - _PHRASE_LEAD)):
        pass
    return last


def _phrase_answer(text: str, phrase: re.Match) -> str | None:
    """The answer after "The answer is" (and its variants): the first `$...$`, `\\(...\\)` or
    `\\[...\\]` right after it, else the rest of its sentence; on the next line after a heading."""
    start = phrase.end()
    if text.startswith("\n", start) or text.startswith("\r", start):
        start = len(text) - len(text[start:].lstrip())
    rest = text[start : start + MAX_ANSWER_CHARS + 100].lstrip(" \t*")
    if rest.startswith("$"):
        inline = re.match(r"\$+((?:\\\$|[^$])*)\$", rest)  # \$ inside is a dollar sign
        return _clean_extracted(inline.group(1) if inline else None)
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            close = rest.find(closer)
            return _clean_extracted(rest[2:close] if close > 0 else None)
    line = rest.split("\n", 1)[0]
    sentence_end = _SENTENCE_END.search(line)
    return _clean_extracted(line[: sentence_end.start()] if sentence_end else line)


def _looks_like_an_answer(text: str) -> bool:
    """A number, a formula or a choice letter, not a word ("I hope the answer is clear")."""
    return re.search(r"[\d\\^=+/-]", text) is not None or re.fullmatch(r"\(?[A-Za-z]\)?", text) is not None


def extract_answer(text: str, closing_statement: bool = False) -> str | None:
    """The final answer of a model completion, or None when it gives none.

    In order of preference: the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed 7` (several boxes
    written one after another give their values together), unless a "The answer is X" after it
    corrects it; else the last `<answer>...</answer>`; else the last "The answer is X" / "The final
    answer is X" / "Final Answer: X"; else GSM8K's last `#### X`. An empty box, or a last box whose
    braces never close (a cut-off completion), gives None.

    `closing_statement`: else the answer a last line states with no marker ("So the total is $42$.").
    Only for evaluation protocols whose upstream extraction falls back to such text; an RL reward
    that accepted it would pay for answers the prompt never asked to mark.
    """
    if not isinstance(text, str) or not text:
        return None
    boxes = list(BOX_COMMAND.finditer(text))
    if boxes:
        answer, end = _boxed_answer(text, boxes)
        restatement = _last_phrase(text, end) if answer is not None else None
        if restatement:  # "\boxed{5} ... wait, that double counts: the answer is 4"
            restated = _phrase_answer(text, restatement)
            if restated is not None and _looks_like_an_answer(restated):
                return restated
        return answer

    close_tag = text.rfind("</answer>")
    open_tag = text.rfind("<answer>", 0, close_tag) if close_tag >= 0 else -1
    if open_tag >= 0:
        return _clean_extracted(text[open_tag + len("<answer>") : close_tag])

    phrase = _last_phrase(text)
    if phrase:
        return _phrase_answer(text, phrase)

    hashes = text.rfind("####")
    if hashes >= 0:
        return _clean_extracted(text[hashes + 4 :].split("\n", 1)[0])
    return _closing_statement(text) if closing_statement else None


_INLINE_MATH = re.compile(r"\$+((?:\\\$|[^$])+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_STATED = re.compile(r"\b(?:is|are|equals|be)\s+|=\s*")


def _closing_statement(text: str) -> str | None:
    """The answer of the last of the final three lines that holds a number or math, with no marker:
    the last `$...$`, `\\(...\\)` or `\\[...\\]` that ends on it, or the line itself when it is only
    math (the side after the last `=` of either); else what follows its last "is" / "=" / "equals"
    up to the first word ("is 42 apples." gives 42)."""
    tail = text[-2000:].rstrip()
    line_end = len(tail)
    for _ in range(3):
        line_start = tail.rfind("\n", 0, line_end) + 1
        if re.search(r"[\d$\\]", tail[line_start:line_end]):
            break
        line_end = max(0, line_start - 1)
    else:
        return None
    line = tail[line_start:line_end].strip(" \t*#>")
    maths = list(_INLINE_MATH.finditer(tail, 0, line_end))
    if maths and maths[-1].end() > line_start:  # "Hence $m + n = 19$." states 19
        return _clean_extracted(_split_top_level(next(g for g in maths[-1].groups() if g is not None), "=")[-1])
    prose = re.sub(r"\\[a-zA-Z]+|\\text\{[^{}]*\}", "", line)
    if not re.search(r"[a-zA-Z]{2,}", prose):
        return _clean_extracted(_split_top_level(line, "=")[-1])
    stated = None
    for stated in _STATED.finditer(line):
        pass
    if stated is None:
        return None
    value = re.split(r"\s+(?=[a-zA-Z]{2,}\b)", line[stated.end():].rstrip(".!").strip(), maxsplit=1)[0]
    return _clean_extracted(value) if re.search(r"[\d\\]", value) else None


# ---------------------------------------------------------------------------------------------
# 2. Normalisation
# ---------------------------------------------------------------------------------------------

_UNICODE = {"\u2212": "-", "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u03c0": "\\pi ",
            "\u221a": "\\sqrt", "\u221e": "\\infty ", "\u00b0": "", "\u2264": "\\le ", "\u2265": "\\ge ",
            "\u2248": "\\approx ", "\u27e8": "\\langle ", "\u27e9": "\\rangle ",
            "\u00a0": " ", "\u2009": " ", "\u202f": " "}
_TEXT_COMMAND = r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox)\s*"
_UNIT_WORDS = (
    "units?|square units|sq units|cubic units|cm|centimeters?|mm|millimeters?|meters?|km|kilometers?|"
    "inches|inch|in|feet|foot|ft|yards?|miles?|mph|km/h|degrees?|radians?|cents?|dollars?|"
    "seconds?|sec|minutes?|min|hours?|hrs?|days?|weeks?|months?|years?|people|students|ways"
)
_TRAILING_UNIT = re.compile(rf"(?<=[\d}}).])\s+(?:{_UNIT_WORDS})(?:\s*\^\s*\{{?[23]\}}?)?\s*$")
_TEXT_UNIT = re.compile(rf"(?<=[\d}}).])\s*{_TEXT_COMMAND}\{{\s*[a-zA-Z][a-zA-Z. /]+\}}(?:\s*\^\s*\{{?[23]\}}?)?")
_TEXT_AND_OR = re.compile(rf"{_TEXT_COMMAND}\{{\s*(and|or)\s*\}}")
_TEXT_WRAPPED = re.compile(rf"{_TEXT_COMMAND}\{{([^{{}}]*)\}}")
# digit groups: 1,000,000; the Indian 10,00,000; 1'000'000; 1_000_000; 1.000.000 (two or more dots)
_DIGIT_GROUPS = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d{1,2}(?:,\d{2})+,\d{3}|\d{1,3}(?:'\d{3})+"
                           r"|\d{1,3}(?:_\d{3})+)(?:\.\d+)?|-?\d{1,3}(?:\.\d{3}){2,}")
_MIXED_NUMBER = re.compile(r"(^|=)\s*(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")
_PERCENT_WORD = re.compile(  # 25 percent, 25 per cent, 25 pct., 25 \text{ Percent}
    r"(?<=[\d}.])\s*(?:\\(?:text|textrm|mathrm|mbox)\s*\{\s*(?:per[\s-]*cent|pct\.?)\s*\}"
    r"|per[\s-]*cent\b|pct\b\.?)",
    re.IGNORECASE)
_E_NOTATION = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?|\.\d+)[eE]([-+]?\d{1,3})(?![\w.])")  # 1.5e3, 2E-4
_ARRAY = re.compile(r"^[(\[]?\\begin\{array\}\{[lcr| ]*\}(.*)\\end\{array\}[)\]]?$")
# (\begin{matrix} ... \end{matrix}) is the matrix, not a tuple holding it
_WRAPPED_MATRIX = re.compile(r"^[(\[]\s*(\\begin\{([pbBv]?matrix)\}.*\\end\{\2\})\s*[)\]]$")
# JSON-escaped LaTeX (a string written out by json.dumps): every backslash doubled, as in \\frac
_JSON_ESCAPED = re.compile(
    r"\\\\(?:[dt]?frac|sqrt|pi|cdot|times|text|left|right|[lg]eq?|infty|begin|end|pm|circ)(?![a-zA-Z])")
# clock times: 03:45 is 3:45, "3:45 PM", "3:45 \text{ p.m.}" and "3:45pm" are one spelling
_TIME = re.compile(r"(?<!\d)0?(\d{1,2}):(\d{2})"
                   r"(?:\s*(\\(?:text|mathrm|textrm|mbox)\s*\{\s*)?([aApP])\.?\s*[mM]\.?(?(3)\s*\}))?(?!\d)")


def _strip_outer_braces(s: str) -> str:
    """{{ 3 }} -> 3, in one pass: match every brace once, then peel the pairs that enclose the rest
    (peeling one level per rescan is quadratic: 20,000 levels took 40 s)."""
    if not s.startswith("{"):
        return s
    closing, opened, i = {}, [], 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == "{":
            opened.append(i)
        elif s[i] == "}" and opened:
            closing[opened.pop()] = i
        i += 1
    start, end = 0, len(s)  # s[start:end] is what is left
    while start < end and s[start] == "{" and closing.get(start) == end - 1:
        start, end = start + 1, end - 1
        while start < end and s[start].isspace():
            start += 1
        while start < end and s[end - 1].isspace():
            end -= 1
    return s[start:end]


def _improper_fraction(mixed: re.Match) -> str:
    start, sign, whole, numerator, denominator = mixed.groups()
    return f"{start}{sign}\\frac{{{int(whole) * int(denominator) + int(numerator)}}}{{{denominator}}}"


def _expand_e_notation(number: re.Match) -> str:
    """1.5e3 -> 1500 (a plain number, so no sympy needed); huge exponents -> 1.5\\times10^{300}."""
    mantissa, exponent = number.group(1), int(number.group(2))
    if abs(exponent) > 50:
        return f"{mantissa}\\times10^{{{exponent}}}"
    return format(Decimal(mantissa).scaleb(exponent), "f")


def _unescape_json(s: str) -> str:
    """`\\\\frac{1}{2}` -> `\\frac{1}{2}`: an answer whose backslashes all come in pairs, one of them
    before a command name, was JSON-escaped (a LaTeX row break `\\\\` sits beside single backslashes)."""
    if "\\\\" not in s or not _JSON_ESCAPED.search(s):
        return s
    if any(len(run) % 2 for run in re.findall(r"\\+", s)):
        return s
    return s.replace("\\\\", "\\")


def _clock_time(time_of_day: re.Match) -> str:
    hour, minute, _, meridiem = time_of_day.groups()
    return f"{hour}:{minute}" + (f"{meridiem.lower()}m" if meridiem else "")


def _approximation(s: str) -> str:
    """For answers stated as approximately equal. `x \\approx 2.5` names its value as `x = 2.5`
    does; `\\sqrt{2} \\approx 1.414` gives an exact value and a rounding of it: the exact one is
    the answer; a bare `\\approx 2.5` is 2.5."""
    sides = [side.strip() for side in re.split(r"\\approx(?![a-zA-Z])", s)]
    if len(sides) != 2:
        return s
    if not sides[0] or _NAME.fullmatch(sides[0]) or _LABEL.fullmatch(sides[0]):
        return sides[1]
    return sides[0]


def _alternatives(s: str) -> str:
    """For solutions joined by "or": `x = 1 or x = 2` is the list 1, 2; `x < -2 or x > 3` is the
    union of the two intervals."""
    pieces = [piece.strip() for piece in re.split(r"(?<=\S)\s+or\s+(?=\S)", s)]
    if len(pieces) < 2:
        return s
    if all(_RELATION.search(piece) for piece in pieces):
        return "\\cup ".join(pieces)
    return ", ".join(pieces)


def normalize_answer(answer: str) -> str:
    """The answer with spelling that does not change its value removed (see the steps below)."""
    s = _unescape_json(str(answer).strip())
    if BOX_COMMAND.search(s):
        s = extract_answer(s) or ""
    for char, replacement in _UNICODE.items():
        s = s.replace(char, replacement)
    s = s.replace("\n", " ").replace("\\$", "").replace("$", "")
    # (each substitution runs only where its text occurs: a test of `in` costs a tenth of a search)
    if "style" in s:
        s = re.sub(r"\\(?:displaystyle|textstyle)", "", s)
    if "frac" in s:
        s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    if "binom" in s:
        s = re.sub(r"\\[dt]binom", r"\\binom", s)
    # delimiter sizing: \left( \right] \bigl( ... keep the delimiter, \left. means "no delimiter"
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])\s*\.?", "", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    if "vert" in s or "mid" in s:
        s = re.sub(r"\\[lr]?vert(?![a-zA-Z])|\\mid(?![a-zA-Z])", "|", s)
    s = re.sub(r"\\(?:geqslant|geq)(?![a-zA-Z])|>=", r"\\ge ", s)
    s = re.sub(r"\\(?:leqslant|leq)(?![a-zA-Z])|<=", r"\\le ", s)
    # \begin{array}{cc} ... \end{array}, with or without \left( \right), is a matrix
    if "array" in s:
        s = _ARRAY.sub(r"\\begin{matrix}\1\\end{matrix}", s.strip())
    if "matrix" in s:
        s = _WRAPPED_MATRIX.sub(r"\1", s.strip())
    if "angle" in s:  # the vector \langle 1, 2 \rangle is the tuple (1, 2)
        s = re.sub(r"\\[lr]angle(?![a-zA-Z])", lambda bracket: "(" if bracket.group(0)[1] == "l" else ")", s)
    # thousands separators written 10,\!080
    if ",\\!" in s:
        s = re.sub(r",\\!\s*(?=\d{3}(?!\d))", ",", s)
    s = s.replace("{,}", ",")
    # spacing commands (a `\ ` right after a `\\` row break is not one)
    s = re.sub(r"\\[!,;:>]|\\q?quad(?![a-zA-Z])|(?<!\\)\\ |~", " ", s)
    # degrees, percent and dollar signs
    if "circ" in s:
        s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])", "", s)
    s = s.replace("\\%", "").replace("%", "")
    lowered = s.lower()
    if "cent" in lowered or "pct" in lowered:  # 25 percent, 25 \text{ per cent}, 25 pct
        s = _PERCENT_WORD.sub("", s)
    if ":" in s:
        s = _TIME.sub(_clock_time, s)
    if "approx" in s:
        s = _approximation(s)
    # words: "x \text{ or } y" is a list, units after a number go, other \text{X} becomes X
    s = _TEXT_AND_OR.sub(r" \1 ", s)
    s = _TEXT_UNIT.sub("", s)
    s = _TEXT_WRAPPED.sub(r"\1", s)
    # "2 and 3", "1, 2, and 3", "1; 2; 3" are lists too ((?<!...): a long blank run is tried once)
    if "and" in s:
        s = re.sub(r"(^|,)\s*and\s+", r"\1", s)
        s = re.sub(r"(?<![\s,])\s+and\s+", ", ", s)
    if " or " in s:
        s = _alternatives(s)
    s = s.replace(";", ", ")
    s = _TRAILING_UNIT.sub("", s)
    s = s.strip()
    if "\\inf" in s:
        s = re.sub(r"\\inf(?![a-zA-Z])", r"\\infty", s)
    if "\\" in s:
        s = re.sub(r"\\(?:emptyset|varnothing)(?![a-zA-Z])|^\\\{\s*\\\}$", r"\\emptyset", s)
    if "\\in" in s:
        s = re.sub(r"^[a-zA-Z]\s*\\in(?![a-zA-Z])", "", s).strip()  # "x \in [-2, 7]"
    s = s.rstrip(". ").strip()
    if _DIGIT_GROUPS.fullmatch(s):
        s = re.sub(r"[,'_]", "", s) if s.count(".") < 2 else s.replace(".", "")
    s = _E_NOTATION.sub(_expand_e_notation, s)
    # \frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}, a_{1} -> a_1
    if "\\frac" in s:
        s = re.sub(r"\\frac\s*([0-9a-zA-Z])", r"\\frac{\1}", s)
        s = re.sub(r"\\frac\{([^{}]*)\}\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    if "\\sqrt" in s:
        s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    if "_{" in s:
        s = re.sub(r"_\{(\w)\}", r"_\1", s)
    # 1\frac{4}{5} is the mixed number 9/5, not a product
    s = _MIXED_NUMBER.sub(_improper_fraction, s)
    # whitespace carries no meaning except between a command and a letter (\cot x)
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"(\\[a-zA-Z]+) (?=[a-zA-Z])", "\\1\x00", s).replace(" ", "").replace("\x00", " ")
    s = _strip_outer_braces(s)
    choice = re.fullmatch(r"\(([A-E])\)", s)  # choice letters: (B) is B
    return choice.group(1) if choice else s


# ---------------------------------------------------------------------------------------------
# 3. LaTeX -> sympy
# ---------------------------------------------------------------------------------------------


class ConversionError(ValueError):
    """A LaTeX expression the converter does not read, or refuses to evaluate (too large)."""


_TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+|\\[a-zA-Z]+|\\[{}|]|[a-zA-Z]|[-+*/^_()\[\]{}|!,='])")
_FUNCTIONS = {"\\sin": "sin", "\\cos": "cos", "\\tan": "tan", "\\cot": "cot", "\\sec": "sec",
              "\\csc": "csc", "\\arcsin": "asin", "\\arccos": "acos", "\\arctan": "atan",
              "\\sinh": "sinh", "\\cosh": "cosh", "\\tanh": "tanh", "\\ln": "log", "\\log": "log",
              "\\exp": "exp"}
_GREEK = {"\\alpha", "\\beta", "\\gamma", "\\delta", "\\epsilon", "\\varepsilon", "\\zeta", "\\eta",
          "\\theta", "\\vartheta", "\\kappa", "\\lambda", "\\mu", "\\nu", "\\xi", "\\rho", "\\sigma",
          "\\tau", "\\phi", "\\varphi", "\\chi", "\\psi", "\\omega", "\\Gamma", "\\Delta", "\\Theta",
          "\\Lambda", "\\Sigma", "\\Phi", "\\Psi", "\\Omega"}
_ATOM_COMMANDS = {"\\frac", "\\sqrt", "\\binom", "\\pi", "\\infty", "\\lfloor", "\\lceil"}
_CLOSING = {"(": ")", "[": "]", "{": "}", "|": "|", "\\lfloor": "\\rfloor", "\\lceil": "\\rceil"}


def _tokenize(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ConversionError(f"cannot read {text[position:position + 10]!r}")
        tokens.append(match.group(1))
        position = match.end()
        if len(tokens) > MAX_TOKENS:
            raise ConversionError("expression too long")
    return tokens


def _is_number_token(token: str | None) -> bool:
    return token is not None and (token[0].isdigit() or token[0] == ".")


class _LatexToSympy:
    """Recursive descent over the LaTeX of one scalar answer.

    expression := term (('+' | '-') term)*
    term       := signed (('*' | '\\cdot' | '\\times' | '/' | '\\div') signed | power)*
    signed     := ('+' | '-')* power
    power      := atom '!'* ('^' exponent)?
    atom       := number | letter (subscript)? | greek | \\pi | \\infty | (expr) | {expr} | |expr|
                | \\frac a b | \\sqrt[n] a | \\binom a b | \\lfloor expr \\rfloor | function argument
    A letter next to a number or a bracket multiplies it; `e` is Euler's number, `i` is sqrt(-1).
    """

    def __init__(self, text: str):
        import sympy

        self.sp = sympy
        self.tokens = _tokenize(text)
        self.position = 0
        self.depth = 0

    def convert(self):
        if not self.tokens:
            raise ConversionError("empty expression")
        value = self.expression()
        if self.position != len(self.tokens):
            raise ConversionError(f"unexpected {self.peek()!r}")
        if value.has(self.sp.zoo, self.sp.nan):
            raise ConversionError("undefined value (a division by zero?)")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ConversionError("expression ends too early")
        self.position += 1
        return token

    def expect(self, token: str) -> None:
        if self.take() != token:
            raise ConversionError(f"expected {token!r}")

    def starts_atom(self, token: str | None) -> bool:
        return token is not None and (
            _is_number_token(token) or token.isalpha() or token in ("(", "{")
            or token in _ATOM_COMMANDS or token in _GREEK or token in _FUNCTIONS)

    def expression(self):
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ConversionError("nested too deeply")
        try:
            value = self.term()
            while self.peek() in ("+", "-"):
                value = value + self.term() if self.take() == "+" else value - self.term()
            return value
        finally:
            self.depth -= 1

    def term(self):
        value = self.signed()
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times", "\\ast"):
                self.take()
                value = value * self.signed()
            elif token in ("/", "\\div"):
                self.take()
                value = value / self.signed()
            elif self.starts_atom(token):
                value = value * self.power()
            else:
                return value

    def signed(self):
        negative = False
        while self.peek() in ("+", "-"):
            negative ^= self.take() == "-"
        value = self.power()
        return -value if negative else value

    def power(self):
        value = self.atom()
        while self.peek() == "!":
            self.take()
            value = self.factorial(value)
        if self.peek() == "^":
            self.take()
            value = self.raise_to(value, self.exponent())
        return value

    def exponent(self):
        if self.peek() in ("-", "+"):
            return -self.exponent() if self.take() == "-" else self.exponent()
        return self.argument()

    def argument(self):
        """A macro argument: a {group}, or one character (x^23 is x^2 * 3, \\frac12 is 1/2)."""
        token = self.peek()
        if _is_number_token(token) and len(token) > 1:
            self.tokens[self.position] = token[1:]
            return self.number(token[0])
        return self.atom()

    def number(self, token: str):
        if len(token) > 400:
            raise ConversionError("number too long")
        return self.sp.Rational(token)

    def atom(self):
        sp = self.sp
        token = self.take()
        if _is_number_token(token):
            return self.number(token)
        if token in ("(", "[", "{", "|", "\\lfloor", "\\lceil"):
            value = self.expression()
            self.expect(_CLOSING[token])
            wrap = {"|": sp.Abs, "\\lfloor": sp.floor, "\\lceil": sp.ceiling}.get(token)
            return wrap(value) if wrap else value
        if token == "\\frac":
            numerator = self.argument()
            return numerator / self.argument()
        if token == "\\binom":
            n = self.argument()
            return self.binomial(n, self.argument())
        if token == "\\sqrt":
            index = sp.Integer(2)
            if self.peek() == "[":
                self.take()
                index = self.expression()
                self.expect("]")
            return self.raise_to(self.argument(), 1 / index)
        if token == "\\pi":
            return sp.pi
        if token == "\\infty":
            return sp.oo
        if token in _FUNCTIONS:
            return self.function(token)
        if token in _GREEK or token.isalpha():
            name = token.lstrip("\\")
            if self.peek() == "_":
                self.take()
                return sp.Symbol(f"{name}_{self.subscript()}")
            if token == "e":
                return sp.E
            if token == "i":
                return sp.I
            return sp.Symbol(name)
        raise ConversionError(f"unsupported {token!r}")

    def subscript(self) -> str:
        if self.peek() != "{":
            return self.take()
        self.take()
        parts = []
        while self.peek() != "}":
            parts.append(self.take().lstrip("\\"))
        self.take()
        return "".join(parts)

    def function(self, token: str):
        """\\sin x, \\sin(x), \\sin^2 x, \\log_{2} 8, \\ln 2; a bare argument runs to the next
        operator or function (\\sin 2x is sin(2x))."""
        sp = self.sp
        base = None
        if self.peek() == "_":
            self.take()
            base = self.argument()
        power = None
        if self.peek() == "^":
            self.take()
            power = self.exponent()
        if self.peek() == "(":
            self.take()
            argument = self.expression()
            self.expect(")")
        else:
            argument = self.power()
            while self.starts_atom(self.peek()) and self.peek() not in _FUNCTIONS:
                argument = argument * self.power()
        function = getattr(sp, _FUNCTIONS[token])
        value = function(argument, base) if base is not None and token == "\\log" else function(argument)
        return value if power is None else self.raise_to(value, power)

    # Guards: refuse what would take sympy (or Python's integers) unbounded time or memory.
    def raise_to(self, base, exponent):
        if base.is_number and exponent.is_number:
            try:
                magnitude, size = abs(complex(base)), abs(complex(exponent))
            except (OverflowError, TypeError, ValueError):
                raise ConversionError("power too large") from None
            if magnitude > 0 and size * abs(math.log10(magnitude)) > MAX_DIGITS:
                raise ConversionError("power too large")
        elif exponent.is_number and exponent.is_real and abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise ConversionError("power too large")
        return self.sp.Pow(base, exponent)

    def factorial(self, value):
        if value.is_number and not (value.is_Integer and 0 <= value <= MAX_FACTORIAL):
            raise ConversionError("factorial of a large or non-integer number")
        return self.sp.factorial(value)

    def binomial(self, n, k):
        if n.is_number and not (n.is_Integer and abs(n) <= MAX_DIGITS):
            raise ConversionError("binomial of a large or non-integer number")
        return self.sp.binomial(n, k)


def latex_to_sympy(text: str):
    """The sympy value of a scalar LaTeX expression; ConversionError when it cannot be read."""
    return _LatexToSympy(text).convert()


# ---------------------------------------------------------------------------------------------
# 4. Equivalence
# ---------------------------------------------------------------------------------------------
# The main process does everything that needs no sympy: normalisation, structure (tuples,
# intervals, sets, matrices), plain numbers. Only scalar pairs it cannot decide go to sympy.

_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(
    rf"([-+]?)(?:({_DECIMAL})|\\frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}}|({_DECIMAL})/({_DECIMAL}))")
_NAME = re.compile(r"[a-zA-Z](?:_\{?[\w\\]+\}?)?(?:\([a-zA-Z,]*\))?|\\[a-zA-Z]+(?:_\{?\w+\}?)?"
                   r"|\([a-zA-Z](?:,[a-zA-Z])*\)")
# Left sides that name a quantity rather than a variable: a segment AB or \overline{AB}, an angle
# \angle ABC, an area [ABC], a word (area = 12), a ratio AB:BC, AB/BC or \frac{AB}{BC}
_LABEL = re.compile(r"[A-Z]{2,4}|\\overline\{?[A-Z]{2}\}?|m?\\angle ?\{?[A-Z]{1,3}\}?|\[[A-Z]{3,}\]"
                    r"|[a-zA-Z]{3,}|[A-Z]{1,4}(?::[A-Z]{1,4})+|[A-Z]{1,4}/[A-Z]{1,4}"
                    r"|\\frac\{[A-Z]{1,4}\}\{[A-Z]{1,4}\}")
_RATIO = re.compile(rf"({_DECIMAL}):({_DECIMAL})")
_MATRIX = re.compile(r"\\begin\{([pbBv]?matrix|smallmatrix)\}(.*)\\end\{\1\}", re.DOTALL)
_PLUS_MINUS = re.compile(r"\\(pm|mp)(?![a-zA-Z])")


def _plain_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, written as a decimal) for an integer, decimal or integer fraction; else None."""
    match = _PLAIN_NUMBER.fullmatch(s)
    if match is None or len(s) > 60:
        return None
    sign, single, *pairs = match.groups()
    if single is not None:
        value = Fraction(single)
    else:
        numerator, denominator = (pairs[0], pairs[1]) if pairs[0] is not None else (pairs[2], pairs[3])
        if Fraction(denominator) == 0:
            return None
        value = Fraction(numerator) / Fraction(denominator)
    return (-value if sign == "-" else value), "." in s


def _terminates(value: Fraction) -> bool:
    """Does value have a finite decimal expansion (denominator 2^a 5^b)?"""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _plain_numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    (x, x_decimal), (y, y_decimal) = a, b
    if x == y:
        return True
    # a decimal can only be a rounding of a value with no finite decimal expansion (1/3 ~ 0.3333)
    if (x_decimal and not _terminates(y)) or (y_decimal and not _terminates(x)):
        return math.isclose(x, y, rel_tol=ROUNDED_REL_TOL)
    return False


def _split_top_level(s: str, separator: str) -> list[str]:
    """s split at separators outside every bracket pair ( ) [ ] { }; mixed pairs like [0,1) count."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            i += len(separator)
            start = i
            continue
        depth += (s[i] in "([{") - (s[i] in ")]}")
        i += 1
    parts.append(s[start:])
    return parts


def _encloses(s: str, open_index: int) -> bool:
    """Does the bracket at open_index close at the last character of s?"""
    depth = 0
    for i in range(open_index, len(s)):
        depth += (s[i] in "([{") - (s[i] in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


_RELATION = re.compile(r"(<|>|\\[lg]e(?![a-zA-Z]))")


_FLIPPED = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le"}


def _negated(s: str) -> str:
    if s.startswith("-") and len(_split_top_level(s[1:], "+")) == len(_split_top_level(s[1:], "-")) == 1:
        return s[1:]
    return f"-{s}" if _plain_number(s) or s == "\\infty" else f"-({s})"


def _relation_parts(s: str) -> list[str]:
    """The sides and relations of an inequality, with a negated variable multiplied through by -1:
    `-x > -2` is `x < 2`, `2 > -x > -3` is `-2 < x < 3`."""
    parts = [part.strip() for part in _RELATION.split(s)]
    if len(parts) in (3, 5) and any(re.fullmatch(r"-[a-zA-Z]", part) for part in parts[::2]):
        parts = [_FLIPPED[part] if i % 2 else _negated(part) for i, part in enumerate(parts)]
    return parts


def _inequality_as_interval(s: str) -> str:
    """`a < x \\le b` -> `(a,b]`, `x > a` -> `(a,\\infty)`, `x \\le b` -> `(-\\infty,b]`; other
    text unchanged. The variable must be a single letter."""
    parts = _relation_parts(s)
    is_variable = functools.partial(re.fullmatch, r"[a-zA-Z]")
    opening = {"<": "(", "\\le": "[", ">": "(", "\\ge": "["}
    closing = {"<": ")", "\\le": "]", ">": ")", "\\ge": "]"}
    if len(parts) == 5 and is_variable(parts[2]):
        low, first, _, second, high = parts
        if {first, second} <= {"<", "\\le"}:
            return f"{opening[first]}{low},{high}{closing[second]}"
        if {first, second} <= {">", "\\ge"}:
            return f"{opening[second]}{high},{low}{closing[first]}"
    if len(parts) == 3 and (is_variable(parts[0]) or is_variable(parts[2])):
        left, relation, right = parts
        if is_variable(right):  # 2 < x is x > 2
            left, right = right, left
            relation = _FLIPPED[relation]
        if relation in ("<", "\\le"):
            return f"(-\\infty,{right}{closing[relation]}"
        return f"{opening[relation]}{right},\\infty)"
    return s


def _inequality_variable(s: str) -> str | None:
    parts = _relation_parts(s)
    letters = [part for part in parts[::2] if re.fullmatch(r"[a-zA-Z]", part)]
    return letters[0] if len(parts) in (3, 5) and len(letters) == 1 else None


def _structure(s: str):
    """The shape of a normalised answer, as nested tuples:
    ("scalar", text) | ("sequence", brackets, items) for tuples and intervals (order and brackets
    matter) | ("set", items) for \\{...\\} and ("list", items) for bare comma lists and
    a \\pm b (order does not matter) | ("union", items) for A \\cup B | ("matrix", rows)."""
    members = _split_top_level(s, "\\cup")
    if len(members) > 1:
        return ("union", [_structure(m) for m in members])
    s = _inequality_as_interval(s)
    matrix = _MATRIX.fullmatch(s)
    if matrix:
        rows = [row.split("&") for row in re.split(r"\\\\", matrix.group(2)) if row.strip()]
        if all(len(row) == 1 for row in rows):  # a column vector reads as the tuple (a, b, c)
            return ("sequence", "()", [("scalar", row[0]) for row in rows])
        return ("matrix", rows)
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s, 1):
        return ("set", _set_items(_split_top_level(s[2:-2], ",")))
    if s[:1] in "([" and s[-1:] in ")]" and _encloses(s, 0):
        items = _split_top_level(s[1:-1], ",")
        if len(items) > 1:
            return ("sequence", s[0] + s[-1], [_structure(item) for item in items])
    items = _split_top_level(s, ",")
    if len(items) > 1:
        return ("list", _set_items(items))
    sign = _PLUS_MINUS.search(s)
    if sign:  # 1 \pm \sqrt{2} is the two answers 1 + \sqrt{2} and 1 - \sqrt{2}
        first, second = ("+", "-") if sign.group(1) == "pm" else ("-", "+")
        return ("list", _set_items([s[: sign.start()] + op + s[sign.end():] for op in (first, second)]))
    return ("scalar", s)


def _set_items(texts: list[str]) -> list:
    items = []
    for text in texts:
        item = _structure(text)
        items.extend(item[1] if item[0] == "list" else [item])  # {1 \pm 2, 5} has three members
    return items


def _split_equation(s: str) -> tuple[str, str] | None:
    sides = _split_top_level(s, "=")
    return (sides[0], sides[1]) if len(sides) == 2 and sides[0] and sides[1] else None


def _without_name(s: str) -> str:
    """`x = 3` -> `3`, `f(x) = 2x` -> `2x`, `(x,y) = (1,2)` -> `(1,2)`, `AB = 5` -> `5`; other text
    unchanged."""
    equation = _split_equation(s)
    if equation and (_NAME.fullmatch(equation[0]) or _LABEL.fullmatch(equation[0])):
        return equation[1]
    return s


def _is_word(s: str) -> bool:
    return re.fullmatch(r"[a-zA-Z]{3,}", s) is not None


def _scalars_equal(a: str, b: str, deadline: float) -> bool:
    if a == b:
        return True
    equation_a, equation_b = _split_equation(a), _split_equation(b)
    if equation_a and equation_b:
        if equation_a[0] == equation_b[0]:
            return _scalars_equal(equation_a[1], equation_b[1], deadline)
        return _in_sympy_helper("equations", a, b, deadline)
    a, b = _without_name(a), _without_name(b)
    if a == b:
        return True
    if "=" in a or "=" in b:
        return False
    number_a, number_b = _plain_number(a), _plain_number(b)
    if number_a and number_b:
        return _plain_numbers_equal(number_a, number_b)
    ratio = _RATIO.fullmatch(a) or _RATIO.fullmatch(b)
    if ratio and (number_a or number_b):  # the ratio 2:3 is the number 2/3
        return _plain_numbers_equal(number_a or number_b, _plain_number(f"{ratio.group(1)}/{ratio.group(2)}"))
    if _is_word(a) or _is_word(b):  # names and words ("Evelyn", "even"), not products of letters
        return a.lower() == b.lower()
    return _in_sympy_helper("expressions", a, b, deadline)


def _structures_equal(p, g, deadline: float) -> bool:
    if p[0] == "scalar" and g[0] == "scalar":
        return _scalars_equal(p[1], g[1], deadline)
    if p[0] == g[0] == "sequence":
        return p[1] == g[1] and len(p[2]) == len(g[2]) and all(
            _structures_equal(x, y, deadline) for x, y in zip(p[2], g[2]))
    if p[0] == g[0] == "matrix":
        return [len(row) for row in p[1]] == [len(row) for row in g[1]] and all(
            _scalars_equal(x, y, deadline) for pr, gr in zip(p[1], g[1]) for x, y in zip(pr, gr))
    if p[0] == g[0] == "union":
        return _multisets_equal(p[1], g[1], deadline)
    if {p[0], g[0]} <= {"set", "list", "scalar"}:  # {3} and 3 are the same answer
        ps, gs = (s[1] if s[0] != "scalar" else [s] for s in (p, g))
        if "set" in (p[0], g[0]):  # a set has no repeats: {1, 1, 2} is {1, 2}
            ps, gs = _distinct(ps), _distinct(gs)
        return _multisets_equal(ps, gs, deadline)
    # Named values, `x = 3, y = -2`, for the tuple (3, -2)
    if p[0] == "list" and g[0] == "sequence" and _assignments_as_tuple(p):
        return _structures_equal(_assignments_as_tuple(p), g, deadline)
    if g[0] == "list" and p[0] == "sequence" and _assignments_as_tuple(g):
        return _structures_equal(p, _assignments_as_tuple(g), deadline)
    # A list written in parentheses or brackets, (3, 5, 7) for 3, 5, 7, in the gold's order when
    # the gold is the tuple. Not with two items, which may be an interval.
    if p[0] == "sequence" and p[1] in ("()", "[]") and g[0] == "list" and len(p[2]) >= 3:
        return _multisets_equal(p[2], g[1], deadline)
    if g[0] == "sequence" and g[1] in ("()", "[]") and p[0] == "list" and len(g[2]) >= 3:
        return len(p[1]) == len(g[2]) and all(_structures_equal(x, y, deadline) for x, y in zip(p[1], g[2]))
    return False


def _distinct(items: list) -> list:
    return [item for i, item in enumerate(items) if item not in items[:i]]


def _name_order(name: str):
    """x before y, a_2 before a_10."""
    letter, _, subscript = name.partition("_")
    subscript = subscript.strip("{}")
    return (letter, int(subscript) if subscript.isdigit() else -1, subscript)


def _assignments_as_tuple(structure):
    """`x = 3, y = -2` as the tuple (3, -2), or None when not every item gives a distinct name a
    value. Single-letter names (with subscripts) go in alphabetical order, x before y, as the
    tuple (x, y) lists them; other labels (width = 4, length = 6) in the order written."""
    equations = [_split_equation(item[1]) if item[0] == "scalar" else None for item in structure[1]]
    if None in equations or not all(_NAME.fullmatch(left) or _LABEL.fullmatch(left) for left, _ in equations):
        return None
    names = [left for left, _ in equations]
    if len(set(names)) < len(names):
        return None
    if all(re.fullmatch(r"[a-zA-Z](?:_\{?\w+\}?)?", name) for name in names):
        equations.sort(key=lambda equation: _name_order(equation[0]))
    return ("sequence", "()", [_structure(value) for _, value in equations])


def _multisets_equal(ps: list, gs: list, deadline: float) -> bool:
    if len(ps) != len(gs):
        return False
    unmatched_p, unmatched_g = list(ps), list(gs)
    for item in ps:  # identical items first: cheap, and most lists are written the same way
        if item in unmatched_g:
            unmatched_g.remove(item)
            unmatched_p.remove(item)
    for item in unmatched_p:
        match = next((i for i, other in enumerate(unmatched_g)
                      if _structures_equal(item, other, deadline)), None)
        if match is None or time.monotonic() > deadline:  # quadratic in the items: keep it bounded
            return False
        del unmatched_g[match]
    return True


def _answer_text(answer) -> str | None:
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        return repr(answer)
    return answer if isinstance(answer, str) else None


_CHOICE_LABEL = re.compile(r"\(([A-E])\)|([A-E])[):]")


def _choice_label(s: str) -> str | None:
    """The letter of a normalised answer that starts with a choice label and goes on, as in
    "(B)12", "B)12" or "B:12"; else None. ("B.12" is not one: it may be a decimal.)"""
    label = _CHOICE_LABEL.match(s)
    return (label.group(1) or label.group(2)) if label and label.end() < len(s) else None


def _is_percent(text: str) -> bool:
    return "%" in text or _PERCENT_WORD.search(text) is not None


def is_equiv(pred: str | None, gold: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Are pred and gold the same final answer, by the conventions of MATH / Qwen2.5-Math grading?

    Never raises on bad input and returns within about `timeout` seconds: answers longer than
    MAX_ANSWER_CHARS are not equal to anything (checked first), normalisation is linear in the
    answer, and the remaining budget bounds the structure and sympy comparisons (plain numbers
    never reach sympy). Order of tuples and the brackets of intervals matter; order of sets and
    of comma-separated lists does not.
    """
    deadline = time.monotonic() + timeout
    pred, gold = _answer_text(pred), _answer_text(gold)
    if pred is None or gold is None or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    try:
        p, g = normalize_answer(pred), normalize_answer(gold)
        if not p or not g:
            return False
        if p == g:
            return True
        if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:  # \u00d7 grows into \\times
            return False
        if len(g) == 1 and _choice_label(p):  # "(B) 12" answers the choice "B"
            return _choice_label(p) == g
        if len(p) == 1 and _choice_label(g):
            return _choice_label(g) == p
        if len({_inequality_variable(p), _inequality_variable(g)} - {None}) == 2:
            return False  # m \\ge 2 is not k \\ge 2
        if _split_equation(g) is None:
            p = _without_name(p)
        if _split_equation(p) is None:
            g = _without_name(g)
        if _structures_equal(_structure(p), _structure(g), deadline):
            return True
        # 25\% may be answered as 25 (the sign dropped, as MATH does) or as 0.25
        if _is_percent(gold) and "," not in g:
            return _scalars_equal(p, f"\\frac{{{g}}}{{100}}", deadline)
        if _is_percent(pred) and "," not in p:
            return _scalars_equal(f"\\frac{{{p}}}{{100}}", g, deadline)
        return False
    except _HelperUnavailable:
        raise
    except Exception:  # a grader must not crash training on one strange answer
        _log.debug("is_equiv(%r, %r) failed", pred[:80], gold[:80], exc_info=True)
        return False


# Comparisons run inside the sympy helper process.

def _has_decimal(text: str) -> bool:
    return re.search(r"\d\.\d|(?<!\d)\.\d", text) is not None


def _exact_terminating(value) -> bool:
    return bool(value.is_Rational) and _terminates(Fraction(int(value.p), int(value.q)))


def _constants_equal(x, y, rounded: bool) -> bool:
    """x, y sympy numbers. With `rounded`, one of them is a decimal approximating the other."""
    import sympy as sp

    if x.has(sp.oo, -sp.oo) or y.has(sp.oo, -sp.oo):
        return x == y
    if x.is_Rational and y.is_Rational and not rounded:
        return x == y
    tolerance = ROUNDED_REL_TOL if rounded else EXACT_REL_TOL
    x_value, y_value = sp.N(x, 50), sp.N(y, 50)
    difference = sp.N(x - y, 50)
    if not (x_value.is_number and y_value.is_number and difference.is_number):
        return False
    scale = max(abs(x_value), abs(y_value))
    return bool(abs(difference) <= tolerance * scale)


def _vanishes_at_random_points(difference, scale) -> bool:
    """Is difference (a simplified x - y) zero at several random points? For identities that
    simplify() misses. Exact arithmetic where possible (a rational function at a rational point),
    else 30 digits against the size of `scale` there. Not used with floor, ceiling, Abs, sign or
    Mod, which vanish on whole regions without vanishing everywhere."""
    import sympy as sp

    if any(e.has(sp.floor, sp.ceiling, sp.Abs, sp.sign, sp.Mod) for e in (difference, scale)):
        return False
    symbols = sorted(difference.free_symbols, key=str)
    rng = random.Random(0)
    vanishing = 0
    for _ in range(6):
        point = {symbol: sp.Rational(rng.randint(-2000, 3000), 997) for symbol in symbols}
        value = difference.subs(point)
        if value.is_Rational:
            if value != 0:
                return False
            vanishing += 1
            continue
        try:
            value, size = complex(value.evalf(30)), abs(complex(scale.evalf(30, subs=point)))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
        if not (math.isfinite(abs(value)) and math.isfinite(size)):
            continue
        if abs(value) > 1e-12 * max(1.0, size):
            return False
        vanishing += 1
    return vanishing >= 3


def _compare_expressions(a: str, b: str) -> bool:
    import sympy as sp

    x, y = latex_to_sympy(a), latex_to_sympy(b)
    if x == y:
        return True
    if x.free_symbols or y.free_symbols:
        difference = sp.simplify(x - y)
        if difference == 0:
            return True
        if not difference.free_symbols:  # a nonzero constant, however large x and y are
            return False
        return _vanishes_at_random_points(difference, x)
    rounded = (_has_decimal(a) and not _exact_terminating(y)) or (
        _has_decimal(b) and not _exact_terminating(x))
    return _constants_equal(x, y, rounded)


def _compare_equations(a: str, b: str) -> bool:
    """Equal as equations: lhs - rhs of one is a nonzero constant multiple of the other's."""
    import sympy as sp

    x, y = (latex_to_sympy(left) - latex_to_sympy(right)
            for left, right in (_split_equation(a), _split_equation(b)))
    if x == 0 or y == 0:
        return False
    ratio = sp.simplify(x / y)
    return not ratio.free_symbols and ratio.is_number and ratio != 0 and bool(ratio.is_finite)


@functools.lru_cache(maxsize=4096)
def _run_helper_task(task: str, a: str, b: str) -> bool:
    return {"expressions": _compare_expressions, "equations": _compare_equations}[task](a, b)


# ---------------------------------------------------------------------------------------------
# 5. Time limit: a helper subprocess runs the sympy comparisons
# ---------------------------------------------------------------------------------------------
# The helper answers one JSON request per line. It stops itself with an interval timer (it is the
# main thread of its own process, so signals work there) shortly before the deadline; if it is
# stuck where signals are not handled (a C-level big-integer operation), the caller kills it and
# the next comparison starts a new one. Each process that compares (the trainer, each Grader
# worker) owns its own helper, which dies with it (section 6 says how, and why it matters).

_HELPER_FLAG = "--sympy-helper"
_HELPER_STARTUP_SECONDS = 120.0  # importing sympy on a busy machine
_HELPER_MEMORY_BYTES = 4 << 30


class _HelperUnavailable(RuntimeError):
    """The sympy helper process could not be started (an environment problem, not an answer)."""


class _HelperTimeout(BaseException):
    """Raised by the helper's timer; a BaseException so that sympy's `except Exception` lets it pass."""


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One line from fd, or None if it does not arrive before deadline or the writer is gone."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    return data


class _SympyHelper:
    def __init__(self):
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.timeouts = 0

    def after_fork(self):
        """A forked child must not share its parent's helper: drop (without killing) the copy."""
        if self.process is not None:
            for pipe in (self.process.stdin, self.process.stdout):
                pipe.close()
        self.lock = threading.Lock()
        self.process, self.ready = None, False

    def compare(self, task: str, a: str, b: str, seconds: float) -> bool:
        with self.lock:
            self.wait_until_ready()
            request = json.dumps({"task": task, "a": a, "b": b, "seconds": seconds}) + "\n"
            deadline = time.monotonic() + seconds
            try:
                self.process.stdin.write(request.encode())
                line = _read_line(self.process.stdout.fileno(), deadline)
            except OSError:
                line = None
            if line is None:
                self.timeouts += 1
                _log.warning("a sympy comparison took over %.1f s and counts as not equal: %r vs %r",
                             seconds, a[:60], b[:60])
                self.stop()
                self.launch()  # sympy imports while the caller carries on
                return False
            return bool(json.loads(line)["equal"])

    def launch(self):
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), _HELPER_FLAG, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.ready = False

    def wait_until_ready(self):
        if self.process is None or self.process.poll() is not None:
            self.stop()
            self.launch()
        if not self.ready:
            line = _read_line(self.process.stdout.fileno(), time.monotonic() + _HELPER_STARTUP_SECONDS)
            if line != b"ready\n":
                self.stop()
                raise _HelperUnavailable(f"the sympy helper of {__file__} did not start (is sympy installed?)")
            self.ready = True

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdin.close()
            self.process.stdout.close()
            self.process, self.ready = None, False


_SYMPY_HELPER = _SympyHelper()
os.register_at_fork(after_in_child=_SYMPY_HELPER.after_fork)
atexit.register(_SYMPY_HELPER.stop)


def _in_sympy_helper(task: str, a: str, b: str, deadline: float) -> bool:
    seconds = deadline - time.monotonic()
    if seconds <= 0 or len(a) > MAX_SYMPY_CHARS or len(b) > MAX_SYMPY_CHARS:
        return False
    return _SYMPY_HELPER.compare(task, a, b, seconds)


def _serve_sympy_requests(parent_pid: int) -> None:
    """The helper process: read requests from stdin, answer each on stdout."""
    import resource

    # Stdin's end of file stops the loop below when the parent dies, but not a comparison stuck
    # in C; the kernel's parent-death signal does.
    _kill_me_when_my_parent_dies()
    if os.getppid() != parent_pid:  # it died before the line above
        return

    import sympy  # noqa: F401  (imported before "ready", so no comparison is charged for it)

    try:
        resource.setrlimit(resource.RLIMIT_AS, (_HELPER_MEMORY_BYTES, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass

    def stop_comparison(signum, frame):
        raise _HelperTimeout

    signal.signal(signal.SIGALRM, stop_comparison)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt the answers
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        request = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, 0.8 * request["seconds"]))
        try:
            equal = _run_helper_task(request["task"], request["a"], request["b"])
        except (Exception, _HelperTimeout):  # unreadable, undefined or too slow: not equal
            equal = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out.write(json.dumps({"equal": bool(equal)}).encode() + b"\n")


# ---------------------------------------------------------------------------------------------
# 6. Grader
# ---------------------------------------------------------------------------------------------


# Processes must not outlive the one that started them: a SIGKILLed trainer used to leave its
# Grader's workers (~280 MB each), the forkserver and the resource tracker alive for good. The
# workers are children of the forkserver, and every worker holds the forkserver's and the
# tracker's pipes open, so the workers are the ones that must notice: each watches the process
# that created the Grader and exits with it; the forkserver and tracker then see their pipes
# close and exit, and each sympy helper dies with its own parent (the kernel's parent-death
# signal, Linux; elsewhere the end of its stdin once a comparison ends).

def _kill_me_when_my_parent_dies() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (no-op elsewhere).

    The parent is a thread, not a process: a helper started from a short-lived thread dies with
    that thread, and the next comparison starts a new one."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806 (linux/prctl.h)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _wait_for_exit(pid: int) -> None:
    """Return once process pid has exited (a pidfd on Linux >= 5.3; elsewhere poll each second)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd_open, or pid already gone (ProcessLookupError)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:  # exists, owned by someone else: pid reused, ours is gone
                return
            time.sleep(1.0)
    select.select([pidfd], [], [])  # readable when the process exits


def _exit_with(pid: int) -> None:
    """Grader worker initializer: a daemon thread ends this worker when process pid exits."""
    def watch():
        _wait_for_exit(pid)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def grade(completion: str, answer: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when the final answer of the completion is equivalent to the gold answer; the time
    limit covers the extraction too (linear in the completion: ~10 ms for 1 MB)."""
    start = time.monotonic()
    pred = extract_answer(completion)
    return is_equiv(pred, answer, timeout=max(0.0, timeout - (time.monotonic() - start)))


class Grader:
    """Grades batches in worker processes, so a slow comparison never stalls the trainer.

    Each worker bounds its own sympy time (section 5), so a completion whose grading times out
    counts as not correct and the worker carries on. Two backstops: a batch that overruns a
    generous deadline marks its unfinished items not correct, and items of a worker that died
    are graded in this process instead; either way the pool is replaced. Workers are started by
    forkserver, so a script that creates a Grader needs the `if __name__ == "__main__":` guard.
    """

    def __init__(self, num_workers: int = 2, timeout: float = DEFAULT_TIMEOUT):
        if num_workers < 1:
            raise ValueError(f"Grader: num_workers must be at least 1, got {num_workers}")
        self.num_workers = num_workers
        self.timeout = timeout
        self._pool = self._new_pool()
        # A run that stops on an error (distributed.stop's SystemExit) never reaches close(); at exit,
        # concurrent.futures then wakes the pool's manager thread through a pipe that may already be
        # closed ("OSError: Bad file descriptor" after the one-line error). Hooks registered here run
        # before concurrent.futures' own (threading runs them last registered, first run).
        threading._register_atexit(self.close)

    def _new_pool(self) -> ProcessPoolExecutor:
        # forkserver: workers neither inherit the trainer's threads (fork) nor re-import it (spawn)
        return ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_exit_with, initargs=(os.getpid(),))

    def correct(self, completions: list[str], answers: list[str]) -> list[bool]:
        if len(completions) != len(answers):
            raise ValueError(f"Grader.correct: {len(completions)} completions but {len(answers)} answers")
        try:
            futures = self._submit(completions, answers)
        except BrokenProcessPool:  # a worker died between batches
            self._replace_pool()
            futures = self._submit(completions, answers)
        rounds = math.ceil(len(futures) / self.num_workers) + 1
        deadline = time.monotonic() + _HELPER_STARTUP_SECONDS + 2 * self.timeout * rounds
        results, healthy = [], True
        for future, completion, answer in zip(futures, completions, answers):
            try:
                results.append(bool(future.result(timeout=max(0.0, deadline - time.monotonic()))))
            except FutureTimeoutError:
                results.append(False)
                healthy = False
            except BrokenProcessPool:
                results.append(grade(completion, answer, self.timeout))
                healthy = False
        if not healthy:
            _log.warning("Grader: a worker stalled or died; its pool is replaced")
            self._replace_pool()
        return results

    def _submit(self, completions, answers):
        return [self._pool.submit(grade, c, a, self.timeout) for c, a in zip(completions, answers)]

    def _replace_pool(self):
        for process in list((self._pool._processes or {}).values()):  # no public API to stop a worker
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info):
        self.close()


if __name__ == "__main__" and sys.argv[1:2] == [_HELPER_FLAG]:
    _serve_sympy_requests(parent_pid=int(sys.argv[2]))
