"""Proximal Policy Optimization (PPO) with a learned critic, as LIMR trained it.

    torchrun --nproc_per_node 8 ppo.py --preset limr --output-dir runs/ppo-limr    # GPUs, vLLM
    python ppo.py --preset tiny --model runs/demo/sft --output-dir runs/ppo-tiny   # CPU demo

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
       rho_t    = pi(o_t | s_t) / pi_old(o_t | s_t)
       L_actor  = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)
       Vclip_t  = V_old + clip(V_t - V_old, -eps_v, eps_v)
       L_critic = 0.5 * max((V_t - R_t)^2, (Vclip_t - R_t)^2)
  5. push the new weights into the generation engine (vLLM), so step 1 never samples stale weights.

Which equation each function implements:
  token_logprobs      log pi(o_t | s_t) at the sampling temperature: the terms of rho_t and of r_t's KL
  critic_values       V(s_t), one scalar per position from the critic's head
  gae                 A_t and R_t: GAE(gamma, lambda) (Schulman et al., 2016, sec. 3), A_t = sum_l
                      (gamma lambda)^l delta_t+l, computed backwards as the recursion of step 3
  whiten              advantage normalisation over the global batch (as OpenRLHF's replay buffer does)
  clipped_objective   L_actor: PPO's clipped surrogate (Schulman et al., 2017, eq. 7)
  clipped_value_loss  L_critic: the value clipping of OpenRLHF's ValueLoss (openrlhf/models/loss.py; its
                      per-sequence mean is not ours: docs/fidelity.md, "Deviations")
  rollout             steps 1-2
  make_experience     step 3; r_t is the KL-penalised reward of Ouyang et al., 2022 (sec. 3.5, eq. 2),
                      spread over the tokens as OpenRLHF does (k1 per token, the score on the last)
  ppo_update          step 4

Left out, and why: no reward model (math answers are checked, mathrl/grader.py); no value-model class of
our own (the critic is transformers' token-classification model with one label, which FSDP shards
and save_pretrained writes like the actor); no PPO-ptx (the pretraining term of Ouyang et al.'s eq. 2:
there is no pretraining data here); no entropy bonus (entropy is reported, not optimised); a fixed
kl_coef, no adaptive KL controller (Ziegler et al., 2019): one knob less; no sequence packing across
rows (right padding, rows sorted by length within a mini-batch, is simpler); one generation engine,
colocated with training and asleep during updates (OpenRLHF runs vLLM, actor, critic and reference
as separate Ray actors: more GPUs, more plumbing).
Data, rewards, engine, sharding, checkpoints and the trajectories lim.py reads are grpo.py's (their
plumbing lives in mathrl/); `rollout` (steps 1-2) has grpo.py's shape, and only steps 3 and 4 differ.
"""
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import lim
import rewards
from mathrl import checkpoints, distributed, flags, fsdp, logs, lora, memplan, models, sequences
from mathrl.engine import Sampling, trainer_engine
from mathrl.flags import COUNT, FRACTION, NON_NEGATIVE, flag
from mathrl.grader import Grader

TEMPLATES = data.TEMPLATES  # inside Config, `data` is the --data field


