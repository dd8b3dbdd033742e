import json
import re
import string
import sys
from pathlib import Path

import pytest
import sympy

import data
from conftest import shared_file
from data import DataError, format_prompt, load_problems, make_linear_problems
from mathrl.grader import extract_answer, is_equiv

ROOT = Path(__file__).resolve().parents[1]

FIELDS = ("id", "prompt", "answer", "solution", "source")


def check_schema(problems, source):
    assert all(set(p) == set(FIELDS) and all(isinstance(p[f], str) for f in FIELDS) for p in problems)
    assert all(p["prompt"].strip() for p in problems)
    assert all(p["source"] == source for p in problems)
    assert len({p["id"] for p in problems}) == len(problems)


# ---------------------------------------------------------------------------------------------
# The real copies in ../shared/data: every row loads, counts as in its README, quirks applied.

REAL = [  # spec name, path under shared/data, split, rows
    ("math500", "math500/test.jsonl", "test", 500),
    ("gsm8k", "gsm8k/test.jsonl", "test", 1319),
    ("aime24", "aime24/test.jsonl", "test", 30),
    ("aime25", "aime25/test2025-I.jsonl", "test", 15),
    ("aime25", "aime25/test2025-II.jsonl", "test", 15),
    ("aime25", "aime25", "test", 30),
    ("amc23", "amc23/test.jsonl", "test", 40),
    ("minerva", "minerva_math/test.jsonl", "test", 272),
    ("olympiadbench", "olympiadbench/test.jsonl", "test", 675),
    ("limr", "limr", "train", 1389),
    ("limr", "limr", "test", 272),
    ("math-8k", "math_l3to5_8k/math.8k.json", "train", 8523),
]


def load_real(name, relative, split="test"):
    return load_problems(f"{name}={shared_file(relative)}", split=split)


@pytest.mark.parametrize("name,relative,split,rows", REAL, ids=[f"{r[1]}[{r[2]}]" for r in REAL])
def test_real_sets_load_every_row(name, relative, split, rows):
    problems = load_real(name, relative, split)
    assert len(problems) == rows
    check_schema(problems, name)
    empty = [p["id"] for p in problems if not p["answer"]]
    # LIMR's math.8k.json has exactly two rows with an empty answer, kept (see SOURCES); no other set has any
    assert len(empty) == (2 if name == "math-8k" else 0)


def test_gsm8k_answers_are_plain_numbers():
    problems = load_real("gsm8k", "gsm8k/test.jsonl")
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p["answer"]) for p in problems)
    assert problems[0]["answer"] == "18"
    # "1,450,000" in the file is the number 1450000
    assert sum(p["answer"] == "1450000" for p in problems) == 1
    assert problems[0]["solution"].endswith("\\boxed{18}") and "<<" not in problems[0]["solution"]
    assert all("####" not in p["solution"] for p in problems)


def test_amc23_float_answers_become_integers():
    problems = load_real("amc23", "amc23/test.jsonl")
    assert problems[0]["answer"] == "27"
    assert [p["answer"] for p in problems][:4] == ["27", "36", "45", "3159"]
    assert all(re.fullmatch(r"-?\d+", p["answer"]) for p in problems)


def test_minerva_gold_is_the_last_box_of_the_solution():
    problems = load_real("minerva", "minerva_math/test.jsonl")
    assert all(p["answer"] for p in problems)
    assert problems[0]["answer"] == "1.6"  # "... 7200=\boxed{1.6} \mathrm{~cm}"
    raw = [json.loads(line) for line in shared_file("minerva_math/test.jsonl").read_text().splitlines()]
    assert "answer" not in raw[0]
    assert all(p["answer"] == extract_answer(r["solution"]) for p, r in zip(problems, raw))


def test_olympiadbench_answers_and_solutions():
    problems = load_real("olympiadbench", "olympiadbench/test.jsonl")
    assert not any("$" in p["answer"] for p in problems)
    by_id = {p["id"]: p for p in problems}
    assert by_id["olympiadbench/1606"]["answer"] == "2"
    assert "69,84" in [p["answer"] for p in problems]  # the file's "$69$,$84$"
    assert all(isinstance(p["solution"], str) and p["solution"] for p in problems)


