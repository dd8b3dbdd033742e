"""GRPO with the vLLM engine on CPU: after real optimizer steps the engine holds the trainer's weights.

The guard is measured, not assumed: every step logs the gap between the engine's log-probs of
the sampled tokens and the trainer's recomputation under the same weights. With the weight push
it stays at float32 round-off; with the push deliberately skipped it does not. Under torchrun each
rank's engine samples its own stream, and a run ends without tracebacks or avoidable warnings.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import grpo  # noqa: E402
from mathrl import distributed, models  # noqa: E402
from mathrl.engine import HFEngine, Sampling  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LONG_PROMPT = "Solve for (x, y):\n" + "3x + 4y = 10\n" * 20   # longer than vLLM's 128-token CPU KV block


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    """A random tiny policy (head_dim 32, which vLLM's CPU attention accepts) saved to disk."""
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("start"), hidden_size=128, num_layers=2, num_heads=4, seed=1)


def grpo_args(model, out):
    # cosine rewards depend on length, so even a random policy gets a learning signal
    return ["--model", str(model), "--data", "linear", "--template", "plain", "--engine", "vllm",
            "--rewards", "cosine:1", "--max-steps", "3", "--prompts-per-step", "4", "--num-generations", "4",
            "--micro-batch-size", "8", "--temperature", "1.0", "--max-prompt-length", "320",
            "--max-completion-length", "48", "--lr", "3e-3", "--beta", "0.0", "--no-bf16",
            "--no-gradient-checkpointing", "--grader-workers", "1", "--output-dir", str(out)]


def run_grpo_in_process(argv, monkeypatch, skip_sync=False):
    engines = []

    def capture(*args, **kwargs):
        engine = trainer_engine(*args, **kwargs)
        if skip_sync:  # the push "happens" (the CPU engine's sleep keeps the weights) but sends nothing
            monkeypatch.setattr(engine, "push_weights", lambda model: setattr(engine, "weights_valid", True))
        monkeypatch.setattr(engine, "close", lambda: None)  # the test samples from it after the run
        engines.append(engine)
        return engine

    from mathrl.engine import trainer_engine
    monkeypatch.setattr(grpo, "trainer_engine", capture)
    grpo.main(argv)
    return engines[0]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_engine_follows_the_trainer_through_grpo_steps(start_model, tmp_path, monkeypatch):
    args = grpo_args(start_model, tmp_path / "run") + ["--vllm-cpu-kv-cache-gb", "0.0625"]
    engine = run_grpo_in_process(args, monkeypatch)
    # On CPU the KV cache has the flag's size (64 MiB), not a share of free RAM: count what vLLM allocated
    cache = engine.llm.llm_engine.vllm_config.cache_config
    config = models.load_model(str(start_model)).config
    head_dim = config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # K and V in fp32
    assert 0.9 * (64 << 20) <= cache.num_gpu_blocks * cache.block_size * bytes_per_token <= 64 << 20
    logged = metrics(tmp_path / "run")
    assert len(logged) == 3 and all(m["grad_norm"] > 0 for m in logged)
    assert max(m["logprob_gap_max"] for m in logged) < 1e-4

    trained = models.load_model(str(tmp_path / "run"))
    assert max((a - b).abs().max().item() for a, b in zip(
        trained.state_dict().values(), models.load_model(str(start_model)).state_dict().values())) > 1e-3
    tokenizer = models.load_tokenizer(str(tmp_path / "run"))
    dist = distributed.init_distributed()
    prompts = ["Solve for x:\n2x + 1 = 7\nSolution:\n", LONG_PROMPT + "Solution:\n"]
    assert len(tokenizer(prompts[1])["input_ids"]) > 128
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=24)
    from_vllm = engine.generate(prompts, greedy)
    from_hf = HFEngine(trained, tokenizer, dist).generate(prompts, greedy)
    for v, h in zip(from_vllm, from_hf):
        assert v[0].token_ids == h[0].token_ids
        assert max(abs(a - b) for a, b in zip(v[0].logprobs, h[0].logprobs)) < 1e-4