@dataclass
class Config(flags.RLFlags):
    # The defaults are one recipe, the limr preset's (LIMR, 8 GPUs; its sources are cited in PRESETS
    # below, tests/test_fidelity.py checks the two agree): `ppo.py --data limr` is `ppo.py --preset limr`.
    model: str = flag("Qwen/Qwen2.5-Math-7B", "policy to start from: hub id or local folder")
    critic: str = flag("", "value model to start from: a critic saved by ppo.py (output-dir/critic), or any "
                           "causal LM, whose LM head is replaced by a fresh scalar head (default: --model)")
    data: str = flag("limr", "training prompts: a data.load_problems spec (name, file, name=path, mixture "
                             "a:N,b:M); the problems only: --preset NAME sets a paper's whole recipe")
    template: str = flag("qwen-math", "prompt template (data.format_prompt)", TEMPLATES)
    output_dir: str = flag("runs/ppo", "checkpoints, metrics.jsonl, trajectories.jsonl, final actor, "
                                       "final critic in critic/")
    max_steps: int = flag(200, "generation steps (each followed by rollout / train-batch-size x ppo-epochs "
                               "optimizer steps)", **COUNT)
    prompts_per_step: int = flag(1024, "rollout batch: prompts per step over all ranks; each gets "
                                       "num-generations completions", **COUNT)
    num_generations: int = flag(8, "completions per prompt", **COUNT)
    train_batch_size: int = flag(256, "completions per optimizer step over all ranks; a multiple of "
                                      "num-generations x ranks", **COUNT)
    ppo_epochs: int = flag(1, "passes over each rollout", **COUNT)
    micro_batch_size: int = flag(4, "completions per forward/backward pass on one rank", **COUNT)
    temperature: float = flag(1.2, "sampling temperature (log-probs are taken at the same temperature)",
                              above=0)  # the log-probs divide the logits by it: 0 would train on NaN
    top_p: float = flag(1.0, "nucleus sampling mass", above=0, high=1)
    max_prompt_length: int = flag(1024, "prompts longer than this (tokens) are left out, with a count "
                                        "printed", **COUNT)
    max_completion_length: int = flag(3072, "max new tokens per completion", **COUNT)
    rewards: str = flag("limr:1", "weighted reward functions of rewards.py, NAME:WEIGHT,...: "
                                  + ", ".join(rewards.REWARD_NAMES))
    kl_coef: float = flag(0.01, "per-token KL penalty in the reward (0: no reference model is loaded)",
                          **NON_NEGATIVE)
    gamma: float = flag(1.0, "discount of GAE", **FRACTION)
    lam: float = flag(0.95, "lambda of GAE (1: Monte-Carlo returns, 0: one-step TD)", **FRACTION)
    clip_eps: float = flag(0.2, "clip rho to [1 - clip-eps, 1 + clip-eps]", **FRACTION)
    value_clip: float = flag(0.2, "keep new values within this of the rollout's values in the clipped "
                                  "value loss", **NON_NEGATIVE)
    actor_lr: float = flag(5e-7, "actor peak learning rate (AdamW)", **NON_NEGATIVE)
    critic_lr: float = flag(9e-6, "critic peak learning rate (AdamW)", **NON_NEGATIVE)
    critic_warmup_steps: int = flag(0, "first steps that train the critic only, the actor frozen",
                                    **NON_NEGATIVE)
    warmup_ratio: float = flag(0.03, "fraction of the schedule's optimizer steps with linear warm-up "
                                     "(--lr-schedule counts them; --warmup-steps > 0 replaces it)",
                               **FRACTION)
    warmup_steps: int = flag(10, "optimizer steps of linear warm-up (0: --warmup-ratio decides), OpenRLHF's "
                                 "--lr_warmup_steps", **NON_NEGATIVE)
    schedule_steps: int = flag(430_000, "optimizer steps the warm-up ratio and the cosine of both models "
                                        "span (0: this run's updates); LIMR's OpenRLHF spans --num_episodes "
                                        "x updates per episode, and stops far before its end", **NON_NEGATIVE)
    min_lr_ratio: float = flag(0.1, "cosine decays to lr * this", **FRACTION)
    weight_decay: float = flag(0.0, "AdamW weight decay", **NON_NEGATIVE)
    adam_beta2: float = flag(0.95, "AdamW beta2 of both models (beta1 is 0.9): OpenRLHF's default, LIMR's "
                                   "trainer; the transformers Trainer uses 0.999", **FRACTION)
    grad_clip: float = flag(1.0, "max gradient norm of each model (0: no clipping)", **NON_NEGATIVE)
    save_steps: int = flag(10, "write output-dir/checkpoint-N every N steps", **COUNT)
    seed: int = flag(0, "data order, sampling, value head initialisation",
                     low=0, high=2 ** 32 - 1)  # numpy's seed range
    vllm_gpu_memory_utilization: float = flags.shared_flag(flags.RLFlags, "vllm_gpu_memory_utilization", 0.55)
    vllm_max_num_batched_tokens: int = flags.shared_flag(flags.RLFlags, "vllm_max_num_batched_tokens", 8192)


# ---- the critic: a value model V(s_t) for every prefix of a sequence