def test_limr_prompt_is_the_plain_problem():
    problems = load_real("limr", "limr", "train")
    assert problems[0]["prompt"].startswith("For how many integer values of $x$ is")
    assert not any("step by step" in p["prompt"] or "<|im_start|>" in p["prompt"] for p in problems)


def test_a_local_path_without_a_name_uses_the_usual_field_names():
    problems = load_problems(str(shared_file("math500/test.jsonl")))
    assert len(problems) == 500 and problems[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    check_schema(problems, "math500/test")
    with pytest.raises(DataError, match=r"limr\[train\] row 0: no prompt .*'problem'"):
        load_problems(str(shared_file("limr")))  # LIMR's prompt is `context`: needs limr=PATH


# ---------------------------------------------------------------------------------------------
# Local formats, written here.

ROWS = [
    {"problem": "What is 2+3?", "answer": 5.0, "solution": "2+3=5, so \\boxed{5}.", "id": "a"},
    {"problem": "What is 7*6?", "answer": 42.0, "solution": None, "id": "b"},
    {"problem": "Half of 9?", "answer": 4.5, "id": "c"},
]
EXPECTED = [
    {"id": "t/a", "prompt": "What is 2+3?", "answer": "5", "solution": "2+3=5, so \\boxed{5}.", "source": "t"},
    {"id": "t/b", "prompt": "What is 7*6?", "answer": "42", "solution": "", "source": "t"},
    {"id": "t/c", "prompt": "Half of 9?", "answer": "4.5", "solution": "", "source": "t"},
]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "disk"])
def test_local_formats_load_the_same_problems(tmp_path, fmt):
    path = write(tmp_path / ("t" if fmt == "disk" else f"t.{fmt}"), ROWS, fmt)
    source = "t" if fmt == "disk" else f"{tmp_path.name}/t"  # a file is named with its folder
    assert load_problems(str(path)) == [{**p, "id": f"{source}/{p['id'][2:]}", "source": source} for p in EXPECTED]


def test_save_to_disk_dataset_dict_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_problems(str(tmp_path / "dd"), split="train")) == 3
    assert len(load_problems(str(tmp_path / "dd"), split="test")) == 1
    with pytest.raises(DataError, match=r"dd has no 'validation' split \(it has 'train', 'test'\)"):
        load_problems(str(tmp_path / "dd"), split="validation")


def test_json_lines_under_a_json_name(tmp_path):
    path = write(tmp_path / "t.json", ROWS, "jsonl")  # what datasets' to_json writes
    assert [p["answer"] for p in load_problems(str(path))] == ["5", "42", "4.5"]


def test_fields_name_unusual_fields(tmp_path):
    rows = [{"q": "1+1?", "gold": "2", "steps": "1+1=2"}, {"q": "2+2?", "gold": "4", "steps": ""}]
    path = write(tmp_path / "odd.jsonl", rows, "jsonl")
    problems = load_problems(str(path), fields={"prompt": "q", "answer": "gold", "solution": "steps"})
    assert [(p["prompt"], p["answer"], p["solution"]) for p in problems] == [("1+1?", "2", "1+1=2"), ("2+2?", "4", "")]
    with pytest.raises(DataError, match=r"odd.jsonl line 1: no prompt \(expected a non-empty field 'problem'"):
        load_problems(str(path))
    with pytest.raises(DataError, match="unknown role"):
        load_problems(str(path), fields={"question": "q"})


def test_quirks_apply_to_local_copies(tmp_path):
    olympiad = write(tmp_path / "o.jsonl", [{"id": 1, "question": "Q?", "final_answer": ["$3$", "$5$"],
                                             "solution": ["First way.", "Second way."], "context": None}], "jsonl")
    problem, = load_problems(f"olympiadbench={olympiad}")
    assert (problem["answer"], problem["solution"]) == ("3, 5", "First way.\n\nSecond way.")
    chat = "<|im_start|>system\nPlease reason step by step.<|im_end|>\n<|im_start|>user\nWhat is 6/2?<|im_end|>\n" \
           "<|im_start|>assistant\n"
    limr = write(tmp_path / "l.jsonl", [{"context": chat, "answer": "3", "id": "x"}], "jsonl")
    assert load_problems(f"limr={limr}")[0]["prompt"] == "What is 6/2?"
    gsm8k = write(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "It is 2,125 <<2125>>.\n#### 2,125"},
                                         {"question": "Q2?", "answer": "no marker"}], "jsonl")
    with pytest.raises(DataError, match=r"g.jsonl line 2: answer has no '#### N' line"):
        load_problems(f"gsm8k={gsm8k}")


