"""Bad command lines and inputs fail in seconds with one line naming the flag or the file, before any
model loads; abbreviated flags are errors; the NaN guard stops a run without writing weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import rewards
import sft
from mathrl import flags, models

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--model", "{dir}/tiny"]

# (script, arguments, what the error line must name). Every case also gets --output-dir {dir}/out
# unless it names its own, so none can resume from a checkpoint lying in the project's runs/.
BAD_INPUTS = [
    ("sft.py", ["--preset", "tiny", "--max-st", "3"], "--max-st"),           # abbreviations are not guessed
    ("grpo.py", ["--preset"], "--preset"),
    ("grpo.py", [*TINY, "--temperature", "0"], "--temperature"),
    ("ppo.py", [*TINY, "--temperature", "0"], "--temperature"),
    ("grpo.py", [*TINY, "--rewards", "accuracy:nan"], "--rewards"),
    ("grpo.py", [*TINY, "--rewards", "accuracy:1,accuracy:2"], "--rewards"),  # was: silently accuracy:2
    ("sft.py", ["--max-steps", "0"], "--max-steps"),
    ("grpo.py", [*TINY, "--max-steps", "-1"], "--max-steps"),
    ("sft.py", ["--lr", "nan"], "--lr"),
    ("ppo.py", [*TINY, "--critic-lr", "inf"], "--critic-lr"),
    ("sft.py", ["--seed", "-1"], "--seed"),
    ("sft.py", ["--save-steps", "0"], "--save-steps"),
    ("sft.py", ["--batch-size", "0"], "--batch-size"),
    ("sft.py", ["--micro-batch-size", "0"], "--micro-batch-size"),
    ("grpo.py", [*TINY, "--prompts-per-step", "0"], "--prompts-per-step"),
    ("grpo.py", [*TINY, "--tis-cap", "2", "--top-p", "0.9"], "--tis-cap"),   # nucleus log-probs: no staleness
    ("grpo.py", [*TINY, "--dynamic-sampling", "--max-sampling-rounds", "0"], "--max-sampling-rounds"),
    ("grpo.py", [*TINY, "--mini-batches", "3"], "--mini-batches"),          # 32 prompts: not whole groups
    ("grpo.py", [*TINY, "--rewards", "accuracy:1,overlong:1"], "--overlong-buffer"),  # no buffer given
    ("ppo.py", [*TINY, "--rewards", "overlong", "--overlong-buffer", "999"], "--overlong-buffer"),  # > limit
    ("grpo.py", [*TINY, "--max-tokens-per-micro-batch", "100"], "--max-tokens-per-micro-batch"),  # < 320
    ("ppo.py", [*TINY, "--max-tokens-per-micro-batch", "100"], "--max-tokens-per-micro-batch"),
    ("sft.py", ["--preset", "tiny", "--max-tokens-per-micro-batch", "100"], "--max-tokens-per-micro-batch"),
    ("ppo.py", [*TINY, "--train-batch-size", "0"], "--train-batch-size"),
    ("grpo.py", [*TINY, "--lora-rank", "4", "--lora-targets", "q,nope"], "--lora-targets"),  # config only
    ("ppo.py", [*TINY, "--lora-rank", "4", "--lora-alpha", "-1"], "--lora-alpha"),
    ("sft.py", ["--output-dir", "{dir}/a-file"], "--output-dir"),
    ("sft.py", ["--output-dir", "{dir}/a-file/run"], "--output-dir"),
    ("grpo.py", ["--preset", "tiny"], "--model"),  # the default model is a hub id, absent from the cache
    ("ppo.py", ["--preset", "tiny"], "--model"),
    ("sft.py", ["--data", "linear", "--model", "nobody-here/no-such-model"], "--model"),  # data load first
    ("sft.py", ["--data", "linear", "--model", "{dir}/not-a-model"], "--model"),
    ("ppo.py", [*TINY, "--critic", "{dir}/not-a-model"], "--critic"),
    ("ppo.py", [*TINY, "--warmup-steps", "5"], "--warmup-steps"),  # the tiny preset's mathrl counts by ratio
    ("grpo.py", ["--preset", "tiny", "--model", "{dir}/model.gguf", "--engine", "vllm"], "--engine"),
    ("sft.py", ["--data", "{dir}/empty.jsonl"], "empty.jsonl"),
    ("sft.py", ["--data", "{dir}/latin1.jsonl"], "latin1.jsonl line 2"),
    ("sft.py", ["--data", "{dir}/broken.parquet"], "broken.parquet"),
    ("grpo.py", [*TINY, "--data", "{dir}/good.jsonl", "--max-prompt-length", "3"], "--max-prompt-length"),
    ("grpo.py", [*TINY, "--data", "{dir}/good.jsonl", "--template", "qwen-math"], "--template"),
    ("sft.py", ["--model", "tiny", "--data", "{dir}/good.jsonl", "--template", "qwen-math"], "--template"),
    ("sft.py", ["--preset", "tiny", "--data", "{dir}/good.jsonl", "--max-length", "8"], "--max-length"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """What the bad command lines point at: a tiny model, broken data files, a file, an empty folder."""
    folder = tmp_path_factory.mktemp("cli")
    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    model.save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    (folder / "empty.jsonl").write_text("")
    good = '{"problem": "1 + 1", "answer": "2", "solution": "\\\\boxed{2}"}\n'
    (folder / "good.jsonl").write_text(good)
    latin1 = '{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1")
    (folder / "latin1.jsonl").write_bytes(good.encode() + latin1)
    (folder / "broken.parquet").write_bytes(b"PAR1 cut short by a full disk")
    (folder / "a-file").write_text("not a folder")
    (folder / "not-a-model").mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    return folder


def run(script: str, args: list[str], folder: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, script, *with_output_dir(args, folder)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


def with_output_dir(args: list[str], folder: Path) -> list[str]:
    args = [a.replace("{dir}", str(folder)) for a in args]
    return args if "--output-dir" in args else args + ["--output-dir", str(folder / "out")]


# Every bad command line runs as `python SCRIPT ARGS` would (the script's __main__ block, its exit code, what
# reaches file descriptor 2), all in one process: a Python start with torch costs seconds, the checks do not.
AS_SCRIPTS = r"""
import json, os, runpy, sys, tempfile, traceback
results = []
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    with tempfile.TemporaryFile("w+") as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:  # what the interpreter does with an uncaught SystemExit
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        results.append({"returncode": code, "stderr": captured.read()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_input_results(inputs) -> dict:
    cases = [(script, with_output_dir(args, inputs)) for script, args, _ in BAD_INPUTS]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", AS_SCRIPTS, json.dumps(cases)], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    return {case_id(case): subprocess.CompletedProcess(case[0], o["returncode"], "", o["stderr"])
            for case, o in zip(BAD_INPUTS, outcomes)}


def case_id(case) -> str:
    return " ".join([case[0], *case[1]]).replace("{dir}/", "")


def assert_one_line_error(result: subprocess.CompletedProcess, names: str):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "error" in last and names in last, result.stderr[-3000:]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case_id(c) for c in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_flag_or_file(inputs, bad_input_results, case):
    assert_one_line_error(bad_input_results[case_id(case)], case[2])
    assert not (inputs / "out" / "model.safetensors").exists()


def test_one_bad_command_line_in_a_process_of_its_own(inputs):
    """The shared process above stands for separate ones: the same case run alone ends the same way."""
    script, args, names = BAD_INPUTS[2]
    assert_one_line_error(run(script, args, inputs), names)


def test_a_hub_id_that_cannot_be_fetched_fails_at_once_without_offline_mode(inputs):
    """Without HF_HUB_OFFLINE the hub is asked once, with a short timeout: where it cannot be reached
    (or the id does not exist) that is the message, not the loader's minute of retries."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run([sys.executable, "sft.py", "--data", "linear", "--model",
                             "nobody-here/no-such-model", "--output-dir", str(inputs / "out")], cwd=ROOT,
                            env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "--model")


def test_presets_are_defaults_and_abbreviations_are_errors(capsys):
    parse = lambda *argv: flags.parse_args(sft.Config, sft.PRESETS, list(argv))
    assert parse().max_steps == 192 and parse("--preset", "tiny").max_steps == 1200  # the limo preset's 192
    assert parse("--preset", "tiny", "--max-steps", "3").max_steps == 3
    assert parse("--max-steps=3", "--preset=tiny").max_steps == 3         # order does not matter
    config = parse("--preset", "limo", "--no-bf16", "--lr", "1e-4")
    assert (config.bf16, config.lr, config.max_length, config.preset) == (False, 1e-4, 16384, "limo")
    for abbreviated in (["--max-st", "3"], ["--preset", "tiny", "--max-st", "3"], ["--pre", "tiny"]):
        with pytest.raises(SystemExit) as stopped:
            parse(*abbreviated)
        assert stopped.value.code == 2
        assert f"unrecognized arguments: {abbreviated[-2]}" in capsys.readouterr().err


def test_reward_weights_are_finite_numbers_named_once():
    assert rewards.parse_weights("format:1, cosine:2") == {"format": 1.0, "cosine": 2.0}
    for spec, problem in [("accuracy:1,accuracy:2", "twice"), ("accuracy:nan", "not finite"),
                          ("accuracy:-inf", "not finite"), ("accuracy:x", "not a number"),
                          ("acc", "unknown")]:
        with pytest.raises(ValueError, match=problem):
            rewards.parse_weights(spec)


def test_a_data_file_whose_name_holds_a_comma_is_a_file_not_a_mixture(tmp_path):
    path = tmp_path / "train,v2.jsonl"
    path.write_text('{"problem": "1 + 1", "answer": "2"}\n')
    assert [p["answer"] for p in data.load_problems(str(path))] == ["2"]
    assert [p["answer"] for p in data.load_problems(f"limo={path}")] == ["2"]


# The NaN guard, forced two ways. sft: an absurd but finite learning rate, so the first update makes the
# weights overflow the next forward pass. grpo, ppo: the policy's log-probs turn NaN in the update's
# forward pass (an untrained model's rewards are all equal, so its advantages, and its gradients, are 0).
NAN_IN_UPDATE = """
import runpy, sys, torch
from mathrl import sequences
real = sequences.next_token_scores
def nan_when_training(*args, **kwargs):
    logp, entropy = real(*args, **kwargs)
    return (logp * float("nan") if torch.is_grad_enabled() else logp), entropy
sequences.next_token_scores = nan_when_training
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
NAN_RUNS = {
    "sft": ["sft.py", "--preset", "tiny", "--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "4",
            "--lr", "1e30"],
    "grpo": ["-c", NAN_IN_UPDATE, "grpo.py", *TINY, "--data", "{dir}/good.jsonl", "--max-steps", "2",
             "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "8",
             "--save-steps", "1"],
    "ppo": ["-c", NAN_IN_UPDATE, "ppo.py", *TINY, "--data", "{dir}/good.jsonl", "--max-steps", "2",
            "--prompts-per-step", "2", "--num-generations", "2", "--train-batch-size", "4",
            "--max-completion-length", "8", "--critic-warmup-steps", "0", "--save-steps", "1"],
}


@pytest.mark.parametrize("trainer", sorted(NAN_RUNS))
def test_nan_guard_stops_without_writing_weights(inputs, tmp_path, trainer):
    script, *args = NAN_RUNS[trainer]
    result = run(script, [*args, "--output-dir", str(tmp_path / "run")], inputs)
    assert_one_line_error(result, "is nan at optimizer step 1" if trainer != "sft" else "is nan")
    assert "stopped, nothing more saved" in result.stderr
    assert not list((tmp_path / "run").rglob("*.safetensors")) and not list((tmp_path / "run").rglob("*.pt"))


def test_nan_guard_under_two_ranks_stops_both_and_says_it_once(tmp_path):
    """Every rank sees the same global gradient norm: both stop at the same step, rank 0 alone says why."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *NAN_RUNS["sft"], "--output-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count("stopped, nothing more saved") == 1, result.stderr[-3000:]
    assert not list((tmp_path / "run").rglob("*.safetensors"))
