"""Task B (`arith`, data.py) and experiments/ood.py's pipeline (GRPO vs SFT out of domain, in miniature).

The real pipeline starts about a dozen processes (each imports torch and transformers): even with a
few steps of everything (`experiments/ood.py --smoke`) it took 10 minutes on the shared 2-core VM. So its
orchestration is tested here with `run` replaced by a fake that writes what each real command
writes, and every command it issues is checked against the real CLI's own argument parser.
"""
import json
import math
import re
import string

import pytest

import data
import rewards
from mathrl.grader import extract_answer, is_equiv

OPERATIONS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
              "/": lambda x, y: x / y}  # true division: a line "7 / 2 = 3" would fail


def check_arith(problems):
    """Every worked line is true arithmetic, every operand comes from the question (or is a result of
    an earlier line, or the 2 / 3 of "doubled" / "tripled"), and the box holds the last result."""
    for p in problems:
        assert set(p) == {"id", "prompt", "answer", "solution", "source"} and p["source"] == "arith"
        *lines, box = p["solution"].split("\n")
        assert box == f"\\boxed{{{p['answer']}}}" and extract_answer(p["solution"]) == p["answer"]
        in_question = [int(n) for n in re.findall(r"\d+", p["prompt"])]
        in_question += [2] * ("doubled" in p["prompt"]) + [3] * ("tripled" in p["prompt"])
        results = []
        for line in lines:
            x, op, y, z = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line).groups()
            x, y, z = int(x), int(y), int(z)
            assert OPERATIONS[op](x, y) == z and 0 <= z <= data.ARITH_MAX
            assert all(operand in in_question + results for operand in (x, y)), (p["prompt"], line)
            results.append(z)
        assert 2 <= len(lines) <= 3 and results[-1] == int(p["answer"])
        tiny_vocabulary = set(string.printable) - set("\t\r\x0b\x0c")
        assert set(p["prompt"] + p["solution"]) <= tiny_vocabulary


def test_arith_sets_are_fixed_valid_and_disjoint():
    train, test = data.load_problems("arith", split="train"), data.load_problems("arith", split="test")
    assert (len(train), len(test)) == (4000, 200)
    check_arith(train + test)
    assert len({p["prompt"] for p in train}) == 4000 and len({p["prompt"] for p in test}) == 200
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert all(data.linear_split(p["prompt"]) == "test" for p in test)
    assert data.load_problems("arith", split="test", seed=5) == test  # the seed is for mixtures, not content
    assert data.load_problems("arith", split="train", limit=100) == train[:100]
    assert data.make_arith_problems(300, seed=1) == data.make_arith_problems(300, seed=1)
    assert data.make_arith_problems(300, seed=1) != data.make_arith_problems(300, seed=2)
    other_seed = data.make_arith_problems(300, seed=7, split="test")
    assert not {p["prompt"] for p in other_seed} & {p["prompt"] for p in train}
    # all six kinds of problem occur, two and three steps
    words = r"\d+|[A-Z][a-z]+|" + "|".join(data.ARITH_ITEMS)  # numbers, names (and capitalised words), items
    assert len({re.sub(words, "", p["prompt"]) for p in train}) == 7  # "doubled" and "tripled": kind 3 twice
    assert {p["solution"].count("\n") for p in train} == {2, 3}
    with pytest.raises(data.DataError, match="arith has no 'validation' split"):
        data.load_problems("arith", split="validation")


def test_arith_solutions_are_as_long_as_linear_ones_and_fit_the_demo_limits():
    arith, linear = data.load_problems("arith"), data.load_problems("linear")
    mean = lambda rows, key: sum(len(p[key]) for p in rows) / len(rows)
    assert 0.5 < mean(arith, "solution") / mean(linear, "solution") < 1.5
    assert max(len(p["solution"]) for p in arith) < 60  # far under evaluate's --max-tokens 192 in the demo
    assert max(len(p["prompt"]) for p in arith) < 200


def test_arith_answers_earn_the_reward_and_grade_against_their_own_solutions():
    test = data.load_problems("arith", split="test")
    assert all(is_equiv(extract_answer(p["solution"]), p["answer"]) for p in test)
    assert all(rewards.accuracy_reward(p["solution"], p["answer"]) == 1.0 for p in test)
    wrong = [p["solution"].replace(f"\\boxed{{{p['answer']}}}", f"\\boxed{{{int(p['answer']) + 1}}}")
             for p in test]
    assert all(rewards.accuracy_reward(w, p["answer"]) == 0.0 for w, p in zip(wrong, test))


def test_the_demo_start_mixture_holds_both_tasks():
    mixed = data.load_problems("linear,arith", split="train")
    assert len(mixed) == 8000 and {p["source"] for p in mixed} == {"linear", "arith"}
    assert [p["source"] for p in mixed[:200]].count("arith") not in (0, 200)  # shuffled, not one block first


