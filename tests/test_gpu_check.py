"""tools/gpu_check.sh --dry-run: the GPU day's script on CPU at a tiny size, every part, so it cannot rot
before the day it runs on a GPU. Its figures are checked against the references they claim."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import grpo
import sft
from mathrl import flags, memplan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(out), "PYTHON": sys.executable}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"figures in {out / 'gpu_check.json'}" in result.stdout
    return out, json.loads((out / "gpu_check.json").read_text())


def test_every_part_ran_and_the_text_says_it_was_a_dry_run(report):
    out, figures = report
    assert figures["errors"] == {} and figures["dry_run"] and figures["device"] == "cpu"
    assert set(figures["seconds"]) == {"tests", "memory_and_speed", "trainers"}
    assert (out / "gpu_check.txt").read_text().startswith("GPU check on cpu") and "DRY RUN" in \
        (out / "gpu_check.txt").read_text()


def test_the_gpu_tests_were_collected_and_skip_on_cpu_with_their_reason(report):
    tests = report[1]["tests"]
    names = {case["test"].split("::")[1] for case in tests["cases"]}
    assert tests["returncode"] == 0 and {"test_fsdp2_bf16_update_at_world_size_one",
                                         "test_nan_guard_stops_an_fsdp2_update_before_the_step"} <= names
    assert all(case["outcome"] == "skipped" and "needs a CUDA GPU" in case["message"] for case in tests["cases"])


@pytest.mark.parametrize("key", ["grpo_update/one_process", "grpo_update/fsdp2", "sft_step/one_process",
                                 "sft_step/fsdp2"])
def test_memory_figures_sit_beside_the_plan_of_the_same_config(report, key):
    out, figures = report
    figure = figures["memory_and_speed"][key]
    trainer, fsdp_on = key.split("_")[0], key.endswith("fsdp2")
    size, model = gpu_check.TINY, str(out / "tiny-shape")
    if trainer == "grpo":
        cfg = flags.parse_args(grpo.Config, grpo.PRESETS, size.grpo_args + ["--model", model])
        tokens = size.grpo_rows * (cfg.max_prompt_length + cfg.max_completion_length)
    else:
        cfg = flags.parse_args(sft.Config, sft.PRESETS, ["--preset", "limo", "--model", model,
                                                         "--max-length", str(size.sft_tokens)])
        tokens = size.sft_tokens
    plan = memplan.make_plan(trainer, cfg, 1, 80, fsdp=fsdp_on)
    assert figure["plan_bytes"] == plan.update_bytes - memplan.RESERVE_GIB * memplan.GiB
    assert figure["ratio_measured_to_plan"] == pytest.approx(figure["peak_bytes"] / figure["plan_bytes"])
    assert figure["peak_bytes"] > 0 and figure["tokens"] == tokens
    assert figure["tokens_per_s"] == pytest.approx(tokens / figure["seconds"])
    assert figure["mfu"] is None   # no GPU, no peak FLOP/s to compare with
    if key == "grpo_update/one_process":
        engine = figure["hf_engine"]
        assert engine["sequences"] == size.prompts * size.n
        assert 0 < engine["generated_tokens"] <= engine["sequences"] * size.max_new_tokens


def test_both_trainers_were_killed_after_a_checkpoint_resumed_and_reload(report):
    out, figures = report
    for name in ("grpo", "sft"):
        run = figures["trainers"][name]
        assert run["ok"] and run["killed_after_checkpoint"] and run["reloaded_finite"], run
        assert run["resumed"] == f"{name}: resumed from {out / 'runs' / name / 'checkpoint-2'} at step 2"
        steps = [json.loads(line)["step"] for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, gpu_check.TINY.trainer_steps + 1))


def test_real_sizes_refuse_to_run_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().startswith("error: no CUDA GPU")
    assert "\n" not in result.stderr.strip()
