"""Math problems in one schema, from the Hugging Face hub, local files, mixtures, or a generator.

Every problem is a dict of five strings:
    {"id": "gsm8k/17", "prompt": "...", "answer": "18", "solution": "... \\boxed{18}", "source": "gsm8k"}
`answer` is the gold final answer that grader.is_equiv grades against; `solution` is a worked
solution for SFT, empty when the source has none.

    load_problems("math500", split="test")                      # from the hub (needs network)
    load_problems("minerva=/data/minerva_math/test.jsonl")       # a local copy, Minerva's quirks
    load_problems("/data/mine.parquet", fields={"prompt": "q"})  # any local file
    load_problems("open-rs:3000,limo")                           # a seeded mixture
    load_problems("linear", split="test")                        # synthetic, offline, deterministic
    load_problems("arith", split="test")                         # synthetic word problems (task B)

Everything is read and checked eagerly: a missing field, an empty prompt or a malformed line raises
DataError with a one-line message naming the file, the row and the field, so a script fails in
seconds, before it loads a model. No row is ever dropped.
"""

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from mathrl.grader import extract_answer

ROLES = ("prompt", "answer", "solution")
ID_FIELDS = ("id", "idx", "unique_id")


class DataError(ValueError):
    """Bad data: the message names the file, the row and the field."""


# ----------------------------------------------------------------------------------------------
# Sources. Each knows its hub id, its splits (ours -> the hub's), the fields it expects for each
# role (first present wins) and its quirks. Local copies sometimes name fields differently from
# the hub copy, so several names are accepted where copies differ.

def _gsm8k(problem, row):
    """GSM8K's `answer` is the worked solution, then `#### 18`; numbers may have thousands commas."""
    if problem["answer"] is None:
        return problem
    reasoning, marker, final = problem["answer"].rpartition("####")
    if not marker:
        raise DataError("answer has no '#### N' line")
    answer = final.strip().replace(",", "")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # calculator annotations: 9*2=<<9*2=18>>18
    return {**problem, "answer": answer, "solution": f"{reasoning}\n\\boxed{{{answer}}}"}


def _minerva(problem, row):
    """Qwen's Minerva copy has no answer field: the gold answer is the last \\boxed{} of the solution."""
    if not problem["answer"] and problem["solution"]:
        problem = {**problem, "answer": extract_answer(problem["solution"]) or ""}
    return problem


def _olympiadbench(problem, row):
    """final_answer is a list of LaTeX strings in $...$ (joined by _text with ", "); solution is a list."""
    answer = re.sub(r"(?<!\\)\$", "", problem["answer"] or "").strip()
    solution = row.get("solution")
    if isinstance(solution, list):
        solution = "\n\n".join(str(part).strip() for part in solution)
    prompt = problem["prompt"]
    if prompt and row.get("context"):  # a shared preamble for a group of questions
        prompt = f"{_text(row['context'])}\n\n{prompt}"
    return {**problem, "prompt": prompt, "answer": answer, "solution": _text(solution) or ""}


def _limr(problem, row):
    """LIMR rows hold the prompt as chat messages: take the user's turn, not the system prompt."""
    users = [m["content"] for m in row.get("context_messages") or [] if m.get("role") == "user"]
    if users:
        return {**problem, "prompt": _text(users[-1])}
    chat = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", problem["prompt"] or "", re.DOTALL)
    return {**problem, "prompt": chat.group(1).strip()} if chat else problem


@dataclass(frozen=True)
class Source:
    hub_id: str | None  # None: not on the hub, local copies only (see `note`)
    splits: dict  # our split name -> the hub's split name
    prompt: tuple = ("problem", "question")
    answer: tuple = ("answer",)
    solution: tuple = ("solution",)
    config: str | None = None
    quirk: object = None  # (problem, raw row) -> problem, applied before validation
    empty_answers: bool = False  # rows with an empty (but present) answer are kept
    note: str = ""


