"""experiments/dynamic_sampling.py (DAPO's dynamic sampling) and experiments/cosine_length.py (Open-RS's cosine reward), end to end.

Each smoke test runs the real pipeline with --smoke (a few steps of 2 prompts x 2 completions, 4 test
problems) from a random tiny model (conftest.save_tiny_model, not a trained SFT model), so its numbers
mean nothing: it checks that every command runs, that results.json has every figure the table needs,
and that the figure is written.
"""
import json
import math

import pytest

from conftest import ROOT, save_tiny_model

EVAL_KEYS = {"greedy", "sampled", "greedy_length", "greedy_truncated"}


def smoke(module, tmp_path, monkeypatch, *extra):
    monkeypatch.chdir(ROOT)  # the scripts run `python grpo.py ...` from the project folder
    sft = save_tiny_model(tmp_path / "sft")
    out, figure = tmp_path / "out", tmp_path / "figure.png"
    module.main(["--smoke", "--seeds", "0", "--threads", "1", "--sft", str(sft), "--out-dir", str(out),
                 "--figure", str(figure), *extra])
    assert figure.stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] is True and results["wall_s_all_steps"] > 0 and results["peak_rss_gb"] > 0
    assert EVAL_KEYS <= set(results["sft"])
    return results, out


def is_fraction(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_demo_dynamic_smoke(tmp_path, monkeypatch):
    import dynamic_sampling

    results, out = smoke(dynamic_sampling, tmp_path, monkeypatch)
    seed = results["seeds"]["0"]
    assert set(seed) == {"pool", "all", "dynamic", "matched"}
    for arm, figures in seed.items():
        assert EVAL_KEYS | {"steps", "generated_tokens", "tokens_per_step", "groups_with_signal",
                            "sampling_rounds", "train_accuracy_last10"} <= set(figures), arm
        assert is_fraction(figures["greedy"]) and is_fraction(figures["sampled"])
        assert len(figures["tokens_per_step"]) == figures["steps"] and figures["generated_tokens"] > 0
        assert 0 <= figures["groups_with_signal"] <= 2  # 2 prompts a step in the smoke run
    assert seed["pool"]["steps"] == seed["all"]["steps"] == seed["dynamic"]["steps"] == results["steps"] == 4
    assert seed["matched"]["steps"] in (2, 4)  # a checkpoint every 2 steps, or the final model
    assert (out / "seed0" / "dynamic" / "checkpoint-2").is_dir()
    assert seed["dynamic"]["sampling_rounds"] >= 1


def test_demo_length_smoke(tmp_path, monkeypatch):
    import cosine_length

    results, out = smoke(cosine_length, tmp_path, monkeypatch)
    assert set(results["sft_lengths"]) == {"one-unknown", "two-unknown"}
    for kind in results["sft_lengths"].values():
        assert kind["mean_length"] > 0
        assert is_fraction(kind["longer_than_limit"]) and is_fraction(kind["pass@1"])
    seed = results["seeds"]["0"]
    assert set(seed) == {"accuracy", "cosine"}
    for arm, figures in seed.items():
        assert figures["steps"] == results["steps"] == 3, arm
        for key in ("truncated_first", "truncated_last", "accuracy_first", "accuracy_last",
                    "greedy", "sampled"):
            assert is_fraction(figures[key]), (arm, key)
        assert 0 <= figures["groups_with_signal"] <= 2  # 2 prompts a step in the smoke run
        assert 0 < figures["length_first"] <= results["max_len"]
        assert 0 < figures["length_last"] <= results["max_len"]
    first_step = json.loads((out / "seed0" / "cosine" / "metrics.jsonl").open().readline())
    assert "reward/cosine" in first_step  # the cosine arm was trained on the cosine reward


def test_demo_dynamic_matched_step_stays_within_the_budget(tmp_path):
    import dynamic_sampling

    rows = [{"step": k, "generated_tokens": 100 * k, "accuracy": 0.5, "response_length_mean": 1.0,
             "groups_with_signal": 3} for k in range(1, 9)]  # cumulative: 100, 300, 600, 1000, 1500, ...
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert dynamic_sampling.matched_step(tmp_path, 1499, 8, 2) == 4  # 1000 <= 1499 < 2100 (step 6)
    assert dynamic_sampling.matched_step(tmp_path, 3600, 8, 2) == 8  # the final model, not a checkpoint
    assert dynamic_sampling.matched_step(tmp_path, 100, 8, 2) == 2  # every one above: the closest
    summary = dynamic_sampling.summary(tmp_path, 4)
    assert summary["generated_tokens"] == 1000 and summary["groups_with_signal"] == 3
    assert summary["steps"] == 4 and math.isclose(summary["train_accuracy_last10"], 0.5)


@pytest.mark.parametrize("script, argv, flag", [
    ("dynamic_sampling", ["--seeds", "0,x"], "--seeds"), ("dynamic_sampling", ["--arms", "pool,bogus"], "--arms"),
    ("dynamic_sampling", ["--save-every", "0"], "--save-every"),
    ("cosine_length", ["--max-len", "4"], "--max-len"),
    ("cosine_length", ["--cosine-wrong", "a:b"], "--cosine-wrong"),
    ("cosine_length", ["--threads", "0"], "--threads")])
def test_demos_reject_bad_flags_in_one_line(tmp_path, script, argv, flag):
    module = __import__(script)
    with pytest.raises(SystemExit) as error:
        module.main([*argv, "--out-dir", str(tmp_path / "never")])
    assert flag in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "never").exists()  # checked before anything is written


