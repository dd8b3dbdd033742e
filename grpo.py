"""Group Relative Policy Optimization (GRPO) for math reasoning.

    torchrun --nproc_per_node 8 grpo.py --data limo --output-dir runs/grpo-limo     # GPUs, vLLM
    python grpo.py --preset tiny --model runs/sft-tiny --output-dir runs/grpo-tiny  # CPU demo

GRPO (Shao et al., 2024, DeepSeekMath) drops PPO's critic: for each prompt it samples a group of
G completions, scores them, and uses each completion's reward relative to its own group as the
advantage of every one of its tokens. Per step:

  1. take a batch of prompts; sample G completions of each with the current policy pi_old
  2. score them with the reward functions of rewards.py          r_i = sum_f w_f * r_f(o_i)
  3. group-relative advantages                                    A_i = (r_i - mean_g r) / (std_g r + eps)
  4. mu passes of clipped policy-gradient updates, each one optimizer step:
       rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
       L     = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_t
       KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1       (k3, an unbiased, positive estimate)
  5. push the new weights into the generation engine (vLLM), so step 1 never samples stale weights.

Options and where they come from: --scale-rewards none and --loss-type dr_grpo are Dr. GRPO
(Liu et al., 2025: the std and length normalisations bias the objective); --loss-type bnpo and an
--epsilon-high above --epsilon-low (0.28) are DAPO (Yu et al., 2025); --tis-cap is truncated
importance sampling against engine/trainer mismatch (Yao et al., 2025). The open-rs preset is
Open-RS (Dang & Ngo, 2025), Table 5.
"""
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

import data
import rewards
import training
from engine import Sampling, make_engine