SOURCES = {
    "limo": Source("GAIR/LIMO", {"train": "train"}, prompt=("question", "problem")),
    "open-rs": Source("knoveleng/open-rs", {"train": "train"}),
    "limr": Source("GAIR/LIMR", {"train": "train"}, prompt=("context",), solution=(), quirk=_limr),
    # LIMR's file has 2 multiple-choice rows whose answer their extraction lost; LIMR trained on them
    # as always-wrong problems (their published LIM scores for them are -1.84 and -1.86), so do we.
    "math-8k": Source(None, {}, prompt=("prompt",), solution=(), empty_answers=True,
                      note="math-8k (MATH levels 3-5, 8,523 rows) is not on the Hugging Face hub: it is "
                           "data/prompts/math.8k.json in the GAIR-NLP/LIMR GitHub repo; pass "
                           "math-8k=/path/to/math.8k.json"),
    "gsm8k": Source("openai/gsm8k", {"train": "train", "test": "test"}, prompt=("question",),
                    solution=(), config="main", quirk=_gsm8k),
    "math500": Source("HuggingFaceH4/MATH-500", {"test": "test"}),
    "aime24": Source("HuggingFaceH4/aime_2024", {"test": "train"}),
    "aime25": Source("math-ai/aime25", {"test": "test"}),
    "amc23": Source("math-ai/amc23", {"test": "test"}),  # answers are floats: 27.0 means 27 (_text)
    "minerva": Source("math-ai/minervamath", {"test": "test"}, quirk=_minerva),
    "olympiadbench": Source("math-ai/olympiadbench", {"test": "test"}, prompt=("question",),
                            answer=("final_answer", "answer"), quirk=_olympiadbench),
}

# A local file with no source name: the usual field names of math data sets.
GENERIC = Source(None, {}, prompt=("problem", "question", "prompt", "query", "instruction"),
                 answer=("answer", "final_answer", "gold", "ground_truth", "target", "expected_answer"),
                 solution=("solution", "response", "output", "completion"))