# ---------------------------------------------------------------------------------------------
# Bad data: a one-line DataError that names the file, the row and the field; no row dropped.

def one_line_error(spec, **kwargs):
    with pytest.raises(DataError) as caught:
        load_problems(spec, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_fields_name_file_row_and_field(tmp_path):
    jsonl = write(tmp_path / "m.jsonl", [ROWS[0], {"problem": "No answer here"}], "jsonl")
    message = one_line_error(str(jsonl))
    assert f"{jsonl} line 2: no answer" in message and "'answer'" in message
    parquet = write(tmp_path / "m.parquet", [ROWS[0], {**ROWS[0], "problem": None}], "parquet")
    assert f"{parquet} row 1: no prompt" in one_line_error(str(parquet))
    empty = write(tmp_path / "e.json", [ROWS[0], ROWS[1], {**ROWS[0], "answer": "  "}], "json")
    assert f"{empty} row 2: no answer" in one_line_error(str(empty))
    minerva = write(tmp_path / "mv.jsonl", [{"problem": "P", "solution": "no box"}], "jsonl")
    assert f"{minerva} line 1: no answer" in one_line_error(f"minerva={minerva}")


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"problem": "x", "answer": }\n')
    assert f"{path} line 3: malformed JSON" in one_line_error(str(path))
    path = tmp_path / "bad.json"
    path.write_text('[\n{"problem": "x",\n "answer": 1,}\n]')
    assert f"{path} line 3: malformed JSON" in one_line_error(str(path))
    path = write(tmp_path / "list.jsonl", [[1, 2]], "jsonl")
    assert "line 1: expected a JSON object" in one_line_error(str(path))


def test_unknown_names_splits_and_paths():
    assert "unknown data 'nosuch'" in one_line_error("nosuch")
    assert "math500 has no 'train' split" in one_line_error("math500", split="train")
    assert "math-8k=/path/to/math.8k.json" in one_line_error("math-8k")
    assert "does not exist" in one_line_error("limr=/no/such/folder")
    assert "linear has no 'validation' split" in one_line_error("linear", split="validation")


# ---------------------------------------------------------------------------------------------
# Mixtures.

def test_mixture_samples_seeded_and_shuffles(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"problem": f"a{i}", "answer": str(i)} for i in range(50)], "jsonl")
    b = write(tmp_path / "b.jsonl", [{"problem": f"b{i}", "answer": str(i)} for i in range(7)], "jsonl")
    spec = f"{a}:20,{b}"
    mixed = load_problems(spec, seed=1)
    assert len(mixed) == 27
    assert sum(p["source"] == f"{tmp_path.name}/a" for p in mixed) == 20
    assert sorted(p["prompt"] for p in mixed if p["source"] == f"{tmp_path.name}/b") == [f"b{i}" for i in range(7)]
    assert len({p["prompt"] for p in mixed}) == 27 and len({p["id"] for p in mixed}) == 27
    assert load_problems(spec, seed=1) == mixed
    assert load_problems(spec, seed=2) != mixed
    assert [p["source"] for p in mixed[:27]] != sorted(p["source"] for p in mixed)  # shuffled, not stacked
    assert load_problems(spec, seed=1, limit=5) == mixed[:5]
    assert "asks for 60 rows" in one_line_error(f"{a}:60,{b}")


def test_mixture_of_one_source_twice_keeps_ids_unique(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"problem": f"a{i}", "answer": str(i), "id": i} for i in range(5)], "jsonl")
    mixed = load_problems(f"{a},{a}:3,linear:10")
    assert len(mixed) == 18 and len({p["id"] for p in mixed}) == 18


