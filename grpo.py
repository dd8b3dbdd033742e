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
import memplan
import rewards
import training
from engine import Sampling, make_engine
from grader import Grader


TEMPLATES = data.TEMPLATES  # inside Config, `data` is the --data field


@dataclass
class Config:
    model: str = field(default="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", metadata={"help": "policy to start from: hub id or local folder"})
    data: str = field(default="open-rs", metadata={"help": "training prompts: a data.load_problems spec (name, file, name=path, mixture a:N,b:M)"})
    template: str = field(default="auto", metadata={"help": "prompt template (data.format_prompt): " + ", ".join(TEMPLATES), "choices": TEMPLATES})
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
    cosine_max_len: int = field(default=1000, metadata={"help": "cosine reward: the length where it reaches its END values (Open-RS: 1000; their Exp. 3: 3584)"})
    cosine_unit: str = field(default="chars", metadata={"help": "cosine reward: length in characters of the completion (Open-RS) or in tokens", "choices": ["chars", "tokens"]})
    cosine_clamp: bool = field(default=False, metadata={"help": "cosine reward: hold lengths past --cosine-max-len at END (Open-RS: no, the cosine turns back up)"})
    cosine_correct: str = field(default="1.0:0.5", metadata={"help": "cosine reward of a right answer, START:END = at length 0 : at --cosine-max-len (Open-RS: 1.0:0.5)"})
    cosine_wrong: str = field(default="0.0:-0.5", metadata={"help": "cosine reward of a wrong answer, START:END (Open-RS: 0.0:-0.5; a negative START needs =, as --cosine-wrong=-1:-0.5)"})
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
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2 (beta1 is 0.9); TRL and the transformers Trainer use 0.999"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: no clipping)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 compute (GPU); master weights stay fp32"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward"})
    logprob_chunk_size: int = field(default=1024, metadata={"help": "tokens whose full-vocabulary logits exist at once in the log-prob pass (memory: chunk x vocab x ~14 bytes)"})
    engine: str = field(default="vllm", metadata={"help": "generation engine: vllm or hf", "choices": ["vllm", "hf"]})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU only: fraction of each GPU's memory the colocated vLLM engine takes while generating (its bf16 weights, activations, KV cache); it releases all of it during updates. A preset's value comes from the arithmetic beside it; on CPU see --vllm-cpu-kv-cache-gb"})
    vllm_max_num_batched_tokens: int = field(default=4096, metadata={"help": "GPU only: tokens in one vLLM forward pass (prompt chunks + one per decoding sequence); sets the activation memory vLLM reserves (4096: TRL's colocate value)"})
    vllm_cpu_kv_cache_gb: float = field(default=0.5, metadata={"help": "CPU only: each rank's vLLM KV cache, GiB (vLLM would otherwise size it from free RAM, every rank alike)"})
    grader_workers: int = field(default=4, metadata={"help": "processes grading answers, each answer under a time limit"})
    save_steps: int = field(default=50, metadata={"help": "write output-dir/checkpoint-N every N steps"})
    save_total_limit: int = field(default=0, metadata={"help": "keep the newest N complete checkpoints, delete older ones (0: keep all)"})
    dist_timeout_minutes: float = field(default=30.0, metadata={"help": "minutes a rank waits for the others in a collective (a checkpoint being written, a long generation) before the run aborts"})
    log_completions_steps: int = field(default=10, metadata={"help": "append a sample of completions to completions.jsonl every N steps"})
    seed: int = field(default=0, metadata={"help": "data order, sampling"})
    report_to: str = field(default="none", metadata={"help": "none, wandb or tensorboard", "choices": ["none", "wandb", "tensorboard"]})
    dry_run: bool = field(default=False, metadata={"help": "print the per-GPU memory plan (memplan.py) and exit: 0 if it fits, 1 if not"})
    plan_gpus: int = field(default=0, metadata={"help": "GPUs the memory plan is for (0: this launch's ranks)"})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "memory of one GPU for the memory plan, GiB"})