def _text(value):
    """A field value as a string: 27.0 -> "27", ["a", "b"] -> "a, b", None stays None."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value if v is not None)
    return str(value).strip()


def _to_problem(row, where: str, index: int, name: str, source: Source, fields: dict | None):
    fields = fields or {}
    expected = {role: (fields[role],) if role in fields else getattr(source, role) for role in ROLES}
    problem = {role: _text(next((row[f] for f in expected[role] if row.get(f) is not None), None))
               for role in ROLES}
    if source.quirk:
        try:
            problem = source.quirk(problem, row)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
    for role in ("prompt", "answer"):
        if problem[role] is None or (not problem[role] and not (role == "answer" and source.empty_answers)):
            have = ", ".join(f for f in row if row[f] not in (None, "", [])) or "nothing"
            hint = "; name it with fields= or load a known source as NAME=PATH" if source is GENERIC else ""
            raise DataError(f"{where}: no {role} (expected a non-empty field "
                            f"{' or '.join(map(repr, expected[role]))}; the row has {have}){hint}")
    raw_id = next((row[f] for f in ID_FIELDS if row.get(f) is not None), index)
    return {"id": f"{name}/{raw_id}", "prompt": problem["prompt"], "answer": problem["answer"],
            "solution": problem["solution"] or "", "source": name}


# ----------------------------------------------------------------------------------------------
# Reading rows: the hub, or a local .json / .jsonl / .parquet file, a save_to_disk folder, or a
# folder of such files. Each row comes with where it came from, for error messages.

def _hub_rows(name: str, source: Source, split: str):
    if source.hub_id is None:
        raise DataError(source.note)
    if split not in source.splits:
        raise DataError(f"{name} has no {split!r} split (it has {', '.join(map(repr, source.splits))})")
    import datasets

    hub_split = source.splits[split]
    try:
        table = datasets.load_dataset(source.hub_id, source.config, split=hub_split)
    except Exception as error:  # offline, unknown id, ...: one line, and how to work offline
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"could not load {source.hub_id} from the Hugging Face hub ({reason}); "
                        f"with a local copy, use {name}=PATH") from error
    return [(f"{source.hub_id}[{hub_split}] row {i}", row) for i, row in enumerate(table)]


def _not_utf8(path: Path, raw: bytes, error: UnicodeDecodeError, first_line: int = 1):
    line = first_line + raw.count(b"\n", 0, error.start)
    column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
    return DataError(f"{path} line {line}: not UTF-8 text (byte {raw[error.start]:#04x} at column {column})")


def jsonl_rows(path: Path):
    rows = []
    with open(path, "rb") as file:  # bytes, so that a bad byte is reported with its line
        for number, raw in enumerate(file, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, raw, error, number) from None
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: malformed JSON ({error.msg} at column "
                                f"{error.colno})") from None
    return rows


def json_rows(path: Path):
    raw = path.read_bytes()
    try:
        table = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise _not_utf8(path, raw, error) from None
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON lines under a .json name (datasets' to_json writes these)
            return jsonl_rows(path)
        raise DataError(f"{path} line {error.lineno}: malformed JSON ({error.msg} at column "
                        f"{error.colno})") from None
    if not isinstance(table, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(table).__name__}")
    return [(f"{path} row {i}", row) for i, row in enumerate(table)]


def _local_rows(path: Path, split: str):
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        import datasets

        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise DataError(f"{path} has no {split!r} split (it has {', '.join(map(repr, table))})")
            table, path = table[split], f"{path}[{split}]"
        return [(f"{path} row {i}", row) for i, row in enumerate(table)]
    if path.is_dir():  # e.g. AIME 2025 as two files, I and II
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet"))
        if not files:
            raise DataError(f"{path}: neither a datasets.save_to_disk folder nor a folder of "
                            f".json/.jsonl/.parquet files")
        return [row for file in files for row in _local_rows(file, split)]
    if path.suffix == ".jsonl":
        return jsonl_rows(path)
    if path.suffix == ".json":
        return json_rows(path)
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]
    raise DataError(f"{path}: unknown format (use .json, .jsonl, .parquet or a datasets.save_to_disk folder)")


def _problems(rows, name: str, source: Source, fields: dict | None):
    problems = []
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got a {type(row).__name__}")
        problems.append(_to_problem(row, where, index, name, source, fields))
    return problems


# ----------------------------------------------------------------------------------------------
# load_problems: the one entry point.

def load_problems(spec: str, split: str = "train", *, fields: dict | None = None, seed: int = 0,
                  limit: int | None = None) -> list[dict]:
    """Problems for `spec`: a source name, NAME=PATH, a local path, "linear", "arith", or a mixture "a:N,b".

    `fields` names the prompt/answer/solution fields of a local file when they are not the usual
    ones. `seed` drives mixture sampling and shuffling; named sets always have the same content.
    `limit` keeps the first rows (for "linear" and "arith", it is the number generated).
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    if fields is not None and set(fields) - set(ROLES):
        raise DataError(f"fields: unknown role(s) {sorted(set(fields) - set(ROLES))} "
                        f"(use {', '.join(ROLES)})")
    spec = spec.strip()
    named = "=" in spec and spec.split("=", 1)[0] in SOURCES  # NAME=PATH
    exists = Path(spec.split("=", 1)[1] if named else spec).expanduser().exists()
    if not exists and ("," in spec or re.fullmatch(r".+:\d+", spec)):  # a file's name may hold a comma
        problems = _mixture(spec, split, fields, seed)
    elif spec in ("linear", "arith"):  # arith: task B of experiments/ood.py, arithmetic word problems
        if split not in SYNTHETIC_SIZES:
            raise DataError(f"{spec} has no {split!r} split (it has 'train', 'test')")
        make = make_linear_problems if spec == "linear" else make_arith_problems
        problems = make(SYNTHETIC_SIZES[split] if limit is None else limit, seed=0, split=split)
    elif named:
        name, path = spec.split("=", 1)
        problems = _problems(_local_rows(Path(path).expanduser(), split), name, SOURCES[name], fields)
    elif spec in SOURCES:
        problems = _problems(_hub_rows(spec, SOURCES[spec], split), spec, SOURCES[spec], fields)
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        name = path.name if path.is_dir() else f"{path.parent.name}/{path.stem}".lstrip("/")
        problems = _problems(_local_rows(path, split), name, GENERIC, fields)
    elif "=" in spec:  # NAME=PATH with a NAME that is no source: say which are
        raise DataError(f"unknown source {spec.split('=', 1)[0]!r} in {spec!r}: NAME=PATH takes one of "
                        f"{', '.join(SOURCES)} (a local copy of that source); give any other file by its path")
    else:
        raise DataError(f"unknown data {spec!r}: use linear, arith, {', '.join(SOURCES)}, NAME=PATH "
                        f"(NAME one of those sources), "
                        f"a .json/.jsonl/.parquet file or save_to_disk folder, or a mixture like "
                        f"open-rs:3000,limo")
    if not problems and limit != 0:  # training on nothing would divide by zero later
        raise DataError(f"{spec}: no problems (an empty file?)")
    return _unique_ids(problems)[:limit]


