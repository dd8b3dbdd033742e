"""sft.py --lora-rank on CPU, the tiny model: it learns, only the adapters move, the final folder is a
plain merged model, a killed run resumes exactly, 2 ranks equal 1 process, bad flags are one line."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_after_first_checkpoint
from test_sft import max_difference, run, weights

LORA = ["--preset", "tiny", "--batch-size", "8", "--micro-batch-size", "4", "--log-steps", "1",
        "--lora-rank", "4", "--lora-alpha", "8"]


def losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def adapted_tiny_model(adapter_folder):
    """The start of every tiny LoRA run (seed 0), with a run's adapters loaded into it."""
    from mathrl import lora, models

    model, _ = models.build_tiny_model(seed=0)
    start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora.apply_lora(model, rank=4, alpha=8.0, seed=0)
    lora.load_adapter(model, adapter_folder)
    return model.eval(), start


def test_lora_run_learns_and_its_final_folder_is_the_merged_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from mathrl import lora

    out = tmp_path / "lora"
    run(["sft.py", *LORA, "--max-steps", "12", "--output-dir", str(out)])
    curve = losses(out)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < curve[0] - 0.2  # it learns

    model, start = adapted_tiny_model(out / "adapter")
    merged = weights(out)
    assert merged.keys() == start.keys() - {"lm_head.weight"}  # the base names only, tied head once
    targets = lora.lora_modules(model)
    for name, tensor in merged.items():  # only adapters changed: W' - s B A is the start, bit for bit close
        module = targets.get(name.removesuffix(".weight"))
        if module is None:
            assert torch.equal(tensor, start[name]), name
        else:
            update = module.scale * module.lora_B.weight @ module.lora_A.weight
            assert update.abs().max() > 1e-4, name                       # this layer trained
            assert torch.allclose(tensor - update, start[name], atol=1e-6), name

    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers loads it as it is
    assert type(plain).__name__ == "Qwen2ForCausalLM" and not lora.lora_modules(plain)
    ids = torch.randint(3, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_killed_lora_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    args = ["sft.py", *LORA, "--max-steps", "8", "--save-steps", "2", "--lora-dropout", "0.1"]
    run(args + ["--output-dir", str(tmp_path / "straight")])

    interrupted = tmp_path / "interrupted"
    kill_after_first_checkpoint([sys.executable, *args, "--output-dir", str(interrupted)], interrupted)
    checkpoint = interrupted / "checkpoint-2"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # the adapters in place of the full model
    resumed = run(args + ["--output-dir", str(interrupted)])
    assert "resumed from" in resumed.stdout
    assert max_difference(weights(tmp_path / "straight"), weights(interrupted)) < 1e-6
    assert losses(tmp_path / "straight") == pytest.approx(losses(interrupted), abs=1e-6)

    # a LoRA checkpoint is not resumed by a full fine-tuning run (nor the other way round)
    full = run(["sft.py", "--preset", "tiny", "--output-dir", str(interrupted)], check=False)
    assert full.returncode != 0 and "LoRA checkpoint" in full.stderr.strip().splitlines()[-1]


def test_two_ranks_reach_the_same_lora_weights_as_one_process(tmp_path):
    args = ["sft.py", *LORA, "--max-steps", "4"]
    run(args + ["--output-dir", str(tmp_path / "one")])
    run(args + ["--output-dir", str(tmp_path / "two")], nproc=2)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max_difference(one, two) < 2e-5
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert max_difference(a, b) < 2e-5


@pytest.mark.parametrize("script, extra, words", [
    ("sft.py", ["--lora-rank", "4", "--lora-targets", "q,nope"], "'nope' matches no nn.Linear"),
    ("sft.py", ["--lora-alpha", "16"], "--lora-alpha needs --lora-rank > 0"),
    ("sft.py", ["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout 1.0: must be in [0, 1)"),
])
def test_bad_lora_flags_are_one_line_before_any_model_loads(tmp_path, script, extra, words):
    result = run([script, "--preset", "tiny", *extra, "--output-dir", str(tmp_path / "o")], check=False,
                 timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert words in result.stderr.strip().splitlines()[-1]
    assert "parameters" not in result.stdout  # the trainer's "... M parameters" line: no model was loaded
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_lora_flags_off_by_default_and_the_dry_run_plans_the_adapters():
    import sft
    from mathrl import flags, memplan

    cfg = flags.parse_args(sft.Config, sft.PRESETS, ["--preset", "tiny"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (0, 0.0, 0.0)
    full_cfg = flags.parse_args(sft.Config, sft.PRESETS, ["--model", "Qwen/Qwen2.5-1.5B-Instruct"])
    full = memplan.make_plan("sft", full_cfg, 1, 80)
    cfg = flags.parse_args(sft.Config, sft.PRESETS, ["--preset", "grpo-vs-sft-lora"])
    plan = memplan.make_plan("sft", cfg, 1, 80)
    # r (in + out) per layer: 16 x (2 x (1536 + 1536) + 2 x (1536 + 256) + 3 x (1536 + 8960)) x 28
    adapters = 16 * (2 * (1536 + 1536) + 2 * (1536 + 256) + 3 * (1536 + 8960)) * 28
    rows = {what.split(",")[0]: size for _, what, size in plan.rows}
    full_rows = {what.split(",")[0]: size for _, what, size in full.rows}
    assert rows["Adam moments"] == 8 * adapters and rows["gradients"] == 4 * adapters
    assert rows["weights"] == full_rows["weights"] + 4 * adapters  # the frozen fp32 base + A, B
    # Sharded: the frozen base has no gradients, so FSDP's working set holds the adapters' gradients only
    # (bf16 unsharded + the fp32 reduce-scatter input) and the frozen root has no reduce-scatter at all
    sharded = {what.split(":")[0]: size for _, what, size in memplan.make_plan("sft", cfg, 8, 80).rows}
    shape = memplan.model_shape(cfg.model)
    frozen = shape.root_parameters() + 2 * shape.layer_parameters()
    assert sharded["gathered by FSDP"] == 2 * frozen + (2 + 4) * adapters // 28
    assert not any("reduce-scatter" in what for what in sharded)


def test_grpo_with_lora_plans_no_second_model_for_the_reference():
    import grpo
    from mathrl import flags, lora, memplan

    full_cfg = flags.parse_args(grpo.Config, grpo.PRESETS, ["--preset", "limo"])
    cfg = flags.parse_args(grpo.Config, grpo.PRESETS, ["--preset", "limo", "--lora-rank", "16"])
    assert cfg.beta > 0  # the preset's KL term: LoRA keeps it, against the policy with its adapters off
    full, plan = (memplan.make_plan("grpo", c, 1, 80) for c in (full_cfg, cfg))
    assert any(what.startswith("reference model") for _, what, _ in full.rows)
    assert not any(what.startswith("reference model") for _, what, _ in plan.rows)
    rows = {what.split(",")[0]: size for _, what, size in plan.rows}
    adapters = lora.adapter_parameter_count(memplan.model_shape(cfg.model), 16)
    assert rows["Adam moments"] == 8 * adapters and rows["gradients"] == 4 * adapters
    assert plan.update_bytes < 0.5 * full.update_bytes  # 23.2 against 48.8 GiB on one GPU