PRESETS = {
    # The CPU demo: start from the tiny SFT model (sft.py --preset tiny) and improve it on `linear`.
    # Measured: lr 1e-4 to 1e-3 with 16 prompts per step made it worse (Adam turns noisy policy
    # gradients into full-size steps); 32 prompts per step at 5e-5 improved it.
    "tiny": dict(data="linear", template="plain", max_steps=80, prompts_per_step=32, num_generations=8,
                 micro_batch_size=32, temperature=1.0, max_prompt_length=128, max_completion_length=192,
                 rewards="accuracy:1", lr=5e-5, warmup_ratio=0.0, min_lr_ratio=1.0, beta=0.0, bf16=False,
                 gradient_checkpointing=False, engine="hf", grader_workers=1, save_steps=20, log_completions_steps=10),
    # Open-RS (Dang & Ngo 2025): knoveleng/open-rs recipes/grpo.yaml ("yaml:N"), launched on 3 training GPUs
    # (the 4th serves vLLM, README.md:82-88). Released models: Exp. 1 at step 100, Exps. 2 and 3 at step 50
    # (logs/overall/); Exp. 3 adds --cosine-max-len 3584 (README.md:91-98). Their pinned TRL (setup.py:70,
    # trl@69ad852) differs in ways kept as documented deviations: its log-probs ignore the temperature
    # (grpo_trainer.py _get_per_token_logps), its loss is a token mean per micro-batch of 6 completions
    # (compute_loss) averaged over 4 accumulations x 3 GPUs, of which bnpo (the step's token mean) is the
    # nearest.
    "open-rs": dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", data="open-rs",  # yaml:2, yaml:8
                    template="r1",  # the system prompt of yaml:9, in R1-Distill's chat template
                    prompts_per_step=12, num_generations=6,  # 6 per GPU (yaml:42) x 4 accum. (yaml:19) x 3 GPUs / 6 (yaml:37)
                    micro_batch_size=6, max_steps=500, save_steps=50, seed=42,  # yaml:42, 36, 53, 54
                    temperature=0.7, top_p=1.0,  # yaml:55; trl@69ad852 gives vLLM no top_p
                    max_prompt_length=512, max_completion_length=3584,  # yaml:34-35
                    rewards="format:1,cosine:2",  # yaml:46-51
                    cosine_max_len=1000, cosine_unit="chars", cosine_clamp=False,  # open_r1/grpo.py:92-95, rewards.py:321-324
                    cosine_correct="1.0:0.5", cosine_wrong="0.0:-0.5",  # open_r1/grpo.py:76-91
                    lr=1e-6, warmup_ratio=0.1, min_lr_ratio=0.1,  # yaml:25, 56, 31-33
                    beta=0.04, epsilon_low=0.2, epsilon_high=0.2, num_iterations=1,  # trl@69ad852 grpo_config.py:234-246
                    scale_rewards="group", loss_type="bnpo",  # group std + 1e-4 as TRL; bnpo: see above
                    weight_decay=0.0, grad_clip=1.0, adam_beta2=0.999,  # transformers TrainingArguments defaults
                                                                       # (the yaml sets none of them)
                    bf16=True, gradient_checkpointing=True,  # yaml:12, 20
                    # OURS, vLLM colocated on each of 3 GPUs (memplan.py's terms): training keeps 14 B x 1.78B / 3
                    # = 7.7 GiB (fp32 weights + Adam, bf16 reference); vLLM's 0.2 of 80 GiB = 16 GiB holds bf16
                    # weights 3.3 GiB, ~2 GiB activations and 10.7 GiB of KV cache = 98 sequences of 4096 tokens
                    # at 28 KiB each, for the 24 per GPU (on the paper's 48 GB A40s 3.6 GiB, 32 sequences).
                    # 4096 tokens per pass: the 4 prompts of a GPU (<= 512 tokens) in one pass.
                    vllm_gpu_memory_utilization=0.2, vllm_max_num_batched_tokens=4096),
    # The Qwen-baselines study (rqzhangberkeley/efficient-reasoning): GRPO through open-r1's trainer on the 817
    # LIMO problems from Qwen2.5-Math-1.5B, on 7 GPUs + 1 for vLLM. Its README.md:64 and "Baseline" run
    # grpo_limo.sh:85 (lr wd G seed per-GPU accum. beta clip samples epochs), else its
    # recipes/Qwen2.5-Math-1.5B/grpo/config_simple_rl.yaml ("yaml:N"). OURS marks our own choices.
    "limo": dict(model="Qwen/Qwen2.5-Math-1.5B", data="limo",  # grpo_limo.sh:54-55
                 template="question",  # user turn "Question: {problem}" only (RL/grpo.py:262-266); Qwen2.5-Math's
                                       # chat template adds its default system prompt
                 prompts_per_step=64, num_generations=7,  # README.md:64 (7 GPUs x 8 x 8 accum. / G 7)
                 max_steps=36, save_steps=12,  # 3 epochs x 12 steps (README.md:64); save each epoch (yaml:59)
                 micro_batch_size=8, seed=1001,  # grpo_limo.sh:85
                 lr=5e-6, warmup_ratio=0.1, min_lr_ratio=0.0,  # README.md:64; cosine to 0 (yaml:36), yaml:61
                 weight_decay=0.1, grad_clip=1.0, beta=0.005,  # README.md:64, grpo_limo.sh:85
                 adam_beta2=0.999,  # their TRL's TrainingArguments default (the yaml does not set it)
                 epsilon_low=0.2, epsilon_high=0.2, num_iterations=1,  # their TRL's defaults
                 temperature=0.6, top_p=1.0,  # yaml:49; RL/grpo_trainer.py:486-490 gives vLLM no top_p
                 rewards="accuracy:1",  # RL/grpo.py:332-333, yaml:55-58
                 scale_rewards="group", loss_type="bnpo",  # per-micro-batch token mean, RL/grpo_trainer.py:998
                 max_prompt_length=1024, max_completion_length=3072,  # OURS: yaml:34, 38 ask 2048 and 32874, but the
                                                                      # model has 4,096 positions, where vLLM stops
                 bf16=True, gradient_checkpointing=True,  # yaml:16, 25
                 # OURS, vLLM colocated on each of 8 GPUs (memplan.py's terms): training keeps 14 B x 1.54B / 8
                 # = 2.5 GiB (fp32 weights + Adam, bf16 reference); vLLM's 0.2 of 80 GiB = 16 GiB holds bf16
                 # weights 2.9 GiB, ~2 GiB activations and 11.1 GiB of KV cache = 101 sequences of 4096 tokens
                 # at 28 KiB each, for the 8 x 7 = 56 per GPU. 8192 tokens per pass: a GPU's 8 prompts
                 # (<= 1024 tokens) in one pass, activations ~0.4 GiB.
                 vllm_gpu_memory_utilization=0.2, vllm_max_num_batched_tokens=8192),
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

    logprobs = lambda model, batch, **kw: training.token_logprobs(model, *batch, cfg.temperature,
                                                                  chunk_size=cfg.logprob_chunk_size, **kw)
    # pi_old (needed only when mu > 1) and pi_ref, before any update, under the autocast pi runs under:
    # at the first pass pi = pi_old exactly, so the ratio must come out exactly 1
    with torch.no_grad(), training.autocast(d, cfg.bf16):
        old_logp = [logprobs(policy, batch)[0] if cfg.num_iterations > 1 else None for batch in packed]
        ref_logp = [logprobs(reference, batch)[0] if reference is not None else None for batch in packed]
    policy.train()
    sums = dict.fromkeys(("loss", "clip", "kl", "entropy", "gap"), 0.0)
    gap_max = torch.zeros((), device=d.device)
    for iteration in range(cfg.num_iterations):
        for k, batch in enumerate(packed):
            mask = batch[1][:, 1:]
            with training.autocast(d, cfg.bf16):
                logp, entropy = logprobs(policy, batch, with_entropy=iteration == 0)
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
        training.stop_if_not_finite({"gradient norm": grad_norm}, scheduler.last_epoch + 1, d)  # NaN guard
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    stats = {name: training.all_reduce_sum(value, d).item() for name, value in sums.items()}
    training.stop_if_not_finite({"loss": stats["loss"]}, scheduler.last_epoch, d)
    return {"loss": stats["loss"], "clip_frac": stats["clip"], "kl": stats["kl"], "entropy": stats["entropy"],
            "grad_norm": grad_norm, "logprob_gap_mean": stats["gap"],
            "logprob_gap_max": training.all_reduce_max(gap_max, d).item()}


