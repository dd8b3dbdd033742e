"""What a long run meets: kill -9 at any moment, and a disk that fills up during a checkpoint.

A killed run, restarted with the same command (twice), must end with the uninterrupted run's weights
and logs, and leave no process behind; a full disk must leave the previous checkpoint usable."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mathrl import checkpoints, distributed, models

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMING = ("time", "tokens_per_s", "step_s")  # the only fields two identical runs may differ in


def same_weights(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def log_records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def live_processes_of_session(session: int) -> list[str]:
    """Every process still running (zombies aside) that a run started with start_new_session: its
    children keep the session id when their parent dies and they are handed to init."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, _, _, sid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:4]
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if int(sid) == session and state != "Z":
            alive.append(f"{pid}: {command[:200]}")
    return alive


def kill_at(process, moment, rng: random.Random, max_delay: float, stop_early=lambda: False) -> float:
    """SIGKILL `process` a random 0..max_delay s after moment() becomes true (at once if stop_early()
    does first); then every process of its session must be gone within 10 s."""
    deadline = time.time() + 300
    while not moment() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    delay = rng.uniform(0, max_delay)
    until = time.time() + delay
    while time.time() < until and not stop_early():
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = time.time()
    while live_processes_of_session(process.pid) and time.time() < killed_at + 10:
        time.sleep(0.2)
    left = live_processes_of_session(process.pid)
    for line in left:  # leave nothing behind on the test machine, whatever the outcome
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert not left, f"alive 10 s after kill -9 of the trainer: {left}"
    return delay


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


GRPO = ["--data", "linear", "--template", "plain", "--engine", "hf", "--rewards", "accuracy:1,format:0.5",
        "--max-steps", "6", "--save-steps", "3", "--prompts-per-step", "4", "--num-generations", "4",
        "--micro-batch-size", "8", "--temperature", "1.0", "--max-prompt-length", "64", "--max-completion-length",
        "24", "--lr", "3e-3", "--beta", "0.04", "--num-iterations", "2", "--no-bf16", "--no-gradient-checkpointing",
        "--grader-workers", "1", "--log-completions-steps", "1"]


def test_killed_twice_at_random_moments_resumes_to_the_uninterrupted_run(tmp_path):
    start = tmp_path / "start"
    model, tokenizer = models.build_tiny_model(hidden_size=64, num_layers=2, num_heads=2, seed=1)
    model.save_pretrained(start)
    tokenizer.save_pretrained(start)
    command = [sys.executable, "grpo.py", "--model", str(start), *GRPO, "--output-dir"]
    subprocess.run(command + [str(tmp_path / "straight")], cwd=ROOT, env=ENV, check=True, capture_output=True)

    seed = random.randrange(10**6)
    rng, out = random.Random(seed), tmp_path / "killed"
    launch = lambda: subprocess.Popen(command + [str(out)], cwd=ROOT, env=ENV, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # 1. before the first checkpoint is complete: during step 1 or 2, or while checkpoint-3 is written
    first_lines = rng.choice([0, 1, 2])
    kill_at(launch(), lambda: lines(out / "metrics.jsonl") >= first_lines, rng, 1.0,
            stop_early=lambda: (out / ".partial-checkpoint-3").exists())
    # 2. after it: during step 4 or 5 (the restart began afresh, or from checkpoint-3 if kill 1 came late)
    second_lines = rng.choice([3, 4])
    kill_at(launch(), lambda: (out / "checkpoint-3").exists() and lines(out / "metrics.jsonl") >= second_lines,
            rng, 0.5)
    assert not (out / "model.safetensors").exists(), f"seed {seed}: the second run finished before the kill"

    resumed = subprocess.run(command + [str(out)], cwd=ROOT, env=ENV, check=True, capture_output=True, text=True)
    assert f"resumed from {out / 'checkpoint-3'} at step 3" in resumed.stdout, seed
    assert same_weights(tmp_path / "straight", out) <= 1e-6, f"seed {seed}"
    for name in ("metrics.jsonl", "trajectories.jsonl", "completions.jsonl"):  # line for line
        assert log_records(tmp_path / "straight" / name) == log_records(out / name), f"{name}, seed {seed}"


def mount_tmpfs(folder: Path, size: str):
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")


# A checkpoint of this model takes ~640 kB on a tmpfs: the disk fills while the second one writes its
# weights (700k), or its optimizer state (900k).
@pytest.mark.parametrize("size, failing", [("700k", "partial-checkpoint-2:"), ("900k", "partial-checkpoint-2/optimizer:")])
def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one(tmp_path, size, failing):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, size)
    try:
        d = distributed.Dist(0, 1, 0, torch.device("cpu"))
        model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
        optimizer.step()
        save = lambda step: checkpoints.save_checkpoint(disk, step, model, tokenizer, {"m": (model, optimizer)}, {},
                                                        {"step": step}, d, save_total_limit=1)
        save(1)
        assert checkpoints.checkpoint_problem(disk / "checkpoint-1") is None
        with pytest.raises(SystemExit) as stopped:
            save(2)
        message = str(stopped.value)
        assert failing in message and "No space left on device" in message and "checkpoint-1 is intact" in message
        assert re.search(r"\(0\.\d MiB free on its disk\)", message), message
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint-1"]  # the half-written one is removed
        assert checkpoints.latest_checkpoint(disk) == disk / "checkpoint-1"
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


SFT = ["sft.py", "--preset", "tiny", "--max-steps", "6", "--save-steps", "2", "--batch-size", "8",
       "--micro-batch-size", "4", "--save-total-limit", "1", "--output-dir"]


def test_a_run_that_fills_its_disk_stops_with_one_line_and_its_last_checkpoint_loads(tmp_path):
    """The end to end version: sft.py, whose checkpoint-4 does not fit. (That a checkpoint resumes
    to the weights of an uninterrupted run is the kill tests' subject.)"""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "18m")  # one checkpoint of the 1M-parameter model (12.3 MB) fits, two do not
    try:
        full = subprocess.run([sys.executable, *SFT, str(disk / "run")], cwd=ROOT, env=ENV, capture_output=True,
                              text=True)
        assert full.returncode != 0 and "Traceback" not in full.stderr
        last_line = full.stderr.strip().splitlines()[-1]
        assert re.search(r"could not write \S+/\.partial-checkpoint-4\S*: .* \(0\.\d MiB free on its disk\)", last_line), \
            last_line  # torch's writer words a full disk "unexpected pos 704 vs 598": the free space says it
        assert "checkpoint-2 is intact" in last_line
        assert sorted(p.name for p in (disk / "run").iterdir()) == ["checkpoint-2", "metrics.jsonl"]
        assert lines(disk / "run" / "metrics.jsonl") == 4

        assert checkpoints.latest_checkpoint(disk / "run") == disk / "run" / "checkpoint-2"
        shutil.copytree(disk / "run" / "checkpoint-2", tmp_path / "checkpoint-2")  # loading maps files: not on the tmpfs
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
    model = models.load_model(str(tmp_path / "checkpoint-2"))
    optimizer = torch.optim.AdamW(model.parameters())
    state = checkpoints.load_trainer_state(tmp_path / "checkpoint-2")
    d = distributed.Dist(0, 1, 0, torch.device("cpu"))
    assert checkpoints.restore_checkpoint(state, {"model": (model, optimizer)}, {}, d) == {"step": 2}
    assert {float(s["step"]) for s in optimizer.state.values()} == {2.0}   # Adam's state after 2 steps
