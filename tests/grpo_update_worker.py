"""One GRPO policy update on fixed rollouts; run as a script (1 process) or under torchrun (N ranks).

Arguments: OUT [MINI_BATCHES [MAX_TOKENS_PER_MICRO_BATCH [LORA_RANK]]]. Writes OUT/result.pt with the
updated weights, the starting weights and the update's statistics,
so tests/test_grpo.py can check that N ranks take exactly the step one process takes.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
from mathrl import checkpoints, distributed, fsdp, lora, models  # noqa: E402

PROMPTS, G = 4, 3


def fixed_rollouts():
    """Prompts and completions of different lengths, engine log-probs, and group advantages."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.2, 0.9, 0.4])
    advantages = grpo.group_advantages(rewards, G).tolist()
    for i in range(PROMPTS * G):
        prompt = torch.randint(3, 90, (3 + i // G,), generator=generator).tolist()
        completion = torch.randint(3, 90, (2 + (5 * i) % 7,), generator=generator).tolist()
        engine_logprobs = (-torch.rand(len(completion), generator=generator) * 3).tolist()
        rows.append(grpo.Rollout(prompt, completion, engine_logprobs, advantages[i]))
    return rows


def main(out: str, mini_batches: int = 1, max_tokens_per_micro_batch: int = 0, lora_rank: int = 0):
    dist = distributed.init_distributed()
    torch.manual_seed(0)
    policy, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    reference, _ = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    if lora_rank:  # the reference is the policy with its adapters off; B != 0 so that they differ
        lora.apply_lora(policy, lora_rank, alpha=8.0, seed=0)
        for module in lora.lora_modules(policy).values():
            torch.nn.init.normal_(module.lora_B.weight, 0, 0.05, generator=torch.Generator().manual_seed(3))
        reference = policy
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = grpo.Config(micro_batch_size=2, num_iterations=2, beta=0.1, temperature=0.9, epsilon_low=0.2,
                      epsilon_high=0.28, max_completion_length=16, lr=1e-2, bf16=False, gradient_checkpointing=False,
                      logprob_chunk_size=16,  # micro-batches of 2 x 4 to 2 x 13 positions: 1 or 2 chunks
                      loss_type="grpo",  # the tolerance of test_grpo.py was measured with this loss
                      mini_batches=mini_batches, max_tokens_per_micro_batch=max_tokens_per_micro_batch)
    policy = fsdp.shard_model(policy, dist, bf16=False, gradient_checkpointing=False)
    reference = policy if lora_rank else \
        fsdp.shard_model(reference, dist, bf16=False, gradient_checkpointing=False).eval()
    trained = lora.trainable_parameters(policy) if lora_rank else policy.parameters()
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr)
    scheduler = fsdp.cosine_schedule(optimizer, 2, 0.0, 1.0)
    rows = fixed_rollouts()
    mine = [row for p in range(dist.rank, PROMPTS, dist.world_size) for row in rows[p * G:(p + 1) * G]]
    stats = grpo.policy_update(policy, reference, optimizer, scheduler, mine, cfg, dist, tokenizer.pad_token_id)
    gathered = fsdp.unsharded_parameters(reference) if dist.enabled else []  # after its no-grad forwards
    weights = checkpoints.full_model_state(policy, dist)
    if dist.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"weights": weights, "start": start, "stats": stats, "gathered": gathered},
                   Path(out) / "result.pt")
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