def main(argv=None):
    cfg = training.parse_args(Config, PRESETS, argv, description=__doc__.split("\n\n")[0])
    d = training.init_distributed(cfg.dist_timeout_minutes)
    training.seed_everything(cfg.seed)
    try:
        reward_weights = rewards.parse_weights(cfg.rewards)
        cosine = rewards.CosineShape.from_flags(cfg.cosine_max_len, cfg.cosine_unit, cfg.cosine_clamp,
                                                cfg.cosine_correct, cfg.cosine_wrong)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    G = cfg.num_generations
    if G < 2 or cfg.prompts_per_step % d.world_size:
        raise SystemExit(f"error: need --num-generations >= 2 and --prompts-per-step divisible by {d.world_size} ranks")
    memplan.report("grpo", cfg, d)  # every flag is checked: the budget, before anything loads

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
    if cfg.beta > 0:  # frozen: no optimizer needs fp32 master weights (one bf16 process: fp32 under autocast, as pi)
        reference = training.load_model(cfg.model, dtype=training.frozen_dtype(d, cfg.bf16))
        reference = training.shard_model(reference, d, cfg.bf16, False).eval()
        reference.requires_grad_(False)
    training.seed_per_rank(cfg.seed, d)  # models are built identically on all ranks; sampling differs per rank
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2))
    scheduler = training.cosine_schedule(optimizer, cfg.max_steps * cfg.num_iterations, cfg.warmup_ratio, cfg.min_lr_ratio)
    start_step = 0
    if checkpoint is not None:
        state = training.load_trainer_state(checkpoint)
        start_step = training.restore_checkpoint(state, {"policy": (policy, optimizer)}, {"policy": scheduler}, d,
                                                 seed=cfg.seed)["step"]
        if d.is_main:
            print(f"grpo: resumed from {checkpoint} at step {start_step}")
    training.truncate_logs(cfg.output_dir, start_step, d)  # lines of steps that will be redone go
    engine = make_engine(cfg.engine, policy, tokenizer, policy_path, d, batch_size=cfg.micro_batch_size * 4,
                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, dtype="bfloat16" if cfg.bf16 else "float32",
                         max_model_len=cfg.max_prompt_length + cfg.max_completion_length, enable_sleep_mode=True,
                         max_num_batched_tokens=cfg.vllm_max_num_batched_tokens,
                         kv_cache_memory_bytes=int(cfg.vllm_cpu_kv_cache_gb * 2**30))
    logger = training.MetricsLogger(cfg.output_dir, cfg.report_to, asdict(cfg), d)
    grader = Grader(num_workers=cfg.grader_workers)
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
            reward_weights, grader, [prompts[i] for i in owners], cosine)  # prompts pick the format rule
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
                                     {"policy": scheduler}, {"step": step + 1}, d,
                                     save_total_limit=cfg.save_total_limit)

    grader.close()
    training.finish(cfg.output_dir, policy, tokenizer, d)
    if d.is_main:
        print(f"grpo: final model in {cfg.output_dir}")
    engine.close()  # vLLM's teardown needs the process group that training.shutdown destroys
    training.shutdown(d)


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
