"""One PPO rollout's experience and updates on fixed rollouts; run as a script (1 process) or under
torchrun (N ranks).

    python tests/ppo_update_worker.py MODEL_DIR OUT [MAX_TOKENS_PER_MICRO_BATCH]

Writes OUT/result.pt with the updated actor and critic weights, the starting ones and the
statistics, so tests/test_ppo.py can check that N ranks take exactly the steps one process takes
(GAE, the whitening over the global batch, and the mini-batch updates of both models).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ppo  # noqa: E402
from mathrl import checkpoints, distributed, fsdp, models  # noqa: E402

PROMPTS, G = 4, 3


def fixed_rollouts():
    """Prompts and completions of different lengths, engine log-probs, and task scores."""
    generator = torch.Generator().manual_seed(1)
    scores = [1.0, -0.5, 1.0, -1.0, -0.5, -0.5, 1.0, 1.0, -1.0, 1.0, -0.5, 1.0]
    rows = []
    for i in range(PROMPTS * G):
        prompt = torch.randint(3, 90, (3 + i // G,), generator=generator).tolist()
        completion = torch.randint(3, 90, (2 + (5 * i) % 7,), generator=generator).tolist()
        engine_logprobs = (-torch.rand(len(completion), generator=generator) * 3).tolist()
        rows.append(ppo.Rollout(prompt, completion, engine_logprobs, scores[i]))
    return rows


def main(model_dir: str, out: str, max_tokens_per_micro_batch: int = 0):
    dist = distributed.init_distributed()
    torch.manual_seed(0)  # the critic's new value head: the same on every rank
    actor, reference, critic = models.load_model(model_dir), models.load_model(model_dir), ppo.load_critic(model_dir)
    with torch.no_grad():  # a reference that differs from the actor, so the KL penalty is not 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    start = {"actor": {k: v.clone() for k, v in actor.state_dict().items()},
             "critic": {k: v.clone() for k, v in critic.state_dict().items()}}
    cfg = ppo.Config(train_batch_size=6, ppo_epochs=2, micro_batch_size=2, temperature=0.9, kl_coef=0.1,
                     gamma=1.0, lam=0.95, clip_eps=0.2, value_clip=0.2, actor_lr=0.1, critic_lr=0.1,
                     bf16=False, gradient_checkpointing=False, max_tokens_per_micro_batch=max_tokens_per_micro_batch)
    actor, critic, reference = (fsdp.shard_model(m, dist, bf16=False, gradient_checkpointing=False)
                                for m in (actor, critic, reference))
    # SGD, not AdamW: Adam's step ignores the scale of the loss, so it would hide a wrong normalisation
    # (a missing x world_size), and it blows float noise on near-zero gradients up to a fraction of lr.
    optimizers = {"actor": (actor, torch.optim.SGD(actor.parameters(), lr=cfg.actor_lr)),
                  "critic": (critic, torch.optim.SGD(critic.parameters(), lr=cfg.critic_lr))}
    schedulers = {name: fsdp.cosine_schedule(optimizer, 4, 0.0, 1.0) for name, (_, optimizer) in optimizers.items()}
    rows = fixed_rollouts()
    mine = [row for p in range(dist.rank, PROMPTS, dist.world_size) for row in rows[p * G:(p + 1) * G]]
    experience, rollout_stats = ppo.make_experience(actor, critic, reference.eval(), mine, cfg, dist, pad_id=0)
    stats = ppo.ppo_update(experience, optimizers, schedulers, cfg, dist, train_actor=True)
    weights = {"actor": checkpoints.full_model_state(actor, dist), "critic": checkpoints.full_model_state(critic, dist)}
    # what FSDP keeps gathered after a step with the actor frozen (the critic's warm-up): the frozen models
    # ran only no-grad forwards, so nothing of theirs should stay gathered
    ppo.ppo_update(ppo.make_experience(actor, critic, reference, mine, cfg, dist, pad_id=0)[0], optimizers,
                   schedulers, cfg, dist, train_actor=False)
    gathered = {name: fsdp.unsharded_parameters(model) if dist.enabled else []
                for name, model in (("actor", actor), ("reference", reference))}
    if dist.is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"weights": weights, "start": start, "stats": {**rollout_stats, **stats}, "gathered": gathered},
                   Path(out) / "result.pt")
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
