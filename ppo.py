"""Proximal Policy Optimization (PPO) with a learned critic, as LIMR trained it.

    torchrun --nproc_per_node 8 ppo.py --preset limr --output-dir runs/ppo-limr    # GPUs, vLLM
    python ppo.py --preset tiny --model runs/sft-tiny --output-dir runs/ppo-tiny   # CPU demo

PPO (Schulman et al., 2017), in the form LIMR (Li et al., 2025) used through OpenRLHF to match
full-MATH training with 1,389 selected problems. Three models: the actor pi (the policy), a critic
V (the same transformer with a scalar head on every position) and a frozen reference pi_ref.
GRPO (grpo.py) takes each token's advantage from the other samples of its prompt; PPO takes it
from the critic's estimate of the value of each state s_t = (q, o_<t). Per step:

  1. take a batch of prompts; sample n completions of each with the current policy pi_old
  2. score them with the reward functions of rewards.py          s_i = sum_f w_f * r_f(o_i)
  3. per-token rewards and advantages, with the weights that sampled (nothing has moved yet):
       r_t     = -kl_coef * (log pi_old(o_t) - log pi_ref(o_t))  [+ s_i on the last token]
       delta_t = r_t + gamma * V(s_t+1) - V(s_t)                   (V after the last token = 0)
       A_t     = delta_t + gamma * lambda * A_t+1                  (GAE, Schulman et al., 2016)
       R_t     = A_t + V(s_t)                                      (the critic's target)
     then A is whitened: mean 0, std 1 over every response token of the global batch.
  4. split the rollout into mini-batches of --train-batch-size completions; on each, one
     critic step and one actor step (the first --critic-warmup-steps steps move the critic only):
       L_actor  = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),  rho_t = pi(o_t | s_t) / pi_old(o_t | s_t)
       L_critic = 0.5 * max((V_t - R_t)^2, (Vclip_t - R_t)^2),       Vclip_t = V_old + clip(V_t - V_old, -eps_v, eps_v)
  5. push the new weights into the generation engine (vLLM), so step 1 never samples stale weights.

Data, rewards, engine, sharding, checkpoints and the trajectories lim.py reads are grpo.py's;
only steps 3 and 4 differ.
"""
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    model: str = field(default="Qwen/Qwen2.5-Math-7B", metadata={"help": "policy to start from: hub id or local folder"})
    critic: str = field(default="", metadata={"help": "value model to start from: a critic saved by ppo.py (output-dir/critic), or any causal LM, whose LM head is replaced by a fresh scalar head (default: --model)"})
    data: str = field(default="limr", metadata={"help": "training prompts: a data.load_problems spec (name, file, name=path, mixture a:N,b:M)"})
    template: str = field(default="auto", metadata={"help": "prompt template (data.format_prompt): " + ", ".join(TEMPLATES), "choices": TEMPLATES})
    output_dir: str = field(default="runs/ppo", metadata={"help": "checkpoints, metrics.jsonl, trajectories.jsonl, final actor, final critic in critic/"})
    max_steps: int = field(default=200, metadata={"help": "generation steps (each followed by rollout / train-batch-size x ppo-epochs optimizer steps)"})
    prompts_per_step: int = field(default=1024, metadata={"help": "rollout batch: prompts per step over all ranks; each gets num-generations completions"})
    num_generations: int = field(default=8, metadata={"help": "completions per prompt"})
    train_batch_size: int = field(default=256, metadata={"help": "completions per optimizer step over all ranks; a multiple of num-generations x ranks"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout"})
    micro_batch_size: int = field(default=4, metadata={"help": "completions per forward/backward pass on one rank"})
    temperature: float = field(default=1.2, metadata={"help": "sampling temperature (log-probs are taken at the same temperature)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_prompt_length: int = field(default=1024, metadata={"help": "prompts longer than this (tokens) are left out, with a count printed"})
    max_completion_length: int = field(default=3072, metadata={"help": "max new tokens per completion"})
    rewards: str = field(default="limr:1", metadata={"help": "weighted reward functions of rewards.py: accuracy, format, cosine, limr"})
    cosine_max_len: int = field(default=1000, metadata={"help": "cosine reward: the length where it reaches its END values (Open-RS: 1000; their Exp. 3: 3584)"})
    cosine_unit: str = field(default="chars", metadata={"help": "cosine reward: length in characters of the completion (Open-RS) or in tokens", "choices": ["chars", "tokens"]})
    cosine_clamp: bool = field(default=False, metadata={"help": "cosine reward: hold lengths past --cosine-max-len at END (Open-RS: no, the cosine turns back up)"})
    cosine_correct: str = field(default="1.0:0.5", metadata={"help": "cosine reward of a right answer, START:END = at length 0 : at --cosine-max-len (Open-RS: 1.0:0.5)"})
    cosine_wrong: str = field(default="0.0:-0.5", metadata={"help": "cosine reward of a wrong answer, START:END (Open-RS: 0.0:-0.5; a negative START needs =, as --cosine-wrong=-1:-0.5)"})
    kl_coef: float = field(default=0.01, metadata={"help": "per-token KL penalty in the reward (0: no reference model is loaded)"})
    gamma: float = field(default=1.0, metadata={"help": "discount of GAE"})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE (1: Monte-Carlo returns, 0: one-step TD)"})
    clip_eps: float = field(default=0.2, metadata={"help": "clip rho to [1 - clip-eps, 1 + clip-eps]"})
    value_clip: float = field(default=0.2, metadata={"help": "keep new values within this of the rollout's values in the clipped value loss"})
    actor_lr: float = field(default=5e-7, metadata={"help": "actor peak learning rate (AdamW)"})
    critic_lr: float = field(default=9e-6, metadata={"help": "critic peak learning rate (AdamW)"})
    critic_warmup_steps: int = field(default=0, metadata={"help": "first steps that train the critic only, the actor frozen"})
    warmup_ratio: float = field(default=0.0016, metadata={"help": "fraction of optimizer steps with linear warm-up"})
    min_lr_ratio: float = field(default=1.0, metadata={"help": "cosine decays to lr * this"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm of each model (0: no clipping)"})
    bf16: bool = field(default=True, metadata={"help": "bf16 compute (GPU); master weights stay fp32"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward"})
    logprob_chunk_size: int = field(default=1024, metadata={"help": "tokens whose full-vocabulary logits exist at once in the log-prob pass (memory: chunk x vocab x ~14 bytes)"})
    engine: str = field(default="vllm", metadata={"help": "generation engine: vllm or hf", "choices": ["vllm", "hf"]})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU only: fraction of each GPU's memory the colocated vLLM engine takes while generating (its bf16 weights, activations, KV cache); it releases all of it during updates. A preset's value comes from the arithmetic beside it; on CPU see --vllm-cpu-kv-cache-gb"})
    vllm_max_num_batched_tokens: int = field(default=4096, metadata={"help": "GPU only: tokens in one vLLM forward pass (prompt chunks + one per decoding sequence); sets the activation memory vLLM reserves (4096: TRL's colocate value)"})
    vllm_cpu_kv_cache_gb: float = field(default=0.5, metadata={"help": "CPU only: each rank's vLLM KV cache, GiB (vLLM would otherwise size it from free RAM, every rank alike)"})
    grader_workers: int = field(default=4, metadata={"help": "processes grading answers, each answer under a time limit"})
    save_steps: int = field(default=10, metadata={"help": "write output-dir/checkpoint-N every N steps"})
    save_total_limit: int = field(default=0, metadata={"help": "keep the newest N complete checkpoints, delete older ones (0: keep all)"})
    dist_timeout_minutes: float = field(default=30.0, metadata={"help": "minutes a rank waits for the others in a collective (a checkpoint being written, a long generation) before the run aborts"})
    log_completions_steps: int = field(default=10, metadata={"help": "append a sample of completions to completions.jsonl every N steps"})
    seed: int = field(default=0, metadata={"help": "data order, sampling, value head initialisation"})
    report_to: str = field(default="none", metadata={"help": "none, wandb or tensorboard", "choices": ["none", "wandb", "tensorboard"]})
    dry_run: bool = field(default=False, metadata={"help": "print the per-GPU memory plan (memplan.py) and exit: 0 if it fits, 1 if not"})
    plan_gpus: int = field(default=0, metadata={"help": "GPUs the memory plan is for (0: this launch's ranks)"})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "memory of one GPU for the memory plan, GiB"})


PRESETS = {
    # The CPU demo: start from the tiny SFT model (sft.py --preset tiny) and improve it on `linear`.
    # One update per rollout at a small actor lr; 5 steps of critic warm-up. Higher actor lrs (1e-4,
    # 3e-4) with two updates per rollout made held-out pass@1 worse on the tiny model.
    "tiny": dict(data="linear", template="plain", max_steps=30, prompts_per_step=16, num_generations=8,
                 train_batch_size=128, micro_batch_size=32, temperature=1.0, max_prompt_length=128,
                 max_completion_length=192, rewards="accuracy:1", kl_coef=0.01, actor_lr=5e-5, critic_lr=1e-3,
                 critic_warmup_steps=5, warmup_ratio=0.0, min_lr_ratio=1.0, bf16=False, gradient_checkpointing=False,
                 engine="hf", grader_workers=1, save_steps=10, log_completions_steps=10),
    # LIMR (Li et al. 2025): GAIR-NLP/LIMR scripts/train_limr.sh ("sh:N") through their OpenRLHF fork
    # (defaults in openrlhf/cli/train_ppo_ray.py, "ray:N"): PPO from the base model on the 1,389 LIMR problems.
    # A rollout of 1024 x 8 is 32 updates of 256. Their scheduler is a cosine to 0.1 x lr over
    # --num_episodes 10000 (sh:53, trainer/ray/ppo_actor.py:250-256), flat over any real run: min_lr_ratio 1.
    # max_steps 200 is OURS (their run has no step limit); warmup_ratio makes their 10 warm-up updates
    # (sh:65) of 200 x 32. Deviation: LIMR's actor takes log-probs at temperature 1 (models/actor.py:216)
    # while sampling at 1.2; ours takes them at 1.2, the distribution that was sampled.
    "limr": dict(model="Qwen/Qwen2.5-Math-7B", data="limr",  # sh:41, sh:66
                 template="qwen-math",  # the dataset's chat messages through Qwen2.5-Math's template (sh:68-69)
                 prompts_per_step=1024, num_generations=8, train_batch_size=256,  # sh:50, 51, 48
                 ppo_epochs=1, micro_batch_size=4,  # sh:52, 46
                 temperature=1.2, top_p=1.0,  # sh:77, ray:282
                 max_prompt_length=1024, max_completion_length=3072,  # sh:54, 55
                 rewards="limr:1",  # the rule reward of openrlhf/cli/serve_rm.py (sh:4-10)
                 kl_coef=0.01, gamma=1.0, lam=0.95,  # sh:59, ray:278, sh:62
                 clip_eps=0.2, value_clip=0.2,  # sh:60, 61
                 actor_lr=5e-7, critic_lr=9e-6, critic_warmup_steps=0,  # sh:57, 58; no --freezing_actor_steps
                 max_steps=200, warmup_ratio=0.0016, min_lr_ratio=1.0,  # see above
                 weight_decay=0.0, grad_clip=1.0,  # ray:273, ray:272
                 bf16=True, gradient_checkpointing=True, engine="vllm",  # sh:64, 76, 37
                 save_steps=10,  # OURS: they save every step (sh:40)
                 # OURS, vLLM colocated on each of 8 GPUs (memplan.py's terms): training keeps 12 B x (7.62B actor
                 # + 7.07B critic) / 8 of fp32 weights + Adam and 2 B x 7.62B / 8 of bf16 reference = 22.3 GiB,
                 # plus 4 GiB reserve; vLLM's 0.55 of 80 GiB = 44 GiB (70.3 GiB in all) holds bf16 weights
                 # 14.2 GiB, ~2 GiB activations and 27.8 GiB of KV cache = 127 sequences of 4096 tokens at 56 KiB
                 # each; the 1024 per GPU run in waves. 8192 tokens per pass: a GPU's 128 prompts (<= 1024
                 # tokens) in 16 passes, activations ~0.8 GiB.
                 vllm_gpu_memory_utilization=0.55, vllm_max_num_batched_tokens=8192),
}


# ---- the critic: a value model V(s_t) for every prefix of a sequence


def load_critic(name_or_path: str, seed: int = 0):
    """The base transformer with a linear head giving one number per position (AutoModelForTokenClassification
    with num_labels=1): a save_pretrained-able model that FSDP shards like the actor. From a causal LM
    checkpoint the head is new; from a saved critic it is the trained one.

    A new head is initialised as LIMR's OpenRLHF critic: weights ~ N(0, std 1/(hidden+1)), no bias
    (GAIR-NLP/LIMR openrlhf/models/model.py:241 nn.Linear(hidden, 1, bias=False), :152-154 the std;
    trainer/ray/ppo_critic.py:83 does it whenever the critic starts from the policy's checkpoint).
    transformers' own head would be std 0.02 plus a bias, ~70x larger at 7B's hidden size 3584.
    The draw comes from its own generator seeded by `seed`, so every rank draws the same head."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(name_or_path, num_labels=1)
    config.classifier_dropout = 0.0  # a value must be a function of the tokens, not of a dropout mask
    config.token_classification_bias = False  # model.py:241
    critic, loading = AutoModelForTokenClassification.from_pretrained(
        name_or_path, config=config, dtype=torch.float32, output_loading_info=True)
    if "score.weight" in loading["missing_keys"]:
        hidden = critic.score.in_features
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            critic.score.weight.normal_(0.0, 1.0 / (hidden + 1), generator=generator)  # model.py:152-154
    return critic


def critic_values(critic, input_ids) -> torch.Tensor:
    """V in token_logprobs' layout: values[:, t] is the head's output at position t, the value of the
    state (tokens 0..t) in which token t+1 is chosen. So a completion token's log-prob and the value
    V(s_t) of the state it was chosen in share one index, and both are masked by completion_mask[:, 1:]."""
    return critic(input_ids=input_ids).logits[:, :-1, 0].float()  # rows packed by training.pack


# ---- the PPO equations, each a function so the tests can check it against hand computations


def gae(rewards_, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over (batch, tokens) tensors; mask marks each row's response.

    delta_t = r_t + gamma * V_t+1 - V_t and A_t = delta_t + gamma * lambda * A_t+1, run backwards from
    the last response token, after which the value (and advantage) is 0: the episode has ended.
    Returns (A, R = A + V), zero outside the mask. With gamma = lambda = 1, R_t = sum_k>=t r_k.
    """
    advantages = torch.zeros_like(rewards_)
    next_value = next_advantage = torch.zeros_like(rewards_[:, 0])
    for t in reversed(range(rewards_.shape[1])):
        delta = rewards_[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]  # 0 past the end
    return advantages, (advantages + values) * mask


def whiten(tensors: list, masks: list, d, eps: float = 1e-8) -> list:
    """(x - mean) / std with the mean and std over the masked tokens of the GLOBAL batch (all micro-
    batches of all ranks), so the advantages are the same whatever the number of ranks."""
    def global_sum(xs):
        return training.all_reduce_sum(sum((x.double() * m).sum() for x, m in zip(xs, masks)), d)

    count = global_sum([torch.ones_like(m) for m in masks])
    mean = global_sum(tensors) / count
    variance = global_sum([(x - mean) ** 2 for x in tensors]) / count
    return [((x - mean) * variance.clamp(min=eps).rsqrt()).float() * m for x, m in zip(tensors, masks)]


def clipped_objective(logp, old_logp, advantages, clip: float):
    """Per-token min(rho A, clip(rho, 1 - clip, 1 + clip) A), and whether the clip was active."""
    ratio = torch.exp(logp - old_logp)
    objective = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)
    return objective, (ratio * advantages != objective)


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per-token 0.5 * max((V - R)^2, (Vclip - R)^2): moving a value further than `clip` from the
    rollout's earns no credit. Also where the clip decided (|V - V_old| > clip, clipped term larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    decided = ((values - old_values).abs() > clip) & (clipped_loss > unclipped_loss)
    return 0.5 * torch.maximum(unclipped_loss, clipped_loss), decided


def make_experience(actor, critic, reference, rows, cfg: Config, d, pad_id: int):
    """Step 3 on this rank's rollouts `rows` = (prompt ids, completion ids, engine log-probs, score),
    whole groups in prompt order. Returns the experience as mini-batches (train_batch_size / ranks rows)
    of micro-batches (dicts of tensors), and statistics over the global batch."""
    per_rank = cfg.train_batch_size // d.world_size
    by_length = lambda mini: sorted(mini, key=lambda r: len(r[0]) + len(r[1]))  # less padding per micro-batch
    experience = [[_pack(mini[k:k + cfg.micro_batch_size], pad_id, d.device) for k in range(0, len(mini), cfg.micro_batch_size)]
                  for mini in (by_length(rows[s:s + per_rank]) for s in range(0, len(rows), per_rank))]
    micro_batches = [mb for mini in experience for mb in mini]
    with torch.no_grad():
        for mb in micro_batches:
            batch, mask = (mb["input_ids"], mb["completion_mask"]), mb["mask"]
            logprobs = lambda model: training.token_logprobs(model, *batch, cfg.temperature,
                                                             chunk_size=cfg.logprob_chunk_size)[0]
            with training.autocast(d, cfg.bf16):
                mb["old_logp"] = logprobs(actor)
                ref_logp = logprobs(reference) if reference is not None else mb["old_logp"]
                mb["values"] = critic_values(critic, batch[0]) * mask
            mb["kl"] = (mb["old_logp"] - ref_logp) * mask            # log pi_old - log pi_ref, per token
            mb["rewards"] = -cfg.kl_coef * mb["kl"] + mb["score"]    # score: s_i on the last token, else 0
            mb["advantages"], mb["returns"] = gae(mb["rewards"], mb["values"], mask, cfg.gamma, cfg.lam)
    raw_advantages = [mb["advantages"] for mb in micro_batches]
    masks = [mb["mask"] for mb in micro_batches]
    for mb, whitened in zip(micro_batches, whiten(raw_advantages, masks, d)):
        mb["advantages"] = whitened

    errors = [mb["returns"] - mb["values"] for mb in micro_batches]
    gaps = [(mb["old_logp"] - mb["engine_logp"]).abs() * mb["mask"] for mb in micro_batches]  # engine vs trainer
    m = _token_means({"kl": [mb["kl"] for mb in micro_batches], "value": [mb["values"] for mb in micro_batches],
                      "return": [mb["returns"] for mb in micro_batches], "return^2": [mb["returns"] ** 2 for mb in micro_batches],
                      "error": errors, "error^2": [e ** 2 for e in errors], "advantage": raw_advantages,
                      "advantage^2": [a ** 2 for a in raw_advantages], "gap": gaps}, masks, d)
    return_variance, error_variance = m["return^2"] - m["return"] ** 2, m["error^2"] - m["error"] ** 2
    stats = {"kl": m["kl"], "value_mean": m["value"], "return_mean": m["return"], "advantage_mean": m["advantage"],
             "advantage_std": max(m["advantage^2"] - m["advantage"] ** 2, 0.0) ** 0.5,
             # 1 - Var(R - V) / Var(R): 1 when the critic predicts the returns, 0 when it knows only their mean
             "explained_variance": 1 - error_variance / max(return_variance, 1e-12),
             "logprob_gap_mean": m["gap"], "logprob_gap_max": training.all_reduce_max(torch.stack([g.max() for g in gaps]).max(), d).item()}
    return experience, stats


def _token_means(named: dict, masks: list, d) -> dict:
    """Mean of each list of tensors over the masked tokens of every rank (one all-reduce)."""
    sums = torch.stack([sum((x.double() * m).sum() for x, m in zip(xs, masks)) for xs in named.values()]
                       + [sum(m.sum().double() for m in masks)])
    sums = training.all_reduce_sum(sums, d)
    return {name: (sums[k] / sums[-1]).item() for k, name in enumerate(named)}


def _pack(rows, pad_id: int, device) -> dict:
    """One micro-batch: packed sequences, the response mask in token_logprobs' layout, the engine's
    log-probs, and the task score placed on the last response token (index len(prompt) + len(completion) - 2)."""
    input_ids, completion_mask = training.pack([r[0] for r in rows], [r[1] for r in rows], pad_id, device)
    score = torch.zeros(len(rows), input_ids.shape[1] - 1, device=device)
    for row, (prompt, completion, _, s) in enumerate(rows):
        score[row, len(prompt) + len(completion) - 2] = s
    engine_logp = training.pack_logprobs([r[2] for r in rows], [len(r[0]) for r in rows], input_ids.shape[1], device)
    return {"input_ids": input_ids, "completion_mask": completion_mask,
            "mask": completion_mask[:, 1:], "score": score, "engine_logp": engine_logp}


def ppo_update(experience, optimizers: dict, schedulers: dict, cfg: Config, d, train_actor: bool = True) -> dict:
    """Step 4: for each epoch and mini-batch, one critic step and (unless train_actor is False, the
    critic's warm-up) one actor step. optimizers = {"actor": (actor, optimizer), "critic": (critic, optimizer)}.
    Each loss is a token mean over the global mini-batch, so any number of ranks takes the same step as
    one process. Returns statistics averaged over all optimizer steps and the global batch."""
    actor, critic = optimizers["actor"][0], optimizers["critic"][0]
    tokens = training.all_reduce_sum(torch.stack([sum(mb["mask"].sum() for mb in mini) for mini in experience]).double(), d)
    num_updates = len(experience) * cfg.ppo_epochs
    sums = dict.fromkeys(("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "entropy"), 0.0)
    grad_norms = {"actor": 0.0, "critic": 0.0}
    actor.train()
    critic.train()
    for epoch in range(cfg.ppo_epochs):
        for i, mini in enumerate(experience):
            num_tokens = tokens[i].item()
            share = 1 / num_tokens / num_updates  # of the reported averages
            for k, mb in enumerate(mini):
                batch, mask = (mb["input_ids"], mb["completion_mask"]), mb["mask"]
                # the critic regresses V(s_t) on the GAE return R_t
                with training.autocast(d, cfg.bf16):
                    values = critic_values(critic, batch[0])
                value_loss, value_clipped = clipped_value_loss(values, mb["values"], mb["returns"], cfg.value_clip)
                value_loss = (value_loss * mask).sum() / num_tokens
                (value_loss * d.world_size).backward()  # FSDP averages gradients over ranks; the loss is a global mean
                sums["value_loss"] += value_loss.item() / num_updates
                sums["value_clip_frac"] += (value_clipped * mask).sum().item() * share
                if not train_actor:
                    continue
                # the actor follows the clipped policy gradient of the whitened advantages
                with training.autocast(d, cfg.bf16):
                    logp, entropy = training.token_logprobs(actor, *batch, cfg.temperature, with_entropy=True,
                                                            chunk_size=cfg.logprob_chunk_size)
                objective, clipped = clipped_objective(logp, mb["old_logp"], mb["advantages"], cfg.clip_eps)
                policy_loss = -(objective * mask).sum() / num_tokens
                (policy_loss * d.world_size).backward()
                sums["policy_loss"] += policy_loss.item() / num_updates
                sums["clip_frac"] += (clipped * mask).sum().item() * share
                sums["entropy"] += (entropy * mask).sum().item() * share
            for name in ("critic", "actor") if train_actor else ("critic",):
                model, optimizer = optimizers[name]
                grad_norm = training.clip_grad_norm(model, cfg.grad_clip)
                training.stop_if_not_finite({f"{name} gradient norm": grad_norm}, schedulers[name].last_epoch + 1, d)
                grad_norms[name] += grad_norm / num_updates
                optimizer.step()
                schedulers[name].step()
                optimizer.zero_grad(set_to_none=True)
    stats = {name: training.all_reduce_sum(value, d).item() for name, value in sums.items()}
    training.stop_if_not_finite({"policy loss": stats["policy_loss"], "value loss": stats["value_loss"]},
                                schedulers["critic"].last_epoch, d)
    return {**stats, "actor_grad_norm": grad_norms["actor"], "critic_grad_norm": grad_norms["critic"]}


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
    rollout_size = cfg.prompts_per_step * G
    if cfg.prompts_per_step % d.world_size or cfg.train_batch_size % (G * d.world_size) or rollout_size % cfg.train_batch_size:
        raise SystemExit(f"error: need --prompts-per-step divisible by {d.world_size} ranks, and --train-batch-size a "
                         f"multiple of num-generations x ranks ({G * d.world_size}) dividing the rollout ({rollout_size})")
    updates_per_step = rollout_size // cfg.train_batch_size * cfg.ppo_epochs
    memplan.report("ppo", cfg, d)  # every flag is checked: the budget, before anything loads

    # ---- data first: a bad file fails in seconds, before any model loads
    problems = data.load_problems(cfg.data, split="train", seed=cfg.seed)
    checkpoint = training.latest_checkpoint(cfg.output_dir)
    if cfg.model == "tiny":
        raise SystemExit("error: PPO starts from a trained policy; pass --model <sft output dir>")
    training.check_model_path(cfg.model)
    if cfg.critic:
        training.check_model_path(cfg.critic, "--critic")
    tokenizer = training.load_tokenizer(cfg.model)
    problems, prompts, prompt_ids = training.prepare_prompts(problems, tokenizer, cfg.template,
                                                             cfg.max_prompt_length, d, "ppo")

    # ---- models: actor and critic (from the newest checkpoint when resuming), the frozen reference
    actor_path = str(checkpoint) if checkpoint else cfg.model
    actor = training.shard_model(training.load_model(actor_path), d, cfg.bf16, cfg.gradient_checkpointing)
    critic = load_critic(str(checkpoint / "critic") if checkpoint else cfg.critic or cfg.model, cfg.seed)
    critic = training.shard_model(critic, d, cfg.bf16, cfg.gradient_checkpointing)
    reference = None
    if cfg.kl_coef > 0:  # frozen: no optimizer needs fp32 master weights (one bf16 process: fp32 under autocast, as pi)
        reference = training.load_model(cfg.model, dtype=training.frozen_dtype(d, cfg.bf16))
        reference = training.shard_model(reference, d, cfg.bf16, False).eval()
        reference.requires_grad_(False)
    training.seed_per_rank(cfg.seed, d)  # models (the critic's new head too) are identical on all ranks first
    optimizers = {"actor": (actor, torch.optim.AdamW(actor.parameters(), lr=cfg.actor_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))),
                  "critic": (critic, torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)))}
    actor_updates = max(1, cfg.max_steps - cfg.critic_warmup_steps) * updates_per_step  # the actor waits for the critic
    schedulers = {"actor": training.cosine_schedule(optimizers["actor"][1], actor_updates, cfg.warmup_ratio, cfg.min_lr_ratio),
                  "critic": training.cosine_schedule(optimizers["critic"][1], cfg.max_steps * updates_per_step, cfg.warmup_ratio, cfg.min_lr_ratio)}
    start_step = 0
    if checkpoint is not None:
        state = training.load_trainer_state(checkpoint)
        start_step = training.restore_checkpoint(state, optimizers, schedulers, d, seed=cfg.seed)["step"]
        if d.is_main:
            print(f"ppo: resumed from {checkpoint} at step {start_step}")
    training.truncate_logs(cfg.output_dir, start_step, d)  # lines of steps that will be redone go
    engine = make_engine(cfg.engine, actor, tokenizer, actor_path, d, batch_size=cfg.micro_batch_size * 4,
                         gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, dtype="bfloat16" if cfg.bf16 else "float32",
                         max_model_len=cfg.max_prompt_length + cfg.max_completion_length, enable_sleep_mode=True,
                         max_num_batched_tokens=cfg.vllm_max_num_batched_tokens,
                         kv_cache_memory_bytes=int(cfg.vllm_cpu_kv_cache_gb * 2**30))
    logger = training.MetricsLogger(cfg.output_dir, cfg.report_to, asdict(cfg), d)
    grader = Grader(num_workers=cfg.grader_workers)
    if d.is_main:
        print(f"ppo: {len(problems)} prompts, {cfg.prompts_per_step} x {G} completions per step, {updates_per_step} "
              f"updates of {cfg.train_batch_size}, {d.world_size} rank(s), engine {cfg.engine}, rewards {reward_weights}")

    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, disable=not d.is_main, desc="ppo")
    for step in progress:
        t0 = time.time()
        # 1. a batch of prompts (the same on any number of ranks); this rank samples for its share
        batch = training.batch_indices(step, cfg.prompts_per_step, len(problems), cfg.seed)
        mine = batch[d.rank::d.world_size]
        actor.eval()
        engine.wake_up()
        outputs = engine.generate([prompts[i] for i in mine], Sampling(
            n=G, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_completion_length))
        engine.sleep()
        completions = [c for group in outputs for c in group]             # G consecutive per prompt
        owners = [i for i in mine for _ in range(G)]
        t1 = time.time()

        # 2. scores s_i = sum_f w_f r_f(o_i), graded in worker processes under a time limit
        scores = rewards.compute_rewards(
            [c.text for c in completions], [problems[i]["answer"] for i in owners],
            [len(c.token_ids) for c in completions], [c.finish_reason == "length" for c in completions],
            reward_weights, grader, [prompts[i] for i in owners], cosine)  # prompts pick the format rule
        t2 = time.time()

        # 3. per-token rewards (KL penalty + score on the last token), values, GAE, whitened advantages
        rows = [(prompt_ids[i], c.token_ids, c.logprobs, s) for i, c, s in zip(owners, completions, scores["total"])]
        experience, rollout_stats = make_experience(actor, critic, reference, rows, cfg, d, tokenizer.pad_token_id)
        # 4. mini-batch updates of the critic, and of the actor once the critic's warm-up is over
        train_actor = step >= cfg.critic_warmup_steps
        stats = ppo_update(experience, optimizers, schedulers, cfg, d, train_actor)
        del experience
        # 5. the engine samples the next batch with these weights (pushed while the actor is frozen
        #    too: a sleeping vLLM engine released its copy)
        engine.push_weights(actor)
        t3 = time.time()

        # ---- metrics, LIM trajectories, completions, checkpoint
        metrics = training.log_rollouts(step, completions, owners, scores, problems, prompts, reward_weights, G,
                                        cfg.prompts_per_step, cfg.output_dir, cfg.log_completions_steps, d)
        metrics |= {**rollout_stats, **stats, "actor_frozen": not train_actor,
                    "lr/actor": schedulers["actor"].get_last_lr()[0], "lr/critic": schedulers["critic"].get_last_lr()[0],
                    "time/generation": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
                    "tokens_per_s": metrics["response_length_mean"] * len(batch) * G / (t1 - t0)}
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                             ev=f"{metrics['explained_variance']:.2f}")
        if (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            training.save_checkpoint(cfg.output_dir, step + 1, actor, tokenizer, optimizers, schedulers,
                                     {"step": step + 1}, d, extra_models={"critic": critic},
                                     save_total_limit=cfg.save_total_limit)

    grader.close()
    training.finish(cfg.output_dir, actor, tokenizer, d)
    training.finish(Path(cfg.output_dir) / "critic", critic, tokenizer, d)  # --critic can start from it
    if d.is_main:
        print(f"ppo: final actor in {cfg.output_dir}, critic in {cfg.output_dir}/critic")
    engine.close()  # vLLM's teardown needs the process group that training.shutdown destroys
    training.shutdown(d)


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