# ---------------------------------------------------------------------------------------------
# The linear-equation generator: checked by parsing its text, not by trusting its internals.

def parse_side(text):
    """'4 - 3y + 2z' -> ({'y': -3, 'z': 2}, 4)."""
    coefs, constant = {}, 0
    for term in re.findall(r"[+-]?[^+-]+", text.replace(" ", "")):
        var = term[-1] if term[-1] in "xyz" else ""
        number = term[:-1] if var else term
        value = int(number + "1") if number in ("", "+", "-") else int(number)
        if var:
            coefs[var] = coefs.get(var, 0) + value
        else:
            constant += value
    return coefs, constant


def holds(equation, values):
    left, right = equation.split(" = ")
    (lc, lk), (rc, rk) = parse_side(left), parse_side(right)
    return sum(c * values[v] for v, c in lc.items()) + lk == sum(c * values[v] for v, c in rc.items()) + rk


def check_linear(problems):
    for p in problems:
        header, *equations = p["prompt"].split("\n")
        names = re.fullmatch(r"Solve for \(?([xyz](?:, [xyz])*)\)?:", header).group(1).split(", ")
        assert len(equations) == len(names) and names == list("xyz"[:len(names)])
        numbers = [int(n) for n in p["answer"].strip("()").split(", ")]
        values = dict(zip(names, numbers))
        assert p["answer"] == (str(numbers[0]) if len(names) == 1 else f"({', '.join(map(str, numbers))})")
        assert all(holds(e, values) for e in equations)
        matrix = sympy.Matrix([[parse_side(e.split(" = ")[0])[0].get(v, 0) for v in names] for e in equations])
        assert matrix.det() != 0  # a unique solution
        *steps, last = p["solution"].split("\n")
        assert last == f"\\boxed{{{p['answer']}}}" and extract_answer(p["solution"]) == p["answer"]
        assert steps and all(holds(step, values) for step in steps)  # every worked line is true
        assert steps[-1] == f"{names[-1]} = {numbers[-1]}"
        text = p["prompt"] + p["solution"]
        assert set(text) <= set(string.printable) - set("\t\r\x0b\x0c")


def test_linear_sets_are_fixed_valid_and_disjoint():
    train, test = load_problems("linear", split="train"), load_problems("linear", split="test")
    assert (len(train), len(test)) == (4000, 200)
    check_schema(train, "linear")
    check_schema(test, "linear")
    check_linear(train + test)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert len({p["prompt"] for p in train}) == 4000
    assert all(data.linear_split(p["prompt"]) == "train" for p in train)
    assert load_problems("linear", split="test", seed=5) == test  # the seed is for mixtures, not content
    assert load_problems("linear", split="train", limit=100) == train[:100]
    unknowns = [p["prompt"].count("\n") for p in train]
    assert {1, 2} == set(unknowns) and 0.3 < unknowns.count(1) / len(unknowns) < 0.7
    two = [len(p["solution"]) for p in train if p["prompt"].count("\n") == 2]
    assert max(two) < 200 and max(len(p["prompt"]) for p in train) < 60


def test_linear_generator_knobs():
    three = make_linear_problems(200, seed=3, unknowns=(3,), max_coef=3, max_value=5, max_step_value=99)
    check_linear(three)
    numbers = [abs(int(n)) for p in three for n in re.findall(r"\d+", p["solution"])]
    assert max(numbers) <= 99
    values = [abs(int(n)) for p in three for n in re.findall(r"-?\d+", p["answer"])]
    assert max(values) <= 5
    assert make_linear_problems(50, seed=3) != make_linear_problems(50, seed=4)
    test_any_seed = make_linear_problems(300, seed=7, split="test", unknowns=(1, 2, 3))
    check_linear(test_any_seed)
    assert not {p["prompt"] for p in test_any_seed} & {p["prompt"] for p in load_problems("linear")}
    with pytest.raises(DataError, match="only .* distinct"):
        make_linear_problems(500, unknowns=(1,), max_coef=1, max_value=2)