def test_demo_paired_comparison_counts_changes_and_sign_test(tmp_path):
    """experiments/demo.py's lines under its table: problems that changed each way against SFT, the sign test, and
    one-unknown pass@1, from the greedy samples files evaluate.py writes."""
    import itertools

    import demo

    def write(model, verdicts):
        model.mkdir()
        rows = [{"id": i, "answer": answer, "correct": [right]} for i, (answer, right) in verdicts.items()]
        (model / "eval-greedy.samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    before = {0: ("3", False), 1: ("-2", False), 2: ("(1, 2)", True), 3: ("5", True), 4: ("(0, 1)", False)}
    after = {0: ("3", True), 1: ("-2", True), 2: ("(1, 2)", False), 3: ("5", True), 4: ("(0, 1)", False)}
    write(tmp_path / "sft", before)
    write(tmp_path / "grpo", after)
    line, = demo.paired_lines(tmp_path / "sft", [("SFT + GRPO", tmp_path / "grpo")])
    assert line.startswith("SFT + GRPO vs SFT, greedy: 2 test problems wrong -> right, 1 right -> wrong")
    assert line.endswith("one-unknown (3) 33.3% -> 100.0%, two-unknown (2) 50.0% -> 0.0%")

    # the sign test against counting every equally likely sign pattern of the changed problems
    for up, down in ((14, 3), (3, 14), (5, 5), (0, 4), (7, 0), (1, 0)):
        n = up + down
        as_lopsided = sum(min(sum(signs), n - sum(signs)) <= min(up, down)
                          for signs in itertools.product((0, 1), repeat=n))
        assert math.isclose(demo.sign_test(up, down), min(1.0, as_lopsided / 2 ** n)), (up, down)
    assert demo.sign_test(0, 0) == 1.0


def test_a_terminated_demo_stops_the_step_it_runs(tmp_path):
    """common.run (every demo script's steps): SIGTERM to the demo ends the running step too, so no trainer
    is left writing into the run folder after the demo is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "step.pid"
    step = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    demo_process = subprocess.Popen(
        [sys.executable, "-c", f"import common; common.run([{sys.executable!r}, '-c', {step!r}])"], 
        cwd=ROOT / "experiments")
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    step_pid = int(pid_file.read_text())
    demo_process.send_signal(signal.SIGTERM)
    assert demo_process.wait(timeout=30) != 0  # the demo fails: its step did not finish
    try:
        alive = open(f"/proc/{step_pid}/stat").read().split()[2] != "Z"  # not even a zombie
    except FileNotFoundError:
        alive = False
    if alive:
        os.kill(step_pid, signal.SIGKILL)  # leave nothing behind when the check fails
    assert not alive
