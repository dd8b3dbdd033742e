"""Run under torchrun with 2 ranks: what FSDP holds between micro-batches, and each rank's random stream.

Writes OUT/rank-R.pt for tests/test_memory.py:
- "grad_states": one record per training micro-batch of a GRPO update, taken when the next micro-batch
  starts its forward pass: whether any unsharded gradient exists, and whether every gradient is a
  sharded DTensor of this rank's shard size (what FSDP keeps during gradient accumulation).
- "critic_head": the value head of a critic built the way ppo.py builds it (it is new: randomly initialised).
- "samples": completions of one prompt by the HF engine, after distributed.seed_per_rank.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import ppo  # noqa: E402
from mathrl import distributed, fsdp, models  # noqa: E402
from mathrl.engine import HFEngine, Sampling  # noqa: E402
from grpo_update_worker import fixed_rollouts, G, PROMPTS  # noqa: E402


def fsdp_gradient_state(model) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    unsharded = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    full = getattr(fsdp_param, "_unsharded_param", None)
                    unsharded += full is not None and full.grad is not None
                    unsharded += fsdp_param.unsharded_accumulated_grad is not None
    grads = [(p.grad, p) for p in model.parameters() if p.grad is not None]
    return {"unsharded_grads": unsharded, "sharded_grads": len(grads),
            "all_sharded": all(isinstance(g, DTensor) and g.to_local().shape == p.to_local().shape for g, p in grads),
            "local_elements": sum(g.to_local().numel() for g, _ in grads if isinstance(g, DTensor)),
            "global_elements": sum(p.numel() for p in model.parameters())}


def main(out: str, model_dir: str):
    dist = distributed.init_distributed()
    result = {}

    # 1. a GRPO update with 3 micro-batches per rank: look at the gradients as each next one starts
    policy, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    cfg = grpo.Config(micro_batch_size=2, num_iterations=1, beta=0.0, temperature=0.9, max_completion_length=16,
                      lr=1e-2, bf16=False, gradient_checkpointing=False, logprob_chunk_size=8)
    policy = fsdp.shard_model(policy, dist, bf16=False, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    scheduler = fsdp.cosine_schedule(optimizer, 1, 0.0, 1.0)
    states, forward = [], policy.next_token_scores   # look before FSDP gathers any parameter for the pass

    def recording_forward(*args):
        states.append(fsdp_gradient_state(policy))
        return forward(*args)
    policy.next_token_scores = recording_forward
    rows = fixed_rollouts()
    mine = [row for p in range(dist.rank, PROMPTS, dist.world_size) for row in rows[p * G:(p + 1) * G]]
    grpo.policy_update(policy, None, optimizer, scheduler, mine, cfg, dist, tokenizer.pad_token_id)
    result["grad_states"] = states

    # 2. models built as ppo.py builds them (seed, then models), then a per-rank stream, then sampling
    distributed.seed_everything(0)
    critic = ppo.load_critic(model_dir)
    result["critic_head"] = critic.score.weight.detach().clone()
    actor = fsdp.shard_model(models.load_model(model_dir), dist, bf16=False, gradient_checkpointing=False)
    distributed.seed_per_rank(0, dist)
    engine = HFEngine(actor, models.load_tokenizer(model_dir), dist, batch_size=8)
    completions = engine.generate(["3 + 4 ="], Sampling(n=8, temperature=1.0, max_new_tokens=12))[0]
    result["samples"] = [c.token_ids for c in completions]

    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(result, Path(out) / f"rank-{dist.rank}.pt")
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