def test_linear_answers_grade_with_is_equiv():
    for p in load_problems("linear", split="test"):
        assert is_equiv(p["answer"].replace(" ", ""), p["answer"])


# ---------------------------------------------------------------------------------------------
# Prompt templates.

# chat_tokenizer and CHAT_TEMPLATE: conftest.py


def test_plain_prompt_is_short_and_the_default_without_a_chat_template():
    assert format_prompt("2x = 4") == "2x = 4\nSolution:\n"
    assert format_prompt("2x = 4", template="plain") == format_prompt("2x = 4", tokenizer=None, template="auto")


def test_chat_prompts(chat_tokenizer):
    expected = f"<|system|>{data.QWEN_MATH_SYSTEM_PROMPT}\n<|user|>What is 1+1?\n<|assistant|>"
    assert format_prompt("What is 1+1?", chat_tokenizer) == expected
    assert format_prompt("What is 1+1?", chat_tokenizer, "qwen-math") == expected
    assert data.QWEN_MATH_SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."
    r1 = format_prompt("What is 1+1?", chat_tokenizer, "r1")
    assert r1 == f"<|system|>{data.R1_SYSTEM_PROMPT}\n<|user|>What is 1+1?\n<|assistant|>"
    assert "<think> </think>" in data.R1_SYSTEM_PROMPT
    # open-rs recipes/grpo.yaml:9 is a double-quoted YAML string: "\\\\boxed{{}} ." reaches the model as \boxed{{}} .
    assert "put your final answer within \\boxed{{}} . The reasoning" in data.R1_SYSTEM_PROMPT
    assert format_prompt("Q", chat_tokenizer, "plain") == "Q\nSolution:\n"
    assert format_prompt("Q", None, "r1").endswith("\nUser: Q\nAssistant:")
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        format_prompt("Q", None, "qwen-math")
    with pytest.raises(ValueError, match="unknown prompt template"):
        format_prompt("Q", chat_tokenizer, "chatml")


def test_name_equals_path_with_an_unknown_name_lists_the_sources(tmp_path):
    import data

    (tmp_path / "rows.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(data.DataError, match="unknown source 'mydata'.*NAME=PATH takes one of .*limo"):
        data.load_problems(f"mydata={tmp_path / 'rows.jsonl'}")


# ---- tools/pass_rate_filter.py: the problems a model solves sometimes, from evaluate.py's samples file

def test_pass_rate_filter_keeps_the_band_in_a_file_the_trainers_read(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import pass_rate_filter

    problems = load_problems("linear", split="test", limit=6)
    verdicts = [[False] * 4, [True, False, False, False], [True, True, False, False], [True] * 3 + [False],
                [True] * 4]  # 0, 0.25, 0.5, 0.75, 1; the sixth problem was not evaluated
    samples = tmp_path / "rates.samples.jsonl"
    samples.write_text("".join(json.dumps({"bench": "linear", "id": p["id"], "answer": p["answer"],
                                           "correct": v, "extracted": [None] * 4}) + "\n"
                               for p, v in zip(problems, verdicts)))
    out = tmp_path / "band.jsonl"
    pass_rate_filter.main([str(samples), "--data", "linear", "--split", "test", "--min", "0.25", "--max", "0.75",
                           "--out", str(out)])
    kept = load_problems(str(out))
    assert all(k["id"].endswith("/" + p["id"]) for k, p in zip(kept, problems[1:4]))  # namespaced by the file
    assert [(p["prompt"], p["answer"], p["solution"]) for p in kept] == \
        [(p["prompt"], p["answer"], p["solution"]) for p in problems[1:4]]
    assert [json.loads(line)["pass_rate"] for line in out.read_text().splitlines()] == [0.25, 0.5, 0.75]

    for argv, words in [(["--min", "0.9", "--max", "0.1"], "--min <= --max"),
                        (["--data", "arith"], "are not in --data 'arith'")]:
        with pytest.raises(SystemExit) as stopped:
            pass_rate_filter.main([str(samples), "--data", "linear", "--split", "test", "--out", str(out), *argv])
        assert words in str(stopped.value) and "\n" not in str(stopped.value)