def _unique_ids(problems):
    """Ids repeat when a source repeats its own ids or a mixture draws one source twice: number them."""
    seen = {}
    for problem in problems:
        count = seen[problem["id"]] = seen.get(problem["id"], 0) + 1
        if count > 1:
            problem["id"] = f"{problem['id']}#{count}"
    return problems


# ----------------------------------------------------------------------------------------------
# Mixtures: "open-rs:3000,limo" = 3000 rows sampled from open-rs plus all of limo, shuffled.

def _mixture(spec: str, split: str, fields: dict | None, seed: int):
    rng = random.Random(seed)
    problems = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise DataError(f"mixture {spec!r} has an empty part")
        name, count = re.fullmatch(r"(.+?)(?::(\d+))?", part).groups()
        rows = load_problems(name, split, fields=fields)
        if count is not None:
            if int(count) > len(rows):
                raise DataError(f"mixture {spec!r} asks for {count} rows of {name}, which has {len(rows)}")
            rows = rng.sample(rows, int(count))
        problems += [dict(row) for row in rows]  # copies: one row drawn twice gets two ids
    rng.shuffle(problems)
    return problems


# ----------------------------------------------------------------------------------------------
# Synthetic task: systems of linear equations with 1 to 3 unknowns and a unique integer solution.
# Small enough for a 1-3M parameter character-level model to learn by SFT in minutes on a CPU: ASCII
# only, small numbers, and a worked solution of short lines, each line one operation:
#
#   Solve for (x, y):      15x - 6y = 78     (the first equation times 3)
#   5x - 2y = 26           8x - 6y = 36      (the second times 2: y now cancels)
#   4x - 3y = 18           7x = 42           (subtract)
#                          x = 6             (divide)
#                          30 - 2y = 26      (x into the first equation)
#                          -2y = -4
#                          y = 2
#                          \boxed{(6, 2)}
#
# Three unknowns eliminate z with the first equation against each other one, solve the two-unknown
# system the same way, then substitute back. Train and test are split by a hash of the question,
# so no system of the test split ever appears in the train split, whatever the seed.

VARIABLES = "xyz"
SYNTHETIC_SIZES = {"train": 4000, "test": 200}  # of linear, and of arith below


def _side(terms):
    """[(2, "x"), (-1, "y"), (5, "")] -> "2x - y + 5"; zero terms are left out."""
    text = ""
    for coef, var in terms:
        if coef == 0:
            continue
        body = ("" if var and abs(coef) == 1 else str(abs(coef))) + var
        if not text:
            text = ("-" if coef < 0 else "") + body
        else:
            text += (" - " if coef < 0 else " + ") + body
    return text or "0"


def _equation(coefs, rhs):
    return f"{_side(zip(coefs, VARIABLES))} = {rhs}"


def _isolate(coef: int, var: str, rhs: int):
    """a*v = r  ->  v = r/a."""
    return [f"{_side([(coef, var)])} = {rhs}", f"{var} = {rhs // coef}"]


def _eliminate(first, other, k: int):
    """Scale both equations by small positive multipliers so that unknown k cancels, then add or subtract."""
    (a, r), (b, s) = first, other
    g = math.gcd(a[k], b[k])
    m, n = abs(b[k]) // g, abs(a[k]) // g
    sign = -1 if a[k] * b[k] > 0 else 1
    coefs = [m * x + sign * n * y for x, y in zip(a, b)]
    lines = ([_equation([m * x for x in a], m * r)] if m != 1 else []) + \
            ([_equation([n * y for y in b], n * s)] if n != 1 else [])
    return (coefs, m * r + sign * n * s), lines + [_equation(coefs, m * r + sign * n * s)]


def _substitute(equation, values):
    """The known unknowns' values into the equation, then solve it for the next unknown."""
    coefs, rhs = equation
    known = [c * v for c, v in zip(coefs, values)]
    coef, var = coefs[len(values)], VARIABLES[len(values)]
    lines = [f"{_side([(k, '') for k in known] + [(coef, var)])} = {rhs}"]
    if len([k for k in known if k]) > 1:
        lines.append(f"{_side([(sum(known), ''), (coef, var)])} = {rhs}")
    return lines + _isolate(coef, var, rhs - sum(known))