def load_critic(name_or_path: str, seed: int = 0, rope_theta: float = 0.0, max_positions: int = 0):
    """The base transformer with a linear head giving one number per position
    (AutoModelForTokenClassification with num_labels=1): a save_pretrained-able model that FSDP shards
    like the actor. From a causal LM checkpoint the head is new; from a saved critic it is the trained one.

    A new head is initialised as LIMR's OpenRLHF critic: weights ~ N(0, std 1/(hidden+1)), no bias
    (GAIR-NLP/LIMR openrlhf/models/model.py:241 nn.Linear(hidden, 1, bias=False), :152-154 the std;
    trainer/ray/ppo_critic.py:83 does it whenever the critic starts from the policy's checkpoint).
    transformers' own head would be std 0.02 plus a bias, ~70x larger at 7B's hidden size 3584.
    The draw comes from its own generator seeded by `seed`, so every rank draws the same head."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(name_or_path, num_labels=1)
    config.classifier_dropout = 0.0  # a value must be a function of the tokens, not of a dropout mask
    config.token_classification_bias = False  # model.py:241
    models.config_overrides(config, rope_theta, max_positions)  # --rope-theta, --max-position-embeddings
    critic, loading = AutoModelForTokenClassification.from_pretrained(
        name_or_path, config=config, dtype=torch.float32, output_loading_info=True)
    if "score.weight" in loading["missing_keys"]:
        hidden = critic.score.in_features
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            critic.score.weight.normal_(0.0, 1.0 / (hidden + 1), generator=generator)  # model.py:152-154
    return critic


def critic_values(critic, input_ids) -> torch.Tensor:
    """V in token_logprobs' layout, [B, T - 1]: values[:, t] is the head's output at position t, the value
    of the state (tokens 0..t) in which token t+1 is chosen. So a completion token's log-prob and the value
    V(s_t) of the state it was chosen in share one index, and both are masked by completion_mask[:, 1:]."""
    return critic(input_ids=input_ids).logits[:, :-1, 0].float()  # rows packed by sequences.pack


# ---- the PPO equations, each a function so the tests can check it against hand computations


def token_logprobs(model, input_ids, completion_mask, temperature: float, chunk_size: int,
                   with_entropy=False):
    """log pi(o_t | q, o_<t) of every completion token at the sampling temperature and, with_entropy,
    the entropy of pi(. | q, o_<t) at each position: [B, T - 1] each; logp is zero outside the
    completion and has gradient; the entropy is not masked and has none (reported, not optimised).
    (grpo.py has the same function: each algorithm file shows its own math.)

    Rows are prompt + completion, right-padded (sequences.pack). No attention mask is needed: causal
    attention never lets a real token see the pads after it, and completion_mask drops the pads."""
    def head(logits, next_tokens):                 # [n, V] fp32 logits at n positions, [n] the tokens after
        logits = logits / temperature              # the engine sampled from softmax(z / T): score that
        log_normaliser = logits.logsumexp(-1)                                               # [n]
        logp = logits.gather(-1, next_tokens[:, None]).squeeze(-1) - log_normaliser        # [n]
        if not with_entropy:
            return logp, None
        # No gradient: under the checkpoint's recompute, a branch backward never reaches keeps its saved
        # [n, V] tensors alive as long as its output is (2 per chunk: 8 B x positions x V per micro-batch)
        with torch.no_grad():
            return logp, log_normaliser - (logits.softmax(-1) * logits).sum(-1)  # H = -sum_v p_v log p_v

    # The model's output at position t is pi(. | tokens 0..t), the distribution of token t + 1: column t
    # of the result scores token t + 1, so it is one column narrower than the rows, and completion_mask
    # shifted by one, [:, 1:], marks the completion's tokens in it. (lm_head runs chunk_size positions at
    # a time: a micro-batch's full-vocabulary logits would be gigabytes.)
    logp, entropy = sequences.next_token_scores(model, input_ids, head, chunk_size)         # [B, T - 1]
    return logp * completion_mask[:, 1:], entropy


def gae(token_rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over [B, T - 1] tensors; mask marks each row's response.

    delta_t = r_t + gamma * V_t+1 - V_t and A_t = delta_t + gamma * lambda * A_t+1, run backwards from
    the last response token, after which the value (and advantage) is 0: the episode has ended.
    Returns (A, R = A + V), zero outside the mask. With gamma = lambda = 1, R_t = sum_k>=t r_k.
    """
    advantages = torch.zeros_like(token_rewards)
    next_value = next_advantage = torch.zeros_like(token_rewards[:, 0])                        # [B]
    for t in reversed(range(token_rewards.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]  # 0 past the end
    return advantages, (advantages + values) * mask


def whiten(tensors: list, masks: list, dist, eps: float = 1e-8) -> list:
    """(x - mean) / std with the mean and std over the masked tokens of the GLOBAL batch (all micro-
    batches of all ranks), so the advantages are the same whatever the number of ranks."""
    def global_sum(xs):
        return distributed.all_reduce_sum(sum((x.double() * m).sum() for x, m in zip(xs, masks)), dist)

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


# ---- steps 1-2: sample and score


@dataclass
class Rollout:
    """One completion, as steps 3 and 4 need it."""
    prompt_ids: list[int]
    completion_ids: list[int]
    engine_logprobs: list[float]   # log-prob of each completion token under the engine that sampled it
    score: float                   # s_i, the task reward, given on the last token


def rollout(step: int, engine, problems, prompts, prompt_ids, reward_weights, grader, cosine, cfg: Config,
            dist):
    """Steps 1-2. Returns this rank's Rollouts (its whole groups, in prompt order), a summary of every
    group of the step's batch (every rank's, for the metrics and LIM's trajectories) and the timings.

    Invariants a change here must keep (steps 3-4, resuming and lim.py rely on them):
    - the prompts are a pure function of the step (sequences.batch_indices): a resumed run, or one on any
      number of ranks, draws the same prompts;
    - every rank samples prompts_per_step / world_size prompts, whole groups: make_experience cuts every
      rank's rollouts into the same number of mini-batches, so FSDP's collectives inside them pair up;
    - the returned batch is exactly the step's prompts at positions step * P + j of the stream of epochs:
      trajectories.jsonl holds each prompt once per epoch;
    - the engine samples with the actor's current weights (step 5 pushes them): make_experience takes
      pi_old to be the actor itself, so a fork that samples asynchronously must pass the sampling
      policy's log-probs instead.
    """
    P, G, W = cfg.prompts_per_step, cfg.num_generations, dist.world_size
    # 1. P prompts (the same on any number of ranks); rank r samples prompts r, r + W, r + 2W, ...
    mine = sequences.batch_indices(step, P, len(problems), cfg.seed)[dist.rank::W]
    started = time.time()
    engine.wake_up()
    outputs = engine.generate([prompts[i] for i in mine], Sampling(
        n=G, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_completion_length))
    engine.sleep()
    completions = [c for group in outputs for c in group]             # G consecutive per prompt
    owners = [i for i in mine for _ in range(G)]
    generated_at = time.time()
    # 2. scores s_i = sum_f w_f r_f(o_i), graded in worker processes under a time limit
    scores = rewards.compute_rewards(
        [c.text for c in completions], [problems[i]["answer"] for i in owners],
        [len(c.token_ids) for c in completions], [c.finish_reason == "length" for c in completions],
        reward_weights, grader, [prompts[i] for i in owners], cosine,  # prompts pick the format rule
        rewards.OverlongShape(cfg.max_completion_length, cfg.overlong_buffer))
    groups = [sequences.Group(i, step * P + dist.rank + j * W, outputs[j],
                              {name: column[j * G:(j + 1) * G] for name, column in scores.items()})
              for j, i in enumerate(mine)]
    # every rank gets a summary of every group of the step, in batch order (for the metrics and LIM's
    # trajectories; only the first group's texts, for completions.jsonl)
    summaries = [g.summary(keep_text=g.position == step * P) for g in groups]
    batch = sorted((g for part in distributed.all_gather_objects(summaries, dist) for g in part),
                   key=lambda g: g.position)
    rollouts = [Rollout(prompt_ids[g.problem], c.token_ids, c.logprobs, s)
                for g in groups for c, s in zip(g.completions, g.rewards["total"])]
    seconds = {"time/generation": generated_at - started, "time/reward": time.time() - generated_at}
    return rollouts, batch, seconds


# ---- step 3: per-token rewards, values and advantages of the rollout


def _pack(rollouts: list[Rollout], pad_id: int, device) -> dict:
    """One micro-batch as tensors; everything per token is in token_logprobs' layout, [B, T - 1]. No
    rollouts (a rank's share of a token budget ran out first): one row of pads with no completion token,
    so the rank still runs its forward and backward passes."""
    empty, rollouts = not rollouts, rollouts or [Rollout([pad_id], [pad_id], [0.0], 0.0)]
    input_ids, completion_mask = sequences.pack([r.prompt_ids for r in rollouts],
                                                [r.completion_ids for r in rollouts], pad_id, device)  # [B, T]
    completion_mask = completion_mask * (0.0 if empty else 1.0)
    score = torch.zeros(len(rollouts), input_ids.shape[1] - 1, device=device)                   # [B, T - 1]
    for row, r in enumerate(rollouts):  # column t scores token t + 1: the last token's column is length - 2
        score[row, len(r.prompt_ids) + len(r.completion_ids) - 2] = r.score
    engine_logp = sequences.pack_logprobs([r.engine_logprobs for r in rollouts],
                                          [len(r.prompt_ids) for r in rollouts], input_ids.shape[1], device)
    return {"input_ids": input_ids, "completion_mask": completion_mask, "mask": completion_mask[:, 1:],
            "score": score, "engine_logp": engine_logp}


def make_experience(actor, critic, reference, rollouts: list[Rollout], cfg: Config, dist, pad_id: int):
    """Step 3 on this rank's rollouts, whole groups in prompt order. Returns the experience as
    mini-batches (train_batch_size / ranks rollouts) of micro-batches (dicts of [B, T - 1] tensors), and
    statistics over the global batch."""
    per_rank = cfg.train_batch_size // dist.world_size
    by_length = lambda mini: sorted(mini, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))
    minis = [by_length(rollouts[s:s + per_rank]) for s in range(0, len(rollouts), per_rank)]
    if not cfg.max_tokens_per_micro_batch:
        experience = [[_pack(mini[k:k + cfg.micro_batch_size], pad_id, dist.device)  # less padding each
                       for k in range(0, len(mini), cfg.micro_batch_size)] for mini in minis]
    else:  # as many rows a micro-batch as fit the token budget (the same number on every rank)
        budget = lambda mini: sequences.token_budget_micro_batches(
            [len(r.prompt_ids) + len(r.completion_ids) for r in mini], cfg.max_tokens_per_micro_batch, dist)
        experience = [[_pack([mini[i] for i in batch], pad_id, dist.device) for batch in budget(mini)]
                      for mini in minis]
    micro_batches = [mb for mini in experience for mb in mini]
    logprobs = lambda model, mb: token_logprobs(model, mb["input_ids"], mb["completion_mask"],
                                                cfg.temperature, cfg.logprob_chunk_size)[0]
    with torch.no_grad():
        for mb in micro_batches:
            mask = mb["mask"]
            with fsdp.autocast(dist, cfg.bf16):
                mb["old_logp"] = logprobs(actor, mb)
                ref_logp = mb["old_logp"]
                if reference is not None:
                    with lora.adapters_disabled(reference):  # LoRA: the reference is the actor, adapters off
                        ref_logp = logprobs(reference, mb)
                mb["values"] = critic_values(critic, mb["input_ids"]) * mask
            mb["kl"] = (mb["old_logp"] - ref_logp) * mask            # log pi_old - log pi_ref, per token
            mb["rewards"] = -cfg.kl_coef * mb["kl"] + mb["score"]    # score: s_i on the last token, else 0
            mb["advantages"], mb["returns"] = gae(mb["rewards"], mb["values"], mask, cfg.gamma, cfg.lam)
    fsdp.reshard(reference)  # a frozen model has no backward to free its gathered root
    raw_advantages = [mb["advantages"] for mb in micro_batches]
    masks = [mb["mask"] for mb in micro_batches]
    for mb, whitened in zip(micro_batches, whiten(raw_advantages, masks, dist)):
        mb["advantages"] = whitened

    # ---- bookkeeping: token means over the global batch
    column = lambda key: [mb[key] for mb in micro_batches]
    errors = [mb["returns"] - mb["values"] for mb in micro_batches]
    gaps = [(mb["old_logp"] - mb["engine_logp"]).abs() * mb["mask"] for mb in micro_batches]  # engine/trainer
    m = _token_means({"kl": column("kl"), "value": column("values"), "return": column("returns"),
                      "return^2": [r ** 2 for r in column("returns")], "error": errors,
                      "error^2": [e ** 2 for e in errors], "advantage": raw_advantages,
                      "advantage^2": [a ** 2 for a in raw_advantages], "gap": gaps}, masks, dist)
    return_variance, error_variance = m["return^2"] - m["return"] ** 2, m["error^2"] - m["error"] ** 2
    stats = {"kl": m["kl"], "value_mean": m["value"], "return_mean": m["return"],
             "advantage_mean": m["advantage"],
             "advantage_std": max(m["advantage^2"] - m["advantage"] ** 2, 0.0) ** 0.5,
             # 1 - Var(R - V) / Var(R): 1 when the critic predicts the returns, 0 when it knows only the mean
             "explained_variance": 1 - error_variance / max(return_variance, 1e-12),
             "logprob_gap_mean": m["gap"],
             "logprob_gap_max": distributed.all_reduce_max(torch.stack([g.max() for g in gaps]).max(),
                                                           dist).item()}
    return experience, stats


