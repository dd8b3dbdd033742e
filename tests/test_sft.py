"""sft.py end to end on CPU: 2 ranks equal 1 process, and a killed run resumes to the same weights."""
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import kill_after_first_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "tiny", "--max-steps", "4", "--batch-size", "8", "--micro-batch-size", "2", "--log-steps", "1"]


def run(args, nproc=1, check=True, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run(launcher + args, cwd=ROOT, env=env, check=check, capture_output=True, text=True, **kwargs)


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_ranks_reach_the_same_weights_as_one_process(tmp_path):
    run(["sft.py", *SMALL, "--output-dir", str(tmp_path / "one")])
    run(["sft.py", *SMALL, "--output-dir", str(tmp_path / "two")], nproc=2)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = weights_of_fresh_tiny_model()
    # a tied lm_head is saved once, as the embedding (as transformers' save_pretrained does)
    assert one.keys() == start.keys() - {"lm_head.weight"}
    assert max_difference(one, {k: start[k] for k in one}) > 1e-3   # it trained
    assert max_difference(one, two) < 2e-5            # and the sharded run did the same thing



def test_token_budget_micro_batches_on_two_ranks_take_the_count_based_steps(tmp_path):
    """--max-tokens-per-micro-batch regroups each rank's examples (the ranks may get different numbers of
    micro-batches: the shorter one runs empty ones); the loss is normalised by the global token count, so
    the steps are those of --micro-batch-size 2 in one process."""
    run(["sft.py", *SMALL, "--output-dir", str(tmp_path / "one")])
    run(["sft.py", *SMALL, "--max-tokens-per-micro-batch", "512", "--output-dir", str(tmp_path / "budget")],
        nproc=2)
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "budget")) < 2e-5


def weights_of_fresh_tiny_model():
    from mathrl import models

    model, _ = models.build_tiny_model(seed=0)
    return dict(model.state_dict())


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = ["sft.py", "--preset", "tiny", "--max-steps", "8", "--save-steps", "2", "--batch-size", "8",
            "--micro-batch-size", "4"]
    run(args + ["--output-dir", str(tmp_path / "straight")])

    interrupted = tmp_path / "interrupted"
    kill_after_first_checkpoint([sys.executable, *args, "--output-dir", str(interrupted)], interrupted)
    # a checkpoint that was being written when the process died must never be loaded
    (interrupted / ".partial-checkpoint-6").mkdir()
    (interrupted / ".partial-checkpoint-6" / "config.json").write_text("{ broken")

    resumed = run(args + ["--output-dir", str(interrupted)])
    assert "resumed from" in resumed.stdout
    assert max_difference(weights(tmp_path / "straight"), weights(interrupted)) < 1e-6
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step logged once, even the ones redone after the kill


def test_bad_data_fails_fast_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "solution": "2", "answer": "2"}\n{"problem": "2+2?", "solution": "4"}\n')
    result = run(["sft.py", "--model", "tiny", "--data", str(bad), "--output-dir", str(tmp_path / "o")], check=False)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "bad.jsonl" in last_line and "answer" in last_line and "Traceback" not in result.stderr