def test_mean_and_standard_error():
    import common

    mean, se = common.mean_se([1.0, 2.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(7 / 3))  # sample sd sqrt(7), over sqrt(3)
    assert math.isnan(common.mean_se([0.25])[1])
    assert common.cell([0.1, 0.2, 0.3]) == "20.0 ± 5.8" and common.cell([0.125]) == "12.5"


def fake_run(tmp_path, commands, accuracy):
    """Stands in for common.run: checks the command with the real CLI's parser, then writes what it writes."""
    import evaluate
    import grpo
    import sft
    from mathrl import flags

    def run(command):
        script, argv = command[1], command[2:]
        commands.append((script, argv))
        if script == "tools/plot.py":  # the figure: checked by tools/plot.py's own parser, drawn by tests/test_plot.py
            import plot

            plot.parse_args(argv)
            return
        if script == "evaluate.py":
            args = evaluate.parse_args(argv)
            n = args.n or 1
            summaries = [{"pass@1": accuracy(args.model, bench, n), "n_problems": 200} for bench in args.bench]
            open(args.out, "w").write(json.dumps(summaries))
            return
        module = {"sft.py": sft, "grpo.py": grpo}[script]
        cfg = flags.parse_args(module.Config, module.PRESETS, argv)
        out = tmp_path / cfg.output_dir  # ood passes absolute paths: this is cfg.output_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_text("fake")
        rows = [{"tokens_per_s": 100.0, "step_s": 2.0} if script == "sft.py" else {"response_length_mean": 10.0}
                for _ in range(cfg.max_steps)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def test_demo_ood_pipeline_commands_table_and_resume(tmp_path, monkeypatch, capsys):
    import ood

    def accuracy(model, bench, n):  # made-up figures the table must average: SFT forgets arith, GRPO keeps it
        arm = "start" if model.endswith("start") else model.rsplit("/", 1)[-1].split("-")[0]
        seed = 0 if arm == "start" else int(re.search(r"seed(\d)", model).group(1))
        return {("start", "linear"): 0.10, ("start", "arith"): 0.40, ("sft", "linear"): 0.30 + 0.02 * seed,
                ("sft", "arith"): 0.05, ("grpo", "linear"): 0.20,
                ("grpo", "arith"): 0.38 + 0.01 * seed}[arm, bench]

    commands = []
    import common

    fake = fake_run(tmp_path, commands, accuracy)
    monkeypatch.setattr(ood, "run", fake)  # the steps ood.py runs itself
    monkeypatch.setattr(common, "run", fake)  # those it runs through common.timed
    out = tmp_path / "ood"
    results = ood.main(["--seeds", "0,1", "--out-dir", str(out), "--threads", "1", "--figure",
                             str(tmp_path / "ood.png")])

    scripts = [script for script, _ in commands]
    assert scripts.count("sft.py") == 3 and scripts.count("grpo.py") == 2 and scripts.count("evaluate.py") == 10
    start_argv = commands[0][1]
    assert start_argv[start_argv.index("--data") + 1] == "linear,arith"
    assert start_argv[start_argv.index("--max-steps") + 1] == "1200"
    for script, argv in commands[1:]:
        if script in ("sft.py", "grpo.py"):
            assert argv[argv.index("--model") + 1] == str(out / "start")  # every arm from the same start
    grpo_argv = next(argv for script, argv in commands if script == "grpo.py")
    sft_argv = next(argv for script, argv in commands[1:] if script == "sft.py")
    assert grpo_argv[grpo_argv.index("--data") + 1] == str(out / "rl-pool.jsonl")
    assert sft_argv[sft_argv.index("--data") + 1] == "linear"
    # matched compute: as many sequences through forward and backward, 80 x 32 x 8 = 640 x 32
    assert sft_argv[sft_argv.index("--max-steps") + 1] == "640"
    assert results["seeds"][0]["sft"]["sequences"] == results["seeds"][0]["grpo"]["sequences"] == 20480
    assert results["seeds"][1]["sft"]["response_tokens"] == 640 * 200.0
    assert results["seeds"][1]["grpo"]["response_tokens"] == 80 * 10.0 * 256

    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"]["1"]["grpo"]["arith"]["greedy"] == pytest.approx(0.39)
    assert saved["start"]["arith"]["sampled"] == 0.40
    assert saved["peak_rss_gb"] == json.loads((out / "peak_rss_gb.json").read_text()) >= 0
    assert set(saved["timings_s"]) >= {"start", "seed0 sft", "seed1 grpo", "eval start greedy"}
    table = capsys.readouterr().out
    assert ("| SFT on linear | 20480 seq., 128.0 ± 0.0k tok. | 31.0 ± 1.0 | 31.0 ± 1.0 | 5.0 ± 0.0 | 5.0 ± 0.0 "
            "| -35.0 ± 0.0 |") in table
    assert ("| GRPO on linear | 20480 seq., 204.8 ± 0.0k tok. | 20.0 ± 0.0 | 20.0 ± 0.0 | 38.5 ± 0.5 | 38.5 ± 0.5 "
            "| -1.5 ± 0.5 |") in table
    assert "| start (SFT on linear + arith) | - | 10.0 | 10.0 | 40.0 | 40.0 | - | - |" in table

    commands.clear()  # a second call finds everything done and runs nothing
    again = ood.main(["--seeds", "0,1", "--out-dir", str(out), "--threads", "1", "--figure",
                           str(tmp_path / "ood.png")])
    assert [script for script, _ in commands] == ["tools/plot.py"] and again["seeds"] == results["seeds"]


def test_demo_ood_rejects_bad_flags_in_one_line(tmp_path, capsys):
    import ood

    for argv, flag in ((["--seeds", "0,x"], "--seeds"), (["--threads", "0"], "--threads"),
                       (["--sft-lr", "-1"], "--sft-lr")):
        with pytest.raises(SystemExit):
            ood.main([*argv, "--out-dir", str(tmp_path / "never")])
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # checked before anything is written