def _token_means(named: dict, masks: list, dist) -> dict:
    """Mean of each list of tensors over the masked tokens of every rank (one all-reduce)."""
    sums = torch.stack([sum((x.double() * m).sum() for x, m in zip(xs, masks)) for xs in named.values()]
                       + [sum(m.sum().double() for m in masks)])
    sums = distributed.all_reduce_sum(sums, dist)
    return {name: (sums[k] / sums[-1]).item() for k, name in enumerate(named)}


# ---- step 4: mini-batch updates of the critic and the actor


def ppo_update(experience, optimizers: dict, schedulers: dict, cfg: Config, dist, train_actor=True) -> dict:
    """Step 4: for each epoch and mini-batch, one critic step and (unless train_actor is False, the
    critic's warm-up) one actor step. optimizers = {"actor": (actor, optimizer), "critic": (critic,
    optimizer)}. Each loss is a token mean over the global mini-batch, so any number of ranks takes the
    same step as one process. Returns statistics averaged over all optimizer steps and the global batch."""
    actor, critic = optimizers["actor"][0], optimizers["critic"][0]
    tokens = torch.stack([sum(mb["mask"].sum() for mb in mini) for mini in experience]).double()
    tokens = distributed.all_reduce_sum(tokens, dist)  # response tokens of each global mini-batch
    num_updates = len(experience) * cfg.ppo_epochs
    sums = dict.fromkeys(("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "entropy"), 0.0)
    grad_norms = {"actor": 0.0, "critic": 0.0}
    actor.train()
    critic.train()
    if not train_actor:
        fsdp.reshard(actor)  # gathered by make_experience's forwards; no backward of its frees it this step
    for epoch in range(cfg.ppo_epochs):
        for i, mini in enumerate(experience):
            num_tokens = tokens[i].item()
            share = 1 / num_tokens / num_updates  # of the reported averages
            for mb in mini:
                mask = mb["mask"]                                                          # [B, T - 1]
                # the critic regresses V(s_t) on the GAE return R_t
                with fsdp.autocast(dist, cfg.bf16):
                    values = critic_values(critic, mb["input_ids"])
                value_loss, value_clipped = clipped_value_loss(values, mb["values"], mb["returns"],
                                                               cfg.value_clip)
                value_loss = (value_loss * mask).sum() / num_tokens
                (value_loss * dist.world_size).backward()  # FSDP averages gradients over ranks; undo
                if train_actor:  # the actor follows the clipped policy gradient of the whitened advantages
                    with fsdp.autocast(dist, cfg.bf16):
                        logp, entropy = token_logprobs(actor, mb["input_ids"], mb["completion_mask"],
                                                       cfg.temperature, cfg.logprob_chunk_size,
                                                       with_entropy=True)                  # [B, T - 1]
                    objective, clipped = clipped_objective(logp, mb["old_logp"], mb["advantages"],
                                                           cfg.clip_eps)
                    policy_loss = -(objective * mask).sum() / num_tokens
                    (policy_loss * dist.world_size).backward()

                # ---- bookkeeping: this micro-batch's share of the averages over all updates and tokens
                token_mean = lambda x: (x.detach() * mask).sum().item() * share
                sums["value_loss"] += value_loss.item() / num_updates
                sums["value_clip_frac"] += token_mean(value_clipped)
                if train_actor:
                    sums["policy_loss"] += policy_loss.item() / num_updates
                    sums["clip_frac"] += token_mean(clipped)
                    sums["entropy"] += token_mean(entropy)
            for name in ("critic", "actor") if train_actor else ("critic",):
                model, optimizer = optimizers[name]
                grad_norm = fsdp.clip_grad_norm(model, cfg.grad_clip)
                fsdp.stop_if_not_finite({f"{name} gradient norm": grad_norm},
                                        schedulers[name].last_epoch + 1, dist)
                grad_norms[name] += grad_norm / num_updates
                optimizer.step()
                schedulers[name].step()
                optimizer.zero_grad(set_to_none=True)
    stats = {name: distributed.all_reduce_sum(value, dist).item() for name, value in sums.items()}
    fsdp.stop_if_not_finite({"policy loss": stats["policy_loss"], "value loss": stats["value_loss"]},
                            schedulers["critic"].last_epoch, dist)
    stats |= {"actor_grad_norm": grad_norms["actor"], "critic_grad_norm": grad_norms["critic"]}
    if not train_actor:  # a frozen actor has no loss, clip fraction, entropy or gradient: log none, not 0
        stats = {name: stats[name] for name in ("value_loss", "value_clip_frac", "critic_grad_norm")}
    return stats


def main(argv=None):
    cfg = flags.parse_args(Config, PRESETS, argv, description=__doc__.split("\n\n")[0])
    dist = distributed.init_distributed(cfg.dist_timeout_minutes)
    distributed.seed_everything(cfg.seed)
    try:
        reward_weights = rewards.parse_weights(cfg.rewards)
        cosine = rewards.CosineShape.from_flags(cfg.cosine_max_len, cfg.cosine_unit, cfg.cosine_clamp,
                                                cfg.cosine_correct, cfg.cosine_wrong)
        rewards.OverlongShape.from_flags(cfg.max_completion_length, cfg.overlong_buffer,
                                         "overlong" in reward_weights)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    P, G, W = cfg.prompts_per_step, cfg.num_generations, dist.world_size
    rollout_size = P * G
    if P % W or cfg.train_batch_size % (G * W) or rollout_size % cfg.train_batch_size:
        raise SystemExit(f"error: need --prompts-per-step divisible by {W} ranks, and --train-batch-size "
                         f"a multiple of num-generations x ranks ({G * W}) dividing the rollout "
                         f"({rollout_size})")
    updates_per_step = rollout_size // cfg.train_batch_size * cfg.ppo_epochs
    longest = cfg.max_prompt_length + cfg.max_completion_length  # the longest row a micro-batch may get
    if 0 < cfg.max_tokens_per_micro_batch < longest:
        raise SystemExit(f"error: --max-tokens-per-micro-batch {cfg.max_tokens_per_micro_batch} is less than "
                         f"the longest row, --max-prompt-length + --max-completion-length = {longest}")
    memplan.report("ppo", cfg, dist)  # every flag is checked: the budget, before anything loads

    # ---- data first: a bad file fails in seconds, before any model loads
    problems = data.load_problems(cfg.data, split="train", seed=cfg.seed)
    checkpoint = checkpoints.latest_checkpoint(cfg.output_dir)
    if cfg.model == "tiny":
        raise SystemExit("error: PPO starts from a trained policy; pass --model <sft output dir>")
    models.check_model_path(cfg.model)
    if cfg.critic:
        models.check_model_path(cfg.critic, "--critic")
    lora_alpha, targets = lora.checked_flags(cfg, checkpoint)  # against the model's config; no weights yet
    tokenizer = models.load_tokenizer(cfg.model)
    problems, prompts, prompt_ids = data.prepare_prompts(problems, tokenizer, cfg.template,
                                                         cfg.max_prompt_length, dist, "ppo")

    # ---- models: actor and critic (from the newest checkpoint when resuming), the frozen reference. With
    # LoRA the actor is the base model plus adapters (a checkpoint holds its adapters only), the reference is
    # the actor with its adapters off, and the critic is trained in full as without LoRA.
    actor_path = str(checkpoint) if checkpoint and not cfg.lora_rank else cfg.model
    context = dict(rope_theta=cfg.rope_theta, max_positions=cfg.max_position_embeddings)  # overrides, if any
    actor = models.load_model(actor_path, **context)
    if cfg.lora_rank:  # before sharding: every rank wraps the whole model alike (A from its own seed)
        lora.apply_lora(actor, cfg.lora_rank, lora_alpha, targets, cfg.lora_dropout, seed=cfg.seed)
    actor = fsdp.shard_model(actor, dist, cfg.bf16, cfg.gradient_checkpointing)
    critic_path = str(checkpoint / "critic") if checkpoint else cfg.critic or cfg.model
    critic = load_critic(critic_path, cfg.seed, **context)
    critic = fsdp.shard_model(critic, dist, cfg.bf16, cfg.gradient_checkpointing)
    reference = None if cfg.kl_coef == 0 else actor if cfg.lora_rank else \
        fsdp.load_reference(cfg.model, dist, cfg.bf16, **context)
    distributed.seed_per_rank(cfg.seed, dist)  # models (the critic's new head too) alike on all ranks first
    adamw = lambda parameters, lr: torch.optim.AdamW(parameters, lr=lr, weight_decay=cfg.weight_decay,
                                                     betas=(0.9, cfg.adam_beta2))
    actor_trained = lora.trainable_parameters(actor) if cfg.lora_rank else actor.parameters()
    optimizers = {"actor": (actor, adamw(actor_trained, cfg.actor_lr)),
                  "critic": (critic, adamw(critic.parameters(), cfg.critic_lr))}
    actor_updates = max(1, cfg.max_steps - cfg.critic_warmup_steps) * updates_per_step  # the actor waits
    # --schedule-steps spans both models when set (OpenRLHF gives the critic the actor's max_steps)
    schedule = lambda name, updates: fsdp.lr_schedule(optimizers[name][1], cfg.lr_schedule,
                                                      cfg.schedule_steps or updates, cfg.warmup_ratio,
                                                      cfg.min_lr_ratio, cfg.warmup_steps)
    schedulers = {"actor": schedule("actor", actor_updates),
                  "critic": schedule("critic", cfg.max_steps * updates_per_step)}
    start_step = 0
    if checkpoint is not None:
        state = checkpoints.load_trainer_state(checkpoint)
        if cfg.lora_rank:
            lora.load_adapter(actor, checkpoint / "adapter")  # each rank copies in its shard of A and B
        start_step = checkpoints.restore_checkpoint(state, optimizers, schedulers, dist,
                                                    seed=cfg.seed)["step"]
        if dist.is_main:
            print(f"ppo: resumed from {checkpoint} at step {start_step}")
    logs.truncate_logs(cfg.output_dir, start_step, dist)  # lines of steps that will be redone go
    engine = trainer_engine(cfg, actor, tokenizer, actor_path, dist)
    if cfg.lora_rank and checkpoint is not None:  # the engine loaded the base: give it the resumed adapters
        engine.push_weights(actor)
    logger = logs.MetricsLogger(cfg.output_dir, cfg.report_to, asdict(cfg), dist)
    grader = Grader(num_workers=cfg.grader_workers)
    if dist.is_main:
        print(f"ppo: {len(problems)} prompts, {P} x {G} completions per step, {updates_per_step} updates of "
              f"{cfg.train_batch_size}, {W} rank(s), engine {cfg.engine}, rewards {reward_weights}")

    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                    disable=not dist.is_main, desc="ppo")
    for step in progress:
        # 1-2. sample, score
        actor.eval()  # dropout off (none in Qwen2; a forked model may have it) for sampling, pi_old, V_old
        rollouts, batch, counts = rollout(step, engine, problems, prompts, prompt_ids, reward_weights, grader,
                                          cosine, cfg, dist)
        t2 = time.time()
        # 3. per-token rewards (KL penalty + score on the last token), values, GAE, whitened advantages,
        #    on this rank's groups
        experience, rollout_stats = make_experience(actor, critic, reference, rollouts, cfg, dist,
                                                    tokenizer.pad_token_id)
        # 4. mini-batch updates of the critic, and of the actor once the critic's warm-up is over
        train_actor = step >= cfg.critic_warmup_steps
        stats = ppo_update(experience, optimizers, schedulers, cfg, dist, train_actor)
        del experience
        # 5. the engine samples the next batch with these weights (pushed while the actor is frozen
        #    too: a sleeping vLLM engine released its copy)
        engine.push_weights(actor)
        t3 = time.time()

        # ---- LIM's trajectories (what lim.py scores), metrics, completions, checkpoint
        lim.write_trajectories(cfg.output_dir, step, batch, problems, dist)
        metrics = logs.rollout_metrics(step, batch, reward_weights, P, len(problems))
        logs.write_completions(cfg.output_dir, step, batch, problems, prompts, cfg.log_completions_steps,
                               dist)
        metrics |= {**rollout_stats, **stats, **counts, "actor_frozen": not train_actor,
                    "lr/actor": schedulers["actor"].get_last_lr()[0],
                    "lr/critic": schedulers["critic"].get_last_lr()[0], "time/update": t3 - t2,
                    "tokens_per_s": metrics["response_length_mean"] * len(batch) * G
                    / counts["time/generation"]}
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                             ev=f"{metrics['explained_variance']:.2f}")
        if (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            checkpoints.save_checkpoint(cfg.output_dir, step + 1, actor, tokenizer, optimizers, schedulers,
                                        {"step": step + 1}, dist, extra_models={"critic": critic},
                                        save_total_limit=cfg.save_total_limit)

    grader.close()
    checkpoints.finish(cfg.output_dir, actor, tokenizer, dist)
    checkpoints.finish(Path(cfg.output_dir) / "critic", critic, tokenizer, dist)  # --critic can start from it
    if dist.is_main:
        print(f"ppo: final actor in {cfg.output_dir}, critic in {cfg.output_dir}/critic")
    engine.close()  # vLLM's teardown needs the process group that distributed.shutdown destroys
    distributed.shutdown(dist)


# ---- presets: the papers' settings, each value beside its source

PRESETS = {
    # The CPU demo: start from the tiny SFT model (sft.py --preset tiny) and improve it on `linear`.
    # One update per rollout at a small actor lr; 5 steps of critic warm-up. Higher actor lrs (1e-4,
    # 3e-4) with two updates per rollout made held-out pass@1 worse on the tiny model.
    "tiny": dict(data="linear", template="plain", max_steps=30, prompts_per_step=16, num_generations=8,
                 train_batch_size=128, micro_batch_size=32, temperature=1.0, max_prompt_length=128,
                 max_completion_length=192, rewards="accuracy:1", kl_coef=0.01, actor_lr=5e-5, critic_lr=1e-3,
                 critic_warmup_steps=5, warmup_ratio=0.0, min_lr_ratio=1.0, bf16=False,
                 gradient_checkpointing=False, engine="hf", grader_workers=1, save_steps=10,
                 log_completions_steps=10,
                 # the schedule its results were measured with: constant, over this run's updates
                 lr_schedule="mathrl", warmup_steps=0, schedule_steps=0),
    # LIMR (Li et al. 2025): GAIR-NLP/LIMR scripts/train_limr.sh ("sh:N") through their OpenRLHF fork
    # (defaults in openrlhf/cli/train_ppo_ray.py, "ray:N"): PPO from the base model on the 1,389 LIMR
    # problems. A rollout of 1024 x 8 is 32 updates of 256. max_steps 200 is OURS (their run has no step
    # limit). Their scheduler, the actor's (trainer/ray/ppo_actor.py:239-256) and the critic's
    # (ppo_critic.py:101-112) alike: transformers' get_scheduler("cosine_with_min_lr", min_lr = 0.1 x lr)
    # over max_steps = ceil(--num_episodes 10000 (sh:53) x (1389 x 8 // 256 x 1)) = 430,000 updates
    # (ppo_actor.py:240-243), 10 warm-up updates (sh:65, ppo_actor.py:246-247; lr 0 at the first): over our
    # 6,400 updates the lr stays within 0.05% of its peak after the warm-up. Deviation: LIMR's actor takes
    # log-probs at temperature 1 (models/actor.py:216) while sampling at 1.2; ours takes them at 1.2, the
    # distribution that was sampled.
    "limr": dict(model="Qwen/Qwen2.5-Math-7B", data="limr",  # sh:41, sh:66
                 template="qwen-math",  # the dataset's chat messages, Qwen2.5-Math's template (sh:68-69)
                 prompts_per_step=1024, num_generations=8, train_batch_size=256,  # sh:50, 51, 48
                 ppo_epochs=1, micro_batch_size=4,  # sh:52, 46
                 temperature=1.2, top_p=1.0,  # sh:77, ray:282
                 max_prompt_length=1024, max_completion_length=3072,  # sh:54, 55
                 rewards="limr:1",  # the rule reward of openrlhf/cli/serve_rm.py (sh:4-10)
                 kl_coef=0.01, gamma=1.0, lam=0.95,  # sh:59, ray:278, sh:62
                 clip_eps=0.2, value_clip=0.2,  # sh:60, 61
                 actor_lr=5e-7, critic_lr=9e-6, critic_warmup_steps=0,  # sh:57, 58; no --freezing_actor_steps
                 max_steps=200,  # OURS, see above
                 lr_schedule="transformers", schedule_steps=430_000, min_lr_ratio=0.1,  # see above
                 warmup_steps=10, warmup_ratio=0.03,  # sh:65; ray:292 (unused: warmup_steps > 0)
                 weight_decay=0.0, grad_clip=1.0, adam_beta2=0.95,  # ray:273, ray:272, ray:306
                 bf16=True, gradient_checkpointing=True, engine="vllm",  # sh:64, 76, 37
                 save_steps=10,  # OURS: they save every step (sh:40)
                 # OURS, vLLM colocated on each of 8 GPUs (mathrl/memplan.py): training keeps 12 B x (7.62B
                 # actor + 7.07B critic) / 8 of fp32 weights + Adam and 2 B x 7.62B / 8 of bf16 reference
                 # = 22.3 GiB, plus 4 GiB reserve; vLLM's 0.55 of 80 GiB = 44 GiB (70.3 GiB in all) holds bf16
                 # weights 14.2 GiB, ~2 GiB activations and 27.8 GiB of KV cache = 127 sequences of 4096
                 # tokens at 56 KiB each; the 1024 per GPU run in waves. 8192 tokens per pass: a GPU's 128
                 # prompts (<= 1024 tokens) in 16 passes, activations ~0.8 GiB.
                 vllm_gpu_memory_utilization=0.55, vllm_max_num_batched_tokens=8192),
}


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