def test_a_skipped_weight_sync_is_caught_by_the_gap_metric(start_model, tmp_path, monkeypatch):
    run_grpo_in_process(grpo_args(start_model, tmp_path / "stale"), monkeypatch, skip_sync=True)
    logged = metrics(tmp_path / "stale")
    assert logged[0]["logprob_gap_max"] < 1e-4        # the first batch was sampled with the same weights
    assert logged[-1]["logprob_gap_max"] > 1e-2       # later batches come from stale weights


def test_a_lora_policy_reaches_the_engine_merged(start_model, tmp_path, monkeypatch):
    """With LoRA the engine holds W + (alpha / r) B A after every push: the same log-probs as the trainer's
    policy with its adapters on (an engine given the base weights alone drifts away, as above)."""
    out = tmp_path / "lora"
    run_grpo_in_process(grpo_args(start_model, out) + ["--lora-rank", "4", "--beta", "0.04"], monkeypatch)
    logged = metrics(out)
    assert len(logged) == 3 and max(m["logprob_gap_max"] for m in logged) < 1e-4
    assert logged[-1]["kl"] > 0  # the adapters moved the policy away from its reference, the base


def assert_clean_exit(run: subprocess.CompletedProcess):
    """Exit 0, no traceback (vLLM's teardown once ran after the process group was gone and failed on
    every rank), no warning from the weight pushes (vLLM's reload names the layers it skipped)."""
    assert run.returncode == 0, run.stderr[-3000:]
    for text in (run.stdout, run.stderr):
        assert "Traceback" not in text and "Invalid process group" not in text
        assert "Failed to load weights" not in text


def test_two_ranks_with_one_engine_each(start_model, tmp_path):
    out = tmp_path / "two"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "grpo.py", *grpo_args(start_model, out)], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert_clean_exit(run)
    logged = metrics(out)
    assert len(logged) == 3 and max(m["logprob_gap_max"] for m in logged) < 1e-4
    assert (out / "model.safetensors").exists()


SAME_PROMPT_TWO_RANKS = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from mathrl import distributed, models
from mathrl.engine import Sampling, make_engine
dist = distributed.init_distributed()
distributed.seed_everything(0)  # deliberately the same generators on both ranks
model, tokenizer = models.load_model(sys.argv[2]), models.load_tokenizer(sys.argv[2])
engine = make_engine("vllm", model, tokenizer, sys.argv[2], dist, dtype="float32", max_model_len=256,
                     kv_cache_memory_bytes=16 << 20)
sampling = Sampling(n=4, temperature=1.0, max_new_tokens=12)
first = [c.token_ids for c in engine.generate(["Solve for x:\n2x + 1 = 7\n"], sampling)[0]]
engine.push_weights(model)  # a push, as after every update: it must not warn
second = [c.token_ids for c in engine.generate(["Solve for x:\n2x + 1 = 7\n"], sampling)[0]]
with open(os.path.join(sys.argv[3], f"rank{dist.rank}.json"), "w") as f:
    json.dump([first, second], f)
engine.close()
distributed.shutdown(dist)
'''


def test_two_ranks_sample_the_same_prompt_differently(start_model, tmp_path):
    """Each rank's engine draws its own stream, even from equal torch generators: same prompt,
    different completions on each rank; and the run ends cleanly (engine.close before shutdown)."""
    script = tmp_path / "same_prompt.py"
    script.write_text(SAME_PROMPT_TWO_RANKS)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(ROOT), str(start_model), str(tmp_path)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert_clean_exit(run)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for step in range(2):
        assert len({tuple(ids) for ids in ranks[0][step]}) > 1  # it does sample
        assert not {tuple(ids) for ids in ranks[0][step]} & {tuple(ids) for ids in ranks[1][step]}


def test_vllm_flags_are_checked_before_anything_loads(tmp_path):
    for flag, value in (("--vllm-cpu-kv-cache-gb", "0"), ("--vllm-max-num-batched-tokens", "0")):
        run = subprocess.run([sys.executable, "grpo.py", "--model", str(tmp_path / "none"), flag, value,
                              "--output-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode != 0 and "Traceback" not in run.stderr
        assert flag in run.stderr.strip().splitlines()[-1]