def _solve(equations, values):
    """Worked elimination lines, or None when elimination leaves a zero coefficient. A singular system
    always does (its last reduced equation is 0x = 0), so every system kept has a unique solution."""
    if len(equations) == 1:
        (coefs, rhs), = equations
        return _isolate(coefs[0], VARIABLES[0], rhs)
    k = len(equations) - 1  # eliminate the last unknown
    lines, reduced = [], []
    for other in equations[1:]:
        (coefs, rhs), steps = _eliminate(equations[0], other, k)
        divisor = math.gcd(*coefs, rhs)
        if k > 1 and divisor > 1:  # keep the numbers small: 6x - 3y = 48 -> 2x - y = 16
            coefs, rhs = [c // divisor for c in coefs], rhs // divisor
            steps.append(_equation(coefs, rhs))
        lines += steps
        reduced.append((coefs[:k], rhs))
    if any(c == 0 for coefs, _ in reduced for c in coefs):
        return None
    inner = _solve(reduced, values)
    return None if inner is None else lines + inner + _substitute(equations[0], values[:k])


def linear_split(question: str) -> str:
    """Which split a system belongs to, by a hash of its text: the same answer on every machine."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10_000
    return "test" if bucket < 1_000 else "train"  # a tenth of the questions


def _linear_problem(rng: random.Random, unknowns: int, max_coef: int, max_value: int, max_step_value: int):
    """One random system (or None, rejected): question text, answer, worked solution."""
    coef = lambda: rng.choice([c for c in range(-max_coef, max_coef + 1) if c])
    values = [rng.randint(-max_value, max_value) for _ in range(unknowns)]
    if unknowns == 1:  # a x + b = c
        a, b = coef(), rng.randint(-max_value, max_value)
        equations = [([a], a * values[0])]
        shown = [f"{_side([(a, 'x'), (b, '')])} = {a * values[0] + b}"]
    else:
        matrix = [[coef() for _ in range(unknowns)] for _ in range(unknowns)]
        equations = [(row, sum(c * v for c, v in zip(row, values))) for row in matrix]
        shown = [_equation(*equation) for equation in equations]
    lines = _solve(equations, values)
    if lines is None or max(abs(int(n)) for n in re.findall(r"\d+", "\n".join(lines))) > max_step_value:
        return None
    lines = [line for i, line in enumerate(lines) if line != (lines[i - 1] if i else shown[-1])]
    if not lines:  # "x = 5" asks nothing
        return None
    names = VARIABLES[:unknowns]
    answer = str(values[0]) if unknowns == 1 else f"({', '.join(map(str, values))})"
    question = f"Solve for {names if unknowns == 1 else '(' + ', '.join(names) + ')'}:\n" + "\n".join(shown)
    return question, answer, "\n".join(lines + [f"\\boxed{{{answer}}}"])


def make_linear_problems(n: int, seed: int = 0, split: str = "train", *, unknowns=(1, 2), max_coef: int = 5,
                         max_value: int = 9, max_step_value: int = 200) -> list[dict]:
    """n distinct systems of the split: the number of unknowns drawn from `unknowns` (repeat an entry
    to weight it), nonzero coefficients in [-max_coef, max_coef], solutions in [-max_value, max_value],
    no number above max_step_value in the worked solution (elimination multiplies numbers up).
    The first m problems of a call with n > m are those of the call with m: a prefix is a smaller set."""
    if n < 0 or split not in ("train", "test") or not unknowns or not set(unknowns) <= {1, 2, 3} \
            or max_coef < 1 or max_value < 0:
        raise DataError(f"make_linear_problems: need n >= 0, split train or test, unknowns within 1-3, "
                        f"max_coef >= 1, max_value >= 0 (got {n}, {split!r}, {unknowns}, {max_coef}, "
                        f"{max_value})")
    rng, problems, seen = random.Random(seed), [], set()
    for _ in range(100 * n + 1000):
        if len(problems) == n:
            break
        made = _linear_problem(rng, rng.choice(unknowns), max_coef, max_value, max_step_value)
        if made is None or made[0] in seen or linear_split(made[0]) != split:
            continue
        seen.add(made[0])
        question, answer, solution = made
        problems.append({"id": f"linear-{split}/{len(problems)}", "prompt": question, "answer": answer,
                         "solution": solution, "source": "linear"})
    if len(problems) < n:
        raise DataError(f"make_linear_problems: found only {len(problems)} distinct {split} systems with "
                        f"unknowns={unknowns}, max_coef={max_coef}, max_value={max_value}, "
                        f"max_step_value={max_step_value}; widen the ranges")
    return problems


# ----------------------------------------------------------------------------------------------
# Synthetic task B, `arith`: two- and three-step arithmetic word problems, GSM8K's surface form in
# miniature, the out-of-domain task of experiments/ood.py. Words instead of equations, but the same kind of
# worked solution as `linear`'s (one operation a line, about as long) so the tiny model can learn both:
#
#   Ann has 7 pens. Ann buys 3 boxes of 4 pens each,      3 * 4 = 12
#   then gives away 5 pens. How many pens does Ann        7 + 12 = 19
#   have now?                                             19 - 5 = 14
#                                                         \boxed{14}
#
# Every number in a problem is a whole number from 0 to 200; train and test are split by the same
# hash of the question as `linear`, so no question of the test split is ever in the train split.

ARITH_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia",
               "Ned")
ARITH_ITEMS = ("pens", "cards", "eggs", "books", "shells", "stamps", "marbles", "coins", "apples", "beads")
ARITH_MAX = 200


def _arith_question(rng: random.Random):
    """One word problem: its text and its steps [(left, operator, right), ...], each step's result
    the next step's left operand or a later operand, the last step's result the answer."""
    name, other = rng.sample(ARITH_NAMES, 2)
    item, n = rng.choice(ARITH_ITEMS), lambda low, high: rng.randint(low, high)
    kind = rng.randrange(6)
    if kind == 0:  # buy boxes, give some away: a + b * c - d
        a, b, c = n(2, 30), n(2, 9), n(2, 9)
        d = n(1, a + b * c)
        return (f"{name} has {a} {item}. {name} buys {b} boxes of {c} {item} each, "
                f"then gives away {d} {item}. "
                f"How many {item} does {name} have now?", [(b, "*", c), (a, "+", b * c), (a + b * c, "-", d)])
    if kind == 1:  # change from a payment: m - a * p
        a, p = n(2, 9), n(2, 9)
        m = rng.choice([m for m in (20, 50, 100) if m >= a * p])
        return (f"{name} buys {a} {item} at {p} dollars each and pays with {m} dollars. "
                f"How many dollars of change does {name} get?", [(a, "*", p), (m, "-", a * p)])
    if kind == 2:  # share equally, then find more: a / k + c
        k, q, c = n(2, 9), n(2, 12), n(1, 20)
        return (f"{name} shares {k * q} {item} equally among {k} friends. "
                f"Then each friend finds {c} more {item}. "
                f"How many {item} does each friend have?", [(k * q, "/", k), (q, "+", c)])
    if kind == 3:  # lose some, then double or triple: (a - b) * f
        a, f = n(5, 60), rng.choice([2, 3])
        b = n(1, a - 1)
        word = {2: "doubled", 3: "tripled"}[f]
        return (f"{name} had {a} {item} and lost {b}. Then {name} {word} the {item} left. "
                f"How many {item} does {name} have?", [(a, "-", b), (a - b, "*", f)])
    if kind == 4:  # two rates: a * d + b * e
        a, d, b, e = n(2, 9), n(2, 7), n(2, 9), n(2, 7)
        return (f"{name} collects {a} {item} a day for {d} days, then {b} {item} a day for {e} days. "
                f"How many {item} does {name} collect in all?",
                [(a, "*", d), (b, "*", e), (a * d, "+", b * e)])
    a, k = n(2, 25), n(2, 6)  # k times as many: a * k - a
    return (f"{name} has {a} {item}. {other} has {k} times as many {item} as {name}. "
            f"How many more {item} does {other} have than {name}?", [(a, "*", k), (a * k, "-", a)])


ARITH_OPERATIONS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
                    "/": lambda x, y: x // y}


def make_arith_problems(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """n distinct word problems of the split; as with linear, a prefix of a larger call is a smaller set."""
    if n < 0 or split not in ("train", "test"):
        raise DataError(f"make_arith_problems: need n >= 0 and split train or test (got {n}, {split!r})")
    rng, problems, seen = random.Random(seed), [], set()
    for _ in range(100 * n + 1000):
        if len(problems) == n:
            break
        question, steps = _arith_question(rng)
        results = [ARITH_OPERATIONS[op](x, y) for x, op, y in steps]
        numbers = [number for (x, _, y), z in zip(steps, results) for number in (x, y, z)]
        if min(numbers) < 0 or max(numbers) > ARITH_MAX or question in seen \
                or linear_split(question) != split:
            continue
        seen.add(question)
        answer = str(results[-1])
        lines = [f"{x} {op} {y} = {z}" for (x, op, y), z in zip(steps, results)]
        problems.append({"id": f"arith-{split}/{len(problems)}", "prompt": question, "answer": answer,
                         "solution": "\n".join(lines + [f"\\boxed{{{answer}}}"]), "source": "arith"})
    if len(problems) < n:
        raise DataError(f"make_arith_problems: found only {len(problems)} distinct {split} problems")
    return problems


# ----------------------------------------------------------------------------------------------
# Prompts. "qwen-math": the tokenizer's chat template with Qwen2.5-Math's chain-of-thought system
# prompt. "r1": the R1-style prompt Open-RS trains with, character for character (knoveleng/open-rs
# recipes/grpo.yaml:9: the YAML string `\\boxed{{}}` is the text `\boxed{{}}`, which open_r1/grpo.py:183-190
# passes on unformatted, so their model saw the doubled braces; so does ours). "plain": for base models
# and the tiny model, which reads the prompt character by character. "auto": qwen-math when the
# tokenizer has a chat template, else plain. Two evaluation templates put the question alone in the
# user turn with no system message (a chat template may still add its own default one, as
# Qwen2.5-Math's does): "lighteval-math", the query Open-RS evaluated with through lighteval, and
# "question", the Qwen-baselines study's "Question: ..." (evaluate.py's PROTOCOLS cite the lines).

QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer, and put your final answer within \\boxed{{}} . The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. Note that respond by English, NOT use other languages."
)
# knoveleng/open-rs src/open_r1/evaluate.py:34-38 (MATH_QUERY_TEMPLATE; its `{{ANSWER}}` is a format escape)
LIGHTEVAL_MATH_QUERY = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. Think "
    "step by step before answering.\n\n{question}")
# rqzhangberkeley/efficient-reasoning evaluate_model.py:130-133 (at f36bf77, the commit of its tables)
QUESTION_QUERY = "Question: {question}"
USER_TURN_ONLY = {"lighteval-math": LIGHTEVAL_MATH_QUERY, "question": QUESTION_QUERY}
TEMPLATES = ("auto", "qwen-math", "r1", "plain", *USER_TURN_ONLY)


def format_prompt(question: str, tokenizer=None, template: str = "auto") -> str:
    has_chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r} (use {', '.join(TEMPLATES)})")
    if template == "auto":
        template = "qwen-math" if has_chat else "plain"
    if template == "plain":
        return f"{question}\nSolution:\n"
    if not has_chat:
        if template == "r1":  # DeepSeek-R1-Zero's plain-text form of the same conversation
            return f"{R1_SYSTEM_PROMPT}\nUser: {question}\nAssistant:"
        raise ValueError(f"prompt template {template!r} needs a tokenizer with a chat template; use 'plain'")
    if template in USER_TURN_ONLY:
        messages = [{"role": "user", "content": USER_TURN_ONLY[template].format(question=question)}]
    else:
        system = QWEN_MATH_SYSTEM_PROMPT if template == "qwen-math" else R1_SYSTEM_PROMPT
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prepare_prompts(problems, tokenizer, template: str, max_prompt_length: int, dist, who: str):
    """Format and tokenize every prompt once (the RL trainers): prompts over the length budget are left out,
    and rank 0 (dist.is_main) says how many."""
    try:
        prompts = [format_prompt(p["prompt"], tokenizer, template) for p in problems]
    except ValueError as error:  # qwen-math on a tokenizer without a chat template
        raise SystemExit(f"error: --template {template}: {error}") from None
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= max_prompt_length]
    if not keep:
        raise SystemExit(f"error: all {len(problems)} prompts are longer than --max-prompt-length "
                         f"{max_prompt_length} tokens (the shortest has "
                         f"{min(map(len, prompt_ids), default=0)})")
    if dist.is_main and len(keep) < len(problems):
        print(f"{who}: left out {len(problems) - len(keep)} of {len(problems)} prompts longer than "
              f"{max_prompt_length} tokens")
    return [problems[i] for i in keep], [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
