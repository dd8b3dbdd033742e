"""grpo.py and ppo.py --lora-rank on CPU: the reference policy is the policy with its adapters off (the same
KL as a separate copy of the base model), only the adapters move (and PPO's critic, trained in full), a resumed
run reaches the uninterrupted run's weights, and the final folder is the merged plain model. (The vLLM push of
the merged weights is in tests/test_grpo_vllm.py.)"""
import json
import shutil

import torch
from safetensors.torch import load_file

import grpo
import grpo_update_worker as worker
from mathrl import distributed, fsdp, lora, models


def one_update(reference_is_policy: bool) -> tuple[dict, dict]:
    """One policy_update on the fixed rollouts with LoRA adapters whose B is not zero (so the policy is not
    the base model): against the policy with its adapters off, or against a separate copy of the base."""
    dist = distributed.init_distributed()
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    policy, tokenizer = models.build_tiny_model(**sizes)
    lora.apply_lora(policy, rank=4, alpha=8.0, seed=0)
    with torch.no_grad():
        for module in lora.lora_modules(policy).values():
            module.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    reference = policy if reference_is_policy else models.build_tiny_model(**sizes)[0].eval()
    cfg = grpo.Config(micro_batch_size=2, num_iterations=2, beta=0.1, temperature=0.9, max_completion_length=16,
                      lr=1e-2, bf16=False, gradient_checkpointing=False, logprob_chunk_size=16, loss_type="grpo")
    optimizer = torch.optim.AdamW(lora.trainable_parameters(policy), lr=cfg.lr)
    scheduler = fsdp.cosine_schedule(optimizer, 2, 0.0, 1.0)
    stats = grpo.policy_update(policy, reference, optimizer, scheduler, worker.fixed_rollouts(), cfg, dist,
                               tokenizer.pad_token_id)
    assert all(module.enabled for module in lora.lora_modules(policy).values())  # switched back on
    return stats, {k: v.clone() for k, v in policy.state_dict().items()}


def test_the_reference_with_adapters_off_is_the_base_model():
    stats, weights = one_update(reference_is_policy=True)
    stats_base, weights_base = one_update(reference_is_policy=False)
    assert stats["kl"] > 1e-4  # B != 0: the policy is not the base, and the KL term says so
    assert stats == stats_base
    assert all(torch.equal(weights[k], weights_base[k]) for k in weights)


def grpo_args(model, out) -> list[str]:
    return ["--model", str(model), "--data", "linear", "--template", "plain", "--engine", "hf",
            "--rewards", "cosine:1", "--max-steps", "3", "--save-steps", "2", "--prompts-per-step", "4",
            "--num-generations", "4", "--micro-batch-size", "8", "--temperature", "1.0",
            "--max-prompt-length", "64", "--max-completion-length", "24", "--lr", "1e-2", "--beta", "0.04",
            "--num-iterations", "2", "--no-bf16", "--no-gradient-checkpointing", "--grader-workers", "1",
            "--lora-rank", "4", "--lora-dropout", "0.1", "--output-dir", str(out)]


def test_a_lora_run_trains_the_adapters_resumes_exactly_and_ends_merged(tmp_path):
    from conftest import save_tiny_model

    start = save_tiny_model(tmp_path / "start", hidden_size=64, num_layers=2, num_heads=2, seed=1)
    grpo.main(grpo_args(start, tmp_path / "straight"))
    # the same run resumed from its step-2 checkpoint (what a killed run leaves): it redoes step 3 alone
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed / "checkpoint-2")
    grpo.main(grpo_args(start, resumed))

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    assert not list(checkpoint.glob("model*.safetensors"))  # the base is the starting model, not copied
    final, again = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "straight", resumed))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)

    # the final folder is the plain architecture, W + (alpha / r) B A; A and B come from the run's adapter
    base = models.load_model(str(start)).state_dict()
    adapter = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    plain = models.load_model(str(tmp_path / "straight"))
    assert not lora.lora_modules(plain)
    scale = 4 / 4  # --lora-alpha 0: alpha = rank
    for name, tensor in plain.state_dict().items():
        prefix = f"{lora.PEFT_PREFIX}{name.removesuffix('.weight')}"
        if f"{prefix}.lora_A.weight" in adapter:
            update = scale * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
            assert update.abs().max() > 1e-4, name  # every adapter trained
            torch.testing.assert_close(tensor, base[name] + update, rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, base[name]), name  # norms, embeddings: frozen
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3] and logged[-1]["kl"] > 0  # the reference stayed the base


def test_a_ppo_lora_run_resumes_exactly_with_its_critic_trained_in_full(tmp_path):
    import ppo
    from conftest import save_tiny_model

    start = save_tiny_model(tmp_path / "start", hidden_size=64, num_layers=2, num_heads=2, seed=1)
    args = lambda out: ["--preset", "tiny", "--model", str(start), "--max-steps", "3", "--save-steps", "2",
                        "--prompts-per-step", "4", "--num-generations", "2", "--train-batch-size", "4",
                        "--micro-batch-size", "4", "--max-completion-length", "12", "--critic-warmup-steps", "1",
                        "--kl-coef", "0.05", "--actor-lr", "1e-2", "--lora-rank", "4", "--output-dir", str(out)]
    ppo.main(args(tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed / "checkpoint-2")
    ppo.main(args(resumed))

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").exists()
    assert (checkpoint / "critic" / "model.safetensors").exists()  # the critic is a full model
    base = load_file(str(start / "model.safetensors"))
    for part in ("model.safetensors", "critic/model.safetensors"):
        a, b = (load_file(str(d / part)) for d in (tmp_path / "straight", resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    actor = load_file(str(tmp_path / "straight" / "model.safetensors"))
    moved = {k for k in actor if not torch.equal(actor[k], base[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved)  # only the adapted projections, merged
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # the reference stayed the base: pi_old and pi_ref differ (the k1 mean may have either sign; 0 if they were one)
    assert logged[-1]["actor_grad_norm"] > 0 and abs(logged[-1]["kl"]) > 1e-6