@dataclass
class Config:
    model: str = field(default="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", metadata={"help": "policy to start from: hub id or local folder"})
    data: str = field(default="open-rs", metadata={"help": "training prompts: a data.load_problems spec (name, file, name=path, mixture a:N,b:M)"})
    template: str = field(default="auto", metadata={"help": "prompt template: auto, qwen-math, r1, plain", "choices": ["auto", "qwen-math", "r1", "plain"]})
    output_dir: str = field(default="runs/grpo", metadata={"help": "checkpoints, metrics.jsonl, trajectories.jsonl, final model"})
    max_steps: int = field(default=500, metadata={"help": "generation steps (each followed by num-iterations optimizer steps)"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per step over all ranks; each gets num-generations completions"})
    num_generations: int = field(default=6, metadata={"help": "G, completions per prompt (the group)"})
    micro_batch_size: int = field(default=4, metadata={"help": "completions per forward/backward pass on one rank"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (log-probs are taken at the same temperature)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_prompt_length: int = field(default=512, metadata={"help": "prompts longer than this (tokens) are left out, with a count printed"})
    max_completion_length: int = field(default=3584, metadata={"help": "max new tokens per completion"})
    rewards: str = field(default="format:1,cosine:2", metadata={"help": "weighted reward functions of rewards.py: accuracy, format, cosine, limr"})
    scale_rewards: str = field(default="group", metadata={"help": "advantage scale: group (GRPO), batch, none (Dr. GRPO)", "choices": ["group", "batch", "none"]})
    loss_type: str = field(default="grpo", metadata={"help": "grpo (sequence mean, then mean), bnpo (token mean over the batch, DAPO), dr_grpo (token sum / (sequences * max length))", "choices": ["grpo", "bnpo", "dr_grpo"]})
    num_iterations: int = field(default=1, metadata={"help": "mu, policy updates per generation batch (1: the ratio is exactly 1)"})
    epsilon_low: float = field(default=0.2, metadata={"help": "clip rho below at 1 - epsilon_low"})
    epsilon_high: float = field(default=0.2, metadata={"help": "clip rho above at 1 + epsilon_high (DAPO: 0.28)"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient to the reference policy (0: no reference model is loaded)"})
    tis_cap: float = field(default=0.0, metadata={"help": "truncated importance sampling cap C for engine/trainer mismatch (0: off)"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of optimizer steps with linear warm-up"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * this"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: no clipping)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 compute (GPU); master weights stay fp32"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward"})
    engine: str = field(default="vllm", metadata={"help": "generation engine: vllm or hf", "choices": ["vllm", "hf"]})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory fraction for the colocated vLLM engine"})
    grader_workers: int = field(default=4, metadata={"help": "processes grading answers, each answer under a time limit"})
    save_steps: int = field(default=50, metadata={"help": "write output-dir/checkpoint-N every N steps"})
    log_completions_steps: int = field(default=10, metadata={"help": "append a sample of completions to completions.jsonl every N steps"})
    seed: int = field(default=0, metadata={"help": "data order, sampling"})
    report_to: str = field(default="none", metadata={"help": "none, wandb or tensorboard", "choices": ["none", "wandb", "tensorboard"]})


PRESETS = {
    # The CPU demo: start from the tiny SFT model (sft.py --preset tiny) and improve it on `linear`.
    # Measured: lr 1e-4 to 1e-3 with 16 prompts per step made it worse (Adam turns noisy policy
    # gradients into full-size steps); 32 prompts per step at 5e-5 improved it.
    "tiny": dict(data="linear", template="plain", max_steps=80, prompts_per_step=32, num_generations=8,
                 micro_batch_size=32, temperature=1.0, max_prompt_length=128, max_completion_length=192,
                 rewards="accuracy:1", lr=5e-5, warmup_ratio=0.0, min_lr_ratio=1.0, beta=0.0, bf16=False,
                 gradient_checkpointing=False, engine="hf", grader_workers=1, save_steps=20, log_completions_steps=10),
    # Open-RS (Table 5): DeepSeek-R1-Distill-Qwen-1.5B on 7k open-rs problems, 4 GPUs; per-device
    # batch 6 = one group of 6 per GPU, so 4 prompts per step; format 1.0 + cosine-scaled accuracy 2.0.
    "open-rs": dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", data="open-rs", template="r1",
                    max_steps=500, prompts_per_step=4, num_generations=6, micro_batch_size=6,
                    temperature=0.7, max_prompt_length=512, max_completion_length=3584,
                    rewards="format:1,cosine:2", lr=1e-6, warmup_ratio=0.1, min_lr_ratio=0.1,
                    bf16=True, gradient_checkpointing=True, save_steps=50),
    # `torchrun --nproc_per_node 8 grpo.py --data limo`: the 817 LIMO problems on a math base model.
    "limo": dict(model="Qwen/Qwen2.5-Math-7B", data="limo", template="qwen-math", max_steps=300,
                 prompts_per_step=64, num_generations=8, micro_batch_size=4, temperature=1.0,
                 max_completion_length=3072, rewards="accuracy:1", lr=1e-6, beta=0.0, save_steps=50),
}


# ---- the GRPO equations, each a function so the tests can check it against hand computations


def group_advantages(rewards_, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std + eps); `none` leaves it unscaled (Dr. GRPO).

    A group whose rewards are all equal carries no signal: its advantages are exactly 0, never NaN.
    """
    r = torch.as_tensor(rewards_, dtype=torch.float32).view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, not {scale!r}")
    return centered.flatten()


def clipped_objective(logp, old_logp, advantages, eps_low: float, eps_high: float):
    """Per-token min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), and whether the clip was active."""
    ratio = torch.exp(logp - old_logp)                                  # rho_t
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    objective = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    return objective, (ratio * advantages != objective)


def k3_kl(logp, ref_logp):
    """exp(ref - logp) - (ref - logp) - 1: Schulman's k3 estimator of KL(pi || pi_ref), >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate_loss(per_token, mask, loss_type: str, num_sequences: int, num_tokens: int, max_len: int):
    """Sum this micro-batch's share of the global loss (normalisers are global counts)."""
    if loss_type == "grpo":     # mean over each sequence's tokens, then mean over sequences
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    if loss_type == "bnpo":     # mean over all tokens of the batch: long answers weigh more
        return (per_token * mask).sum() / num_tokens
    if loss_type == "dr_grpo":  # a constant normaliser: no length bias
        return (per_token * mask).sum() / (num_sequences * max_len)
    raise ValueError(f"loss_type must be grpo, bnpo or dr_grpo, not {loss_type!r}")


def policy_update(policy, reference, optimizer, scheduler, rows, cfg: Config, d, pad_id: int) -> dict:
    """Step 4: mu optimizer steps on this rank's rollouts `rows` = (prompt ids, completion ids,
    engine log-probs, advantage). Losses are normalised by counts over all ranks, so any number of
    ranks takes the same step as one process. Returns statistics averaged over the global batch."""
    # rows of similar length share a micro-batch: less padding to compute (measured: -30% update time).
    # Every normaliser is a global count, so how rows are grouped into micro-batches changes nothing else.
    rows = sorted(rows, key=lambda r: len(r[0]) + len(r[1]))
    micro_batches = [rows[k:k + cfg.micro_batch_size] for k in range(0, len(rows), cfg.micro_batch_size)]
    num_sequences = training.all_reduce_sum(len(rows), d).item()
    num_tokens = training.all_reduce_sum(sum(len(r[1]) for r in rows), d).item()
    packed = [training.pack([r[0] for r in mb], [r[1] for r in mb], pad_id, d.device) for mb in micro_batches]
    engine_logp = [training.pack_logprobs([r[2] for r in mb], [len(r[0]) for r in mb], ids.shape[1], d.device)
                   for mb, (ids, _) in zip(micro_batches, packed)]
    advantages = [torch.tensor([r[3] for r in mb], device=d.device).unsqueeze(1) for mb in micro_batches]

    with torch.no_grad():  # pi_old (needed only when mu > 1) and pi_ref, before any update
        old_logp = [training.token_logprobs(policy, *batch, cfg.temperature)[0] if cfg.num_iterations > 1 else None
                    for batch in packed]
        ref_logp = [training.token_logprobs(reference, *batch, cfg.temperature)[0] if reference is not None else None
                    for batch in packed]
    policy.train()
    sums = dict.fromkeys(("loss", "clip", "kl", "entropy", "gap"), 0.0)
    gap_max = torch.zeros((), device=d.device)
    for iteration in range(cfg.num_iterations):
        for k, batch in enumerate(packed):
            training.set_gradient_sync(policy, k == len(packed) - 1)  # reduce gradients once, after the last
            mask = batch[1][:, 1:]
            with training.autocast(d, cfg.bf16):
                logp, entropy = training.token_logprobs(policy, *batch, cfg.temperature, with_entropy=iteration == 0)
            # pi_old: with mu = 1 the sampling policy is the current one, so rho = exp(logp - logp.detach())
            # is exactly 1 and the gradient is the plain policy gradient: no extra forward pass needed.
            old = old_logp[k] if old_logp[k] is not None else logp.detach()
            objective, clipped = clipped_objective(logp, old, advantages[k], cfg.epsilon_low, cfg.epsilon_high)
            if cfg.tis_cap > 0:  # engine/trainer mismatch: weight each token by min(pi_old / pi_engine, C)
                objective = objective * torch.exp(old - engine_logp[k]).clamp(max=cfg.tis_cap)
            per_token = -objective
            if reference is not None:
                kl = k3_kl(logp, ref_logp[k])
                per_token = per_token + cfg.beta * kl
                sums["kl"] += (kl.detach() * mask).sum().item() / num_tokens / cfg.num_iterations
            loss = aggregate_loss(per_token, mask, cfg.loss_type, num_sequences, num_tokens, cfg.max_completion_length)
            (loss * d.world_size).backward()  # FSDP averages gradients over ranks; undo that: loss is a global mean
            sums["loss"] += loss.item() / cfg.num_iterations
            sums["clip"] += (clipped * mask).sum().item() / num_tokens / cfg.num_iterations
            if iteration == 0:
                sums["entropy"] += (entropy * mask).sum().item() / num_tokens
                gap = (logp.detach() - engine_logp[k]).abs() * mask  # stale-weight guard: engine vs trainer
                sums["gap"] += gap.sum().item() / num_tokens
                gap_max = torch.maximum(gap_max, gap.max())
        grad_norm = training.clip_grad_norm(policy, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    stats = {name: training.all_reduce_sum(value, d).item() for name, value in sums.items()}
    return {"loss": stats["loss"], "clip_frac": stats["clip"], "kl": stats["kl"], "entropy": stats["entropy"],
            "grad_norm": grad_norm, "logprob_gap_mean": stats["gap"],
            "logprob_gap_max": training.all_reduce_max(gap_max, d).item()}


def main(argv=None):
    cfg = training.parse_args(Config, PRESETS, argv, description=__doc__.split("\n\n")[0])
    d = training.init_distributed()
    training.seed_everything(cfg.seed)
    try:
        reward_weights = rewards.parse_weights(cfg.rewards)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    G = cfg.num_generations
    if G < 2 or cfg.prompts_per_step % d.world_size:
        raise SystemExit(f"error: need --num-generations >= 2 and --prompts-per-step divisible by {d.world_size} ranks")

    # ---- data first: a bad file fails in seconds, before any model loads
    problems = data.load_problems(cfg.data, split="train", seed=cfg.seed)
    checkpoint = training.latest_checkpoint(cfg.output_dir)
    if cfg.model == "tiny":
        raise SystemExit("error: GRPO starts from a trained policy; pass --model <sft output dir>")
    training.check_model_path(cfg.model)
    tokenizer = training.load_tokenizer(cfg.model)
    problems, prompts, prompt_ids = training.prepare_prompts(problems, tokenizer, cfg.template,
                                                             cfg.max_prompt_length, d, "grpo")

    # ---- models: the policy (from the newest checkpoint when resuming), the frozen reference
    policy_path = str(checkpoint) if checkpoint else cfg.model
    policy = training.shard_model(training.load_model(policy_path), d, cfg.bf16, cfg.gradient_checkpointing)
    reference = None
    if cfg.beta > 0:
        reference = training.shard_model(training.load_model(cfg.model), d, cfg.bf16, False).eval()
        reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = training.cosine_schedule(optimizer, cfg.max_steps * cfg.num_iterations, cfg.warmup_ratio, cfg.min_lr_ratio)
    start_step = 0
    if checkpoint is not None:
        state = training.load_trainer_state(checkpoint)
        start_step = training.restore_checkpoint(state, {"policy": (policy, optimizer)}, {"policy": scheduler}, d)["step"]
        for name in ("metrics.jsonl", "trajectories.jsonl", "completions.jsonl"):
            training.truncate_jsonl_after(f"{cfg.output_dir}/{name}", start_step, d)
        if d.is_main:
            print(f"grpo: resumed from {checkpoint} at step {start_step}")
    engine = make_engine(cfg.engine, policy, tokenizer, policy_path, d, batch_size=cfg.micro_batch_size * 4,
                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, dtype="bfloat16" if cfg.bf16 else "float32",
                         max_model_len=cfg.max_prompt_length + cfg.max_completion_length, enable_sleep_mode=True)
    logger = training.MetricsLogger(cfg.output_dir, cfg.report_to, asdict(cfg), d)
    grader = rewards.Grader(num_workers=cfg.grader_workers)
    if d.is_main:
        print(f"grpo: {len(problems)} prompts, {cfg.prompts_per_step} x {G} completions per step, "
              f"{d.world_size} rank(s), engine {cfg.engine}, rewards {reward_weights}")

    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, disable=not d.is_main, desc="grpo")
    for step in progress:
        t0 = time.time()
        # 1. a batch of prompts (the same on any number of ranks); this rank samples for its share
        batch = training.batch_indices(step, cfg.prompts_per_step, len(problems), cfg.seed)
        mine = batch[d.rank::d.world_size]
        policy.eval()
        engine.wake_up()
        outputs = engine.generate([prompts[i] for i in mine], Sampling(
            n=G, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_completion_length))
        engine.sleep()
        completions = [c for group in outputs for c in group]             # G consecutive per prompt
        owners = [i for i in mine for _ in range(G)]
        t1 = time.time()

        # 2. rewards r_i = sum_f w_f r_f(o_i), graded in worker processes under a time limit
        scores = rewards.compute_rewards(
            [c.text for c in completions], [problems[i]["answer"] for i in owners],
            [len(c.token_ids) for c in completions], [c.finish_reason == "length" for c in completions],
            cfg.max_completion_length, reward_weights, grader=grader)
        t2 = time.time()

        # 3. advantages within each group (groups never straddle ranks); `batch` scaling needs the
        #    std over the global batch, so every rank sees all rewards and keeps its own slice
        all_rewards = torch.tensor([r for part in training.all_gather_objects(scores["total"], d) for r in part])
        advantages = group_advantages(all_rewards, G, cfg.scale_rewards).view(d.world_size, -1)[d.rank]

        # 4. mu passes of clipped policy-gradient updates over this batch
        rows = [(prompt_ids[i], c.token_ids, c.logprobs, a) for i, c, a in zip(owners, completions, advantages.tolist())]
        stats = policy_update(policy, reference, optimizer, scheduler, rows, cfg, d, tokenizer.pad_token_id)
        # 5. the engine samples the next batch with these weights
        engine.push_weights(policy)
        t3 = time.time()

        # ---- metrics, LIM trajectories, completions, checkpoint
        metrics = training.log_rollouts(step, completions, owners, scores, problems, prompts, reward_weights, G,
                                        cfg.prompts_per_step, cfg.output_dir, cfg.log_completions_steps, d)
        metrics |= {**stats, "lr": scheduler.get_last_lr()[0], "time/generation": t1 - t0, "time/reward": t2 - t1,
                    "time/update": t3 - t2, "tokens_per_s": metrics["response_length_mean"] * len(batch) * G / (t1 - t0)}
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.3f}")
        if (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            training.save_checkpoint(cfg.output_dir, step + 1, policy, tokenizer, {"policy": (policy, optimizer)},
                                     {"policy": scheduler}, {"step": step + 1}, d)

    grader.close()
    training.finish(cfg.output_dir, policy, tokenizer, d)
    if d.is_main:
        print(f"grpo: final model in {cfg.output_dir}")
    training.shutdown(d)


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
