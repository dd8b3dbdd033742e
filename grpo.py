"""Group Relative Policy Optimization (GRPO) for math reasoning.

    torchrun --nproc_per_node 8 grpo.py --data limo --output-dir runs/grpo-limo     # GPUs, vLLM
    python grpo.py --preset tiny --model runs/demo/sft --output-dir runs/grpo-tiny  # CPU demo

GRPO (Shao et al., 2024, DeepSeekMath) drops PPO's critic: for each prompt it samples a group of
G completions, scores them, and uses each completion's reward relative to its own group as the
advantage of every one of its tokens. Per step (`rollout` is steps 1-3, `policy_update` step 4):

  1. take a batch of prompts; sample G completions of each with the current policy pi_old
  2. score them with the reward functions of rewards.py          r_i = sum_f w_f * r_f(o_i)
  3. group-relative advantages                                    A_i = (r_i - mean_g r) / (std_g r + eps)
  4. mu passes of clipped policy-gradient updates, each one optimizer step:
       rho_t = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t)
       L     = -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_t
       KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1       (k3: unbiased on samples of pi, >= 0)
  5. push the new weights into the generation engine (vLLM), so step 1 never samples stale weights.

Which equation each function implements:
  token_logprobs      log pi(o_t | q, o_<t) at the sampling temperature, the terms of rho_t
  group_advantages    A_i: DeepSeekMath sec. 4.1.2 (outcome supervision); --scale-rewards none is
                      Dr. GRPO (Liu et al., 2025, sec. 3.2), batch is the std over the whole batch
  clipped_objective   the clipped surrogate of DeepSeekMath eq. 3 (PPO's, Schulman et al., 2017, eq. 7),
                      with DAPO's decoupled clip range (Yu et al., 2025, sec. 3.1 "Clip-Higher")
  k3_kl               DeepSeekMath eq. 4 (Schulman's k3 estimator)
  aggregate_loss      grpo: DeepSeekMath eq. 3's 1/G sum_i 1/|o_i| sum_t; dapo: DAPO sec. 3.3's token
                      mean over the batch; dr_grpo: Dr. GRPO's constant normaliser
  has_signal          DAPO sec. 3.2's filter (keep groups with 0 < correct < G), for --dynamic-sampling
  rollout             steps 1-3
  policy_update       step 4; --tis-cap is truncated importance sampling (Yao et al., 2025)

With --lora-rank the policy is W + (alpha / r) B A with W frozen (mathrl/lora.py): the optimizer holds the
adapters only, pi_ref is the same model with its adapters switched off, and the engine receives the merged W.

Left out, and why: no value model (that is the point of GRPO; ppo.py has one); no reward model (math
answers are checked, mathrl/grader.py); no asynchronous or off-policy generation (each step samples
with the weights it updates, so rho = 1 at mu = 1); no sequence packing across rows (right padding,
sorted by length, costs ~30% less than unsorted and is simpler).
The plumbing (processes, FSDP, checkpoints, the engine) lives in mathrl/: no step of GRPO is there.
"""
import time
from dataclasses import asdict, dataclass

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
LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]


@dataclass
class Config(flags.RLFlags):
    # The defaults are one recipe, the limo preset's (the Qwen-baselines study, 8 GPUs; its sources are
    # cited in PRESETS below, tests/test_fidelity.py checks the two agree): `grpo.py --data limo` is
    # `grpo.py --preset limo`, and `--data NAME` alone changes the problems only.
    model: str = flag("Qwen/Qwen2.5-Math-1.5B", "policy to start from: hub id or folder")
    data: str = flag("limo", "training prompts: a data.load_problems spec (name, file, name=path, mixture "
                             "a:N,b:M); the problems only: --preset NAME sets a paper's whole recipe")
    template: str = flag("question", "prompt template (data.format_prompt)", TEMPLATES)
    output_dir: str = flag("runs/grpo", "checkpoints, metrics.jsonl, trajectories.jsonl, final model")
    max_steps: int = flag(36, "generation steps (each followed by num-iterations optimizer steps)", **COUNT)
    prompts_per_step: int = flag(64, "prompts per step over all ranks; each gets num-generations completions",
                                 **COUNT)
    num_generations: int = flag(7, "G, completions per prompt (the group)", **COUNT)
    micro_batch_size: int = flag(8, "completions per forward/backward pass on one rank", **COUNT)
    temperature: float = flag(0.6, "sampling temperature (log-probs are taken at the same temperature)",
                              above=0)  # the log-probs divide the logits by it: 0 would train on NaN
    top_p: float = flag(1.0, "nucleus sampling mass", above=0, high=1)
    max_prompt_length: int = flag(1024, "prompts longer than this (tokens) are left out, with a count "
                                        "printed", **COUNT)
    max_completion_length: int = flag(3072, "max new tokens per completion", **COUNT)
    dynamic_sampling: bool = flag(False, "DAPO's dynamic sampling: drop groups whose rewards are all equal "
                                         "(zero advantage) and sample more prompts until the batch holds "
                                         "prompts-per-step groups with signal")
    max_sampling_rounds: int = flag(4, "dynamic sampling: at most this many rounds of prompts-per-step "
                                       "prompts a step; short of groups with signal, groups without fill the "
                                       "batch (OURS: the cap and the fill)", **COUNT)
    mask_truncated: bool = flag(False, "completions cut off at --max-completion-length get advantages like the "
                                       "others but contribute no loss tokens (DAPO's overlong filtering; "
                                       "TRL's mask_truncated_completions)")
    rewards: str = flag("accuracy:1", "weighted reward functions of rewards.py, NAME:WEIGHT,...: "
                                             + ", ".join(rewards.REWARD_NAMES))
    scale_rewards: str = flag("group", "advantage scale: group (GRPO), batch, none (Dr. GRPO)",
                              ["group", "batch", "none"])
    loss_type: str = flag("dapo", "grpo (sequence mean, then mean), dapo (token mean over the batch, DAPO; "
                                  "TRL's name), dr_grpo (token sum / (sequences * max length))", LOSS_TYPES)
    num_iterations: int = flag(1, "mu, passes over each generation batch, one optimizer step per mini-batch "
                                  "each (mu = K = 1: the ratio is exactly 1)", **COUNT)
    mini_batches: int = flag(1, "K, slices of whole groups each pass steps on: K x mu optimizer steps a step "
                                "(ppo.py's --train-batch-size is P x G / K)", **COUNT)
    epsilon_low: float = flag(0.2, "clip rho below at 1 - epsilon_low", **FRACTION)
    epsilon_high: float = flag(0.2, "clip rho above at 1 + epsilon_high (DAPO: 0.28)", **NON_NEGATIVE)
    beta: float = flag(0.005, "KL coefficient to the reference policy (0: no reference model is loaded)",
                       **NON_NEGATIVE)
    tis_cap: float = flag(0.0, "truncated importance sampling cap C for engine/trainer mismatch (0: off)",
                          **NON_NEGATIVE)
    lr: float = flag(5e-6, "peak learning rate (AdamW)", **NON_NEGATIVE)
    warmup_ratio: float = flag(0.1, "fraction of optimizer steps with linear warm-up (--lr-schedule counts "
                                    "them)", **FRACTION)
    min_lr_ratio: float = flag(0.0, "cosine decays to lr * this", **FRACTION)
    weight_decay: float = flag(0.1, "AdamW weight decay", **NON_NEGATIVE)
    adam_beta2: float = flag(0.999, "AdamW beta2 (beta1 is 0.9; 0.999 is TRL's and the transformers "
                                    "Trainer's)", **FRACTION)
    grad_clip: float = flag(1.0, "max gradient norm (0: no clipping)", **NON_NEGATIVE)
    save_steps: int = flag(12, "write output-dir/checkpoint-N every N steps", **COUNT)
    seed: int = flag(1001, "data order, sampling", low=0, high=2 ** 32 - 1)  # numpy's seed range
    vllm_gpu_memory_utilization: float = flags.shared_flag(flags.RLFlags, "vllm_gpu_memory_utilization", 0.2)
    vllm_max_num_batched_tokens: int = flags.shared_flag(flags.RLFlags, "vllm_max_num_batched_tokens", 8192)


# ---- the GRPO equations, each a function so the tests can check it against hand computations


def token_logprobs(model, input_ids, completion_mask, temperature: float, chunk_size: int,
                   with_entropy=False):
    """log pi(o_t | q, o_<t) of every completion token at the sampling temperature and, with_entropy,
    the entropy of pi(. | q, o_<t) at each position: [B, T - 1] each; logp is zero outside the
    completion and has gradient; the entropy is not masked and has none (reported, not optimised).

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


def group_advantages(group_rewards, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std + eps); `none` leaves it unscaled (Dr. GRPO).

    A group whose rewards are all equal carries no signal: its advantages are exactly 0, never NaN.
    A different baseline (RLOO's leave-one-out mean) belongs here: docs/ablations/01-rloo.patch.
    """
    r = torch.as_tensor(group_rewards, dtype=torch.float32).view(-1, group_size)   # [groups, G]
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)   # std with n - 1, as TRL
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
    """exp(ref - logp) - (ref - logp) - 1: Schulman's k3, an unbiased (on tokens sampled from pi), never
    negative estimate of KL(pi || pi_ref). Its gradient is not KL(pi || pi_ref)'s: as a loss term on
    tokens sampled from pi, the expected gradient of k3 is that of KL(pi_ref || pi), the reverse
    direction (k1 = logp - ref would be unbiased in value and have zero expected gradient;
    docs/ablations/03-kl-estimator.patch compares them)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate_loss(per_token, mask, loss_type: str, num_sequences: int, num_tokens: int, max_len: int):
    """Sum this micro-batch's share of the global loss (normalisers are global counts)."""
    if loss_type == "grpo":     # mean over each sequence's tokens, then mean over sequences
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    if loss_type == "dapo":     # mean over all tokens of the batch: long answers weigh more
        return (per_token * mask).sum() / num_tokens
    if loss_type == "dr_grpo":  # a constant normaliser: no length bias
        return (per_token * mask).sum() / (num_sequences * max_len)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


# ---- steps 1-3: sample, score, advantages


@dataclass
class Rollout:
    """One completion, as the update needs it."""
    prompt_ids: list[int]
    completion_ids: list[int]      # ends with the EOS token when the completion stopped: it is trained too
    engine_logprobs: list[float]   # log-prob of each completion token under the engine that sampled it
    advantage: float               # A_i, the same for every token of the completion
    masked: bool = False           # cut off at the length limit under --mask-truncated: no loss tokens


def has_signal(group: sequences.Group) -> bool:
    """DAPO keeps groups with 0 < correct < G; here, groups whose rewards differ, i.e. whose advantages
    are not all zero (the same test under the accuracy reward; under cosine, lengths differ too)."""
    return len(set(group.rewards["total"])) > 1


def rollout(step: int, engine, problems, prompts, prompt_ids, reward_weights, grader, cosine, cfg: Config,
            dist):
    """Steps 1-3. Returns this rank's Rollouts, the groups of the step's batch (every rank's, for the
    metrics and LIM's trajectories) and the sampling counts.

    Invariants a change here must keep (the update, resuming and lim.py rely on them):
    - the prompts are a pure function of the step (sequences.batch_indices; extra rounds of dynamic
      sampling draw from their own seeded stream): a resumed run, or one on any number of ranks, draws
      the same prompts;
    - every rank returns prompts_per_step / world_size whole groups, the same number of rollouts: the
      update runs as many micro-batches on every rank, so FSDP's collectives inside them pair up;
    - advantages are computed over the global batch (every rank sees every group's rewards), so `batch`
      scaling and the groups a rank trains on do not depend on the number of ranks;
    - the returned batch is exactly the step's prompts_per_step prompts at positions step * P + j of the
      stream of epochs (round 0, whatever dynamic sampling drops): trajectories.jsonl holds each prompt
      once per epoch, and the logged reward and accuracy are those of that fresh draw;
    - the engine samples with the policy's current weights (step 5 pushes them): with mu = 1 the update
      takes pi_old to be the trainer's policy itself, so a fork that samples asynchronously or reuses old
      batches must pass the sampling policy's log-probs as pi_old, or its ratio stays exactly 1.
    """
    P, G, W = cfg.prompts_per_step, cfg.num_generations, dist.world_size
    with_signal, without_signal, generated, seconds = [], [], 0, {"generation": 0.0, "reward": 0.0}
    engine.wake_up()  # once for all rounds: asleep, vLLM released its weights until the next push
    for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        # 1. P prompts (the same on any number of ranks); rank r samples prompts r, r + W, r + 2W, ...
        drawn = sequences.batch_indices(step, P, len(problems), cfg.seed + round_ * 1_000_003)
        mine = drawn[dist.rank::W]
        started = time.time()
        outputs = engine.generate([prompts[i] for i in mine], Sampling(
            n=G, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_completion_length))
        completions = [c for group in outputs for c in group]              # G consecutive per prompt
        owners = [i for i in mine for _ in range(G)]
        generated_at = time.time()
        # 2. rewards r_i = sum_f w_f r_f(o_i), graded in worker processes under a time limit: one column
        #    per reward function, plus "correct" (0/1) and "total" (r_i)
        scores = rewards.compute_rewards(
            [c.text for c in completions], [problems[i]["answer"] for i in owners],
            [len(c.token_ids) for c in completions], [c.finish_reason == "length" for c in completions],
            reward_weights, grader, [prompts[i] for i in owners], cosine,  # prompts pick the format rule
            rewards.OverlongShape(cfg.max_completion_length, cfg.overlong_buffer))
        seconds["generation"] += generated_at - started
        seconds["reward"] += time.time() - generated_at
        groups = [sequences.Group(i, step * P + dist.rank + j * W, outputs[j],
                                  {name: column[j * G:(j + 1) * G] for name, column in scores.items()})
                  for j, i in enumerate(mine)]
        # every rank gets every group of the round, in batch order (token ids and log-probs too: dynamic
        # sampling may train a group on another rank; limo preset: 64 x 7 x <= 3,072 tokens, ~100 MB)
        groups = sorted((g for part in distributed.all_gather_objects(groups, dist) for g in part),
                        key=lambda g: g.position)
        if round_ == 0:
            batch = groups
        generated += sum(len(c.token_ids) for g in groups for c in g.completions)
        if not cfg.dynamic_sampling:
            break
        for g in groups:
            (with_signal if has_signal(g) else without_signal).append(g)
        if len(with_signal) >= P:
            break
    engine.sleep()  # the update needs the memory; step 5 pushes the new weights
    # the P groups trained on: the batch, or with dynamic sampling the first P with signal, filled up
    # with groups without signal (zero advantage) when the rounds ran out
    trained = (with_signal + without_signal)[:P] if cfg.dynamic_sampling else batch

    # 3. advantages within each group, over the global batch; rank r trains on groups r, r + W, ...
    advantages = group_advantages([r for g in trained for r in g.rewards["total"]], G, cfg.scale_rewards)
    advantages = advantages.view(P, G).tolist()
    # (--mask-truncated: a cut-off completion counted in its group's advantages above, but is not trained:
    # its unfinished answer says nothing about the answer it would have given; DAPO sec. 3.4, TRL
    # trl/trainer/grpo_trainer.py, mask_truncated_completions)
    rollouts = [Rollout(prompt_ids[trained[k].problem], c.token_ids, c.logprobs, a,
                        masked=cfg.mask_truncated and c.finish_reason == "length")
                for k in range(dist.rank, P, W) for c, a in zip(trained[k].completions, advantages[k])]
    counts = {"sampling_rounds": round_ + 1, "generated_tokens": generated,
              "groups_with_signal": sum(map(has_signal, trained)),
              "time/generation": seconds["generation"], "time/reward": seconds["reward"]}
    return rollouts, batch, counts


# ---- step 4: the clipped policy-gradient update


def pack_micro_batch(rollouts: list[Rollout], pad_id: int, device) -> dict:
    """One micro-batch as tensors: rows [B, T]; per completion token (mask, engine log-probs) in
    token_logprobs' layout, [B, T - 1]; one advantage per row, [B, 1]. No rollouts (a rank's share of a
    token budget ran out first): one masked row of pads, so the rank runs its forward and backward."""
    rollouts = rollouts or [Rollout([pad_id], [pad_id], [0.0], 0.0, masked=True)]
    input_ids, completion_mask = sequences.pack([r.prompt_ids for r in rollouts],
                                                [r.completion_ids for r in rollouts], pad_id, device)  # [B, T]
    engine_logp = sequences.pack_logprobs([r.engine_logprobs for r in rollouts],
                                          [len(r.prompt_ids) for r in rollouts], input_ids.shape[1], device)
    trained = torch.tensor([[0.0 if r.masked else 1.0] for r in rollouts], device=device)            # [B, 1]
    mask = completion_mask[:, 1:] * trained                   # the loss tokens: the completion's, unless masked
    return {"input_ids": input_ids, "completion_mask": completion_mask, "mask": mask,
            "engine_logp": engine_logp,
            "advantages": torch.tensor([[r.advantage] for r in rollouts], device=device)}             # [B, 1]


def policy_update(policy, reference, optimizer, scheduler, rollouts: list[Rollout], cfg: Config, dist,
                  pad_id: int) -> dict:
    """Step 4: mu passes over this rank's rollouts, each pass one optimizer step per mini-batch (K =
    --mini-batches slices of whole groups, DeepSeekMath's Algorithm 1): K x mu steps. Losses are normalised
    by counts of the mini-batch over all ranks, so any number of ranks takes the same steps as one process.
    Returns statistics averaged over the optimizer steps and the global batch."""
    K, updates = cfg.mini_batches, cfg.mini_batches * cfg.num_iterations
    size = len(rollouts) // K  # rollouts come in whole groups; main checks that a rank's groups split into K
    minis = []
    for k in range(K):
        # rows of similar length share a micro-batch: less padding to compute (measured: -30% update time).
        # Every normaliser is a global count, so how rows are grouped into micro-batches changes nothing else.
        mini = sorted(rollouts[k * size:(k + 1) * size],
                      key=lambda r: len(r.prompt_ids) + len(r.completion_ids))
        rows = ([mini[i:i + cfg.micro_batch_size] for i in range(0, len(mini), cfg.micro_batch_size)]
                if not cfg.max_tokens_per_micro_batch else  # or as many rows as fit the token budget
                [[mini[i] for i in batch] for batch in sequences.token_budget_micro_batches(
                    [len(r.prompt_ids) + len(r.completion_ids) for r in mini], cfg.max_tokens_per_micro_batch,
                    dist)])
        num_tokens = distributed.all_reduce_sum(sum(len(r.completion_ids) for r in mini if not r.masked),
                                                dist).item()
        minis.append({"micro_batches": [pack_micro_batch(batch, pad_id, dist.device) for batch in rows],
                      "num_sequences": distributed.all_reduce_sum(len(mini), dist).item(),
                      # every completion masked (--mask-truncated): a zero loss, not 0 / 0
                      "num_tokens": max(num_tokens, 1)})
    logprobs = lambda model, mb, **kw: token_logprobs(model, mb["input_ids"], mb["completion_mask"],
                                                      cfg.temperature, cfg.logprob_chunk_size, **kw)
    # pi_old (needed only when there is more than one optimizer step) and pi_ref, before any update, under
    # the autocast pi runs under: at the first pass pi = pi_old exactly, so the ratio must come out exactly 1
    with torch.no_grad(), fsdp.autocast(dist, cfg.bf16):
        for mb in (mb for mini in minis for mb in mini["micro_batches"]):
            mb["old_logp"] = logprobs(policy, mb)[0] if updates > 1 else None
            mb["ref_logp"] = None
            if reference is not None:
                with lora.adapters_disabled(reference):  # LoRA: the reference is the policy, adapters off
                    mb["ref_logp"] = logprobs(reference, mb)[0]
    fsdp.reshard(reference)  # a frozen model has no backward to free its gathered root
    policy.train()
    sums = dict.fromkeys(("loss", "clip", "kl", "entropy", "gap"), 0.0)
    gap_max = torch.zeros((), device=dist.device)
    for iteration in range(cfg.num_iterations):
        for mini in minis:
            num_sequences, num_tokens = mini["num_sequences"], mini["num_tokens"]
            for mb in mini["micro_batches"]:
                with fsdp.autocast(dist, cfg.bf16):
                    logp, entropy = logprobs(policy, mb, with_entropy=iteration == 0)      # [B, T - 1]
                # pi_old: with one optimizer step the sampling policy is the current one, so rho =
                # exp(logp - logp.detach()) is exactly 1 and the gradient is the plain policy gradient.
                old_logp = mb["old_logp"] if mb["old_logp"] is not None else logp.detach()
                objective, clipped = clipped_objective(logp, old_logp, mb["advantages"], cfg.epsilon_low,
                                                       cfg.epsilon_high)
                if cfg.tis_cap > 0:  # engine/trainer mismatch: weight each token by min(pi_old / pi_engine, C)
                    objective = objective * torch.exp(old_logp - mb["engine_logp"]).clamp(max=cfg.tis_cap)
                kl = k3_kl(logp, mb["ref_logp"]) if reference is not None else torch.zeros_like(logp)
                per_token = -objective + cfg.beta * kl                                     # L_t
                loss = aggregate_loss(per_token, mb["mask"], cfg.loss_type, num_sequences, num_tokens,
                                      cfg.max_completion_length)
                (loss * dist.world_size).backward()  # FSDP averages gradients over ranks; the loss is global

                # ---- bookkeeping: this micro-batch's share of the averages over steps and the global batch
                token_mean = lambda x: (x.detach() * mb["mask"]).sum().item() / num_tokens
                sums["loss"] += loss.item() / updates
                sums["clip"] += token_mean(clipped) / updates
                sums["kl"] += token_mean(kl) / updates
                if iteration == 0:
                    gap = (logp.detach() - mb["engine_logp"]).abs() * mb["mask"]  # engine vs trainer (stale?)
                    sums["entropy"] += token_mean(entropy) / K
                    sums["gap"] += token_mean(gap) / K
                    gap_max = torch.maximum(gap_max, gap.max())
            grad_norm = fsdp.clip_grad_norm(policy, cfg.grad_clip)
            fsdp.stop_if_not_finite({"gradient norm": grad_norm}, scheduler.last_epoch + 1, dist)  # NaN guard
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    stats = {name: distributed.all_reduce_sum(value, dist).item() for name, value in sums.items()}
    fsdp.stop_if_not_finite({"loss": stats["loss"]}, scheduler.last_epoch, dist)
    return {"loss": stats["loss"], "clip_frac": stats["clip"], "kl": stats["kl"], "entropy": stats["entropy"],
            "grad_norm": grad_norm,  # of the last optimizer step
            "logprob_gap_mean": stats["gap"],
            "logprob_gap_max": distributed.all_reduce_max(gap_max, dist).item()}


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
    G = cfg.num_generations
    if G < 2 or cfg.prompts_per_step % dist.world_size:
        raise SystemExit(f"error: need --num-generations >= 2 and --prompts-per-step divisible by "
                         f"{dist.world_size} ranks")
    if (cfg.prompts_per_step // dist.world_size) % cfg.mini_batches:  # a slice holds whole groups
        raise SystemExit(f"error: --mini-batches {cfg.mini_batches} must divide the groups each rank trains "
                         f"on: --prompts-per-step {cfg.prompts_per_step} / {dist.world_size} ranks = "
                         f"{cfg.prompts_per_step // dist.world_size}")
    longest = cfg.max_prompt_length + cfg.max_completion_length  # the longest row a micro-batch may get
    if 0 < cfg.max_tokens_per_micro_batch < longest:
        raise SystemExit(f"error: --max-tokens-per-micro-batch {cfg.max_tokens_per_micro_batch} is less than "
                         f"the longest row, --max-prompt-length + --max-completion-length = {longest}")
    if cfg.tis_cap > 0 and cfg.top_p < 1:  # the engine's log-probs are then of the nucleus, not of pi
        raise SystemExit("error: --tis-cap needs --top-p 1 (with top-p < 1 the engine's log-probs are "
                         "renormalised over the nucleus, so pi_old / pi_engine would not measure staleness)")
    memplan.report("grpo", cfg, dist)  # every flag is checked: the budget, before anything loads

    # ---- data first: a bad file fails in seconds, before any model loads
    problems = data.load_problems(cfg.data, split="train", seed=cfg.seed)
    checkpoint = checkpoints.latest_checkpoint(cfg.output_dir)
    if cfg.model == "tiny":
        raise SystemExit("error: GRPO starts from a trained policy; pass --model <sft output dir>")
    models.check_model_path(cfg.model)
    lora_alpha, targets = lora.checked_flags(cfg, checkpoint)  # against the model's config; no weights yet
    tokenizer = models.load_tokenizer(cfg.model)
    problems, prompts, prompt_ids = data.prepare_prompts(problems, tokenizer, cfg.template,
                                                         cfg.max_prompt_length, dist, "grpo")

    # ---- models: the policy (from the newest checkpoint when resuming), the frozen reference. With LoRA
    # the policy is the base model plus adapters (a checkpoint holds the adapters only) and the reference
    # is the same model with its adapters off: no second copy in memory.
    policy_path = str(checkpoint) if checkpoint and not cfg.lora_rank else cfg.model
    context = dict(rope_theta=cfg.rope_theta, max_positions=cfg.max_position_embeddings)  # overrides, if any
    policy = models.load_model(policy_path, **context)
    if cfg.lora_rank:  # before sharding: every rank wraps the whole model alike (A from its own seed)
        lora.apply_lora(policy, cfg.lora_rank, lora_alpha, targets, cfg.lora_dropout, seed=cfg.seed)
    policy = fsdp.shard_model(policy, dist, cfg.bf16, cfg.gradient_checkpointing)
    reference = None if cfg.beta == 0 else policy if cfg.lora_rank else \
        fsdp.load_reference(cfg.model, dist, cfg.bf16, **context)
    distributed.seed_per_rank(cfg.seed, dist)  # models alike on all ranks, sampling differs per rank
    trained = lora.trainable_parameters(policy) if cfg.lora_rank else policy.parameters()
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2))
    optimizer_steps = cfg.max_steps * cfg.mini_batches * cfg.num_iterations  # K x mu a step
    scheduler = fsdp.lr_schedule(optimizer, cfg.lr_schedule, optimizer_steps, cfg.warmup_ratio,
                                 cfg.min_lr_ratio)
    start_step = 0
    if checkpoint is not None:
        state = checkpoints.load_trainer_state(checkpoint)
        if cfg.lora_rank:
            lora.load_adapter(policy, checkpoint / "adapter")  # each rank copies in its shard of A and B
        start_step = checkpoints.restore_checkpoint(state, {"policy": (policy, optimizer)},
                                                    {"policy": scheduler}, dist, seed=cfg.seed)["step"]
        if dist.is_main:
            print(f"grpo: resumed from {checkpoint} at step {start_step}")
    logs.truncate_logs(cfg.output_dir, start_step, dist)  # lines of steps that will be redone go
    engine = trainer_engine(cfg, policy, tokenizer, policy_path, dist)
    if cfg.lora_rank and checkpoint is not None:  # the engine loaded the base: give it the resumed adapters
        engine.push_weights(policy)
    logger = logs.MetricsLogger(cfg.output_dir, cfg.report_to, asdict(cfg), dist)
    grader = Grader(num_workers=cfg.grader_workers)
    if dist.is_main:
        print(f"grpo: {len(problems)} prompts, {cfg.prompts_per_step} x {G} completions per step, "
              f"{dist.world_size} rank(s), engine {cfg.engine}, rewards {reward_weights}")

    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                    disable=not dist.is_main, desc="grpo")
    for step in progress:
        # 1-3. sample, score, group-relative advantages
        policy.eval()  # dropout off (Qwen2 has none, but a forked model might) for sampling and pi_old/pi_ref
        rollouts, batch, counts = rollout(step, engine, problems, prompts, prompt_ids, reward_weights, grader,
                                          cosine, cfg, dist)
        t1 = time.time()
        # 4. mu passes of clipped policy-gradient updates over this batch
        stats = policy_update(policy, reference, optimizer, scheduler, rollouts, cfg, dist,
                              tokenizer.pad_token_id)
        # 5. the engine samples the next batch with these weights
        engine.push_weights(policy)
        t2 = time.time()

        # ---- LIM's trajectories (what lim.py scores), metrics, completions, checkpoint
        lim.write_trajectories(cfg.output_dir, step, batch, problems, dist)
        metrics = logs.rollout_metrics(step, batch, reward_weights, cfg.prompts_per_step, len(problems))
        logs.write_completions(cfg.output_dir, step, batch, problems, prompts, cfg.log_completions_steps,
                               dist)
        metrics |= {**stats, **counts, "lr": scheduler.get_last_lr()[0], "time/update": t2 - t1,
                    "tokens_per_s": counts["generated_tokens"] / counts["time/generation"]}
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.3f}")
        if (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            checkpoints.save_checkpoint(cfg.output_dir, step + 1, policy, tokenizer,
                                        {"policy": (policy, optimizer)}, {"policy": scheduler},
                                        {"step": step + 1}, dist, save_total_limit=cfg.save_total_limit)

    grader.close()
    checkpoints.finish(cfg.output_dir, policy, tokenizer, dist)
    if dist.is_main:
        print(f"grpo: final model in {cfg.output_dir}")
    engine.close()  # vLLM's teardown needs the process group that distributed.shutdown destroys
    distributed.shutdown(dist)


# ---- presets: the papers' settings, each value beside its source

PRESETS = {
    # The CPU demo: start from the tiny SFT model (sft.py --preset tiny) and improve it on `linear`.
    # Measured: lr 1e-4 to 1e-3 with 16 prompts per step made it worse (Adam turns noisy policy
    # gradients into full-size steps); 32 prompts per step at 5e-5 improved it. loss_type, adam_beta2,
    # weight_decay, seed and lr_schedule are the values its results were measured with (the defaults then).
    "tiny": dict(data="linear", template="plain", max_steps=80, prompts_per_step=32, num_generations=8,
                 micro_batch_size=32, temperature=1.0, max_prompt_length=128, max_completion_length=192,
                 rewards="accuracy:1", lr=5e-5, warmup_ratio=0.0, min_lr_ratio=1.0, beta=0.0, bf16=False,
                 gradient_checkpointing=False, engine="hf", grader_workers=1, save_steps=20,
                 log_completions_steps=10, loss_type="grpo", adam_beta2=0.99, weight_decay=0.0, seed=0,
                 lr_schedule="mathrl"),
    # Open-RS (Dang & Ngo 2025): knoveleng/open-rs recipes/grpo.yaml ("yaml:N"), launched on 3 training GPUs
    # (the 4th serves vLLM, README.md:82-88). Released models: Exp. 1 at step 100, Exps. 2 and 3 at step 50
    # (logs/overall/); Exp. 3 adds --cosine-max-len 3584 (README.md:91-98). Their pinned TRL (setup.py:70,
    # trl@69ad852) differs in ways kept as documented deviations: its log-probs ignore the temperature
    # (grpo_trainer.py _get_per_token_logps), its loss is a token mean per micro-batch of 6 completions
    # (compute_loss) averaged over 4 accumulations x 3 GPUs, of which dapo (the step's token mean) is the
    # nearest.
    "open-rs": dict(
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", data="open-rs",  # yaml:2, yaml:8
        template="r1",  # the system prompt of yaml:9, in R1-Distill's chat template
        prompts_per_step=12, num_generations=6,  # 6/GPU (yaml:42) x 4 accum. (yaml:19) x 3 GPUs / 6 (yaml:37)
        micro_batch_size=6, max_steps=500, save_steps=50, seed=42,  # yaml:42, 36, 53, 54
        temperature=0.7, top_p=1.0,  # yaml:55; trl@69ad852 gives vLLM no top_p
        max_prompt_length=512, max_completion_length=3584,  # yaml:34-35
        rewards="format:1,cosine:2",  # yaml:46-51
        cosine_max_len=1000, cosine_unit="chars",  # open_r1/grpo.py:92-95, rewards.py:321
        cosine_clamp=False,  # rewards.py:324
        cosine_correct="1.0:0.5", cosine_wrong="0.0:-0.5",  # open_r1/grpo.py:76-91
        lr=1e-6, warmup_ratio=0.1, min_lr_ratio=0.1,  # yaml:25, 56, 31-33
        # TRL's GRPOTrainer is a transformers Trainer (4.49.0, setup.py:69): create_scheduler builds
        # get_scheduler("cosine_with_min_lr" (yaml:31), min_lr_rate 0.1 (yaml:33)) with warm-up
        # get_warmup_steps = ceil(0.1 x 500) = 50 steps: lr 0 at the first step
        lr_schedule="transformers",
        beta=0.04, epsilon_low=0.2, epsilon_high=0.2, num_iterations=1,  # trl@69ad852 grpo_config.py:234-246
        scale_rewards="group", loss_type="dapo",  # group std + 1e-4 as TRL; dapo: see above
        weight_decay=0.0, grad_clip=1.0, adam_beta2=0.999,  # transformers TrainingArguments defaults
                                                           # (the yaml sets none of them)
        bf16=True, gradient_checkpointing=True,  # yaml:12, 20
        # OURS, vLLM colocated on each of 3 GPUs (mathrl/memplan.py): training keeps 14 B x 1.78B / 3
        # = 7.7 GiB (fp32 weights + Adam, bf16 reference); vLLM's 0.2 of 80 GiB = 16 GiB holds bf16
        # weights 3.3 GiB, ~2 GiB activations and 10.7 GiB of KV cache = 98 sequences of 4096 tokens
        # at 28 KiB each, for the 24 per GPU (on the paper's 48 GB A40s 3.6 GiB, 32 sequences).
        # 4096 tokens per pass: the 4 prompts of a GPU (<= 512 tokens) in one pass.
        vllm_gpu_memory_utilization=0.2, vllm_max_num_batched_tokens=4096),
    # The Qwen-baselines study (rqzhangberkeley/efficient-reasoning): GRPO through open-r1's trainer on the
    # 817 LIMO problems from Qwen2.5-Math-1.5B, on 7 GPUs + 1 for vLLM. Its README.md:64 and "Baseline" run
    # grpo_limo.sh:85 (lr wd G seed per-GPU accum. beta clip samples epochs), else its
    # recipes/Qwen2.5-Math-1.5B/grpo/config_simple_rl.yaml ("yaml:N"). OURS marks our own choices.
    "limo": dict(
        model="Qwen/Qwen2.5-Math-1.5B", data="limo",  # grpo_limo.sh:54-55
        template="question",  # user turn "Question: {problem}" only (RL/grpo.py:262-266); Qwen2.5-Math's
                              # chat template adds its default system prompt
        prompts_per_step=64, num_generations=7,  # README.md:64 (7 GPUs x 8 x 8 accum. / G 7)
        max_steps=36, save_steps=12,  # 3 epochs x 12 steps (README.md:64); save each epoch (yaml:59)
        micro_batch_size=8, seed=1001,  # grpo_limo.sh:85
        lr=5e-6, warmup_ratio=0.1, min_lr_ratio=0.0,  # README.md:64; cosine to 0 (yaml:36), yaml:61
        # their trainer is a transformers Trainer (RL/grpo_trainer.py:151; 4.46.3, requirements.txt:19):
        # get_scheduler("cosine" (grpo_limo.sh:65)) over 36 steps, ceil(0.1 x 36) = 4 warm-up steps
        lr_schedule="transformers",
        weight_decay=0.1, grad_clip=1.0, beta=0.005,  # README.md:64, grpo_limo.sh:85
        adam_beta2=0.999,  # their TRL's TrainingArguments default (the yaml does not set it)
        epsilon_low=0.2, epsilon_high=0.2, num_iterations=1,  # their TRL's defaults
        temperature=0.6, top_p=1.0,  # yaml:49; RL/grpo_trainer.py:486-490 gives vLLM no top_p
        rewards="accuracy:1",  # RL/grpo.py:332-333, yaml:55-58
        scale_rewards="group", loss_type="dapo",  # per-micro-batch token mean, RL/grpo_trainer.py:998
        max_prompt_length=1024, max_completion_length=3072,  # OURS: yaml:34, 38 ask 2048 and 32874, but the
                                                             # model has 4,096 positions, where vLLM stops
        bf16=True, gradient_checkpointing=True,  # yaml:16, 25
        # OURS, vLLM colocated on each of 8 GPUs (mathrl/memplan.py): training keeps 14 B x 1.54B / 8
        # = 2.5 GiB (fp32 weights + Adam, bf16 reference); vLLM's 0.2 of 80 GiB = 16 GiB holds bf16
        # weights 2.9 GiB, ~2 GiB activations and 11.1 GiB of KV cache = 101 sequences of 4096 tokens
        # at 28 KiB each, for the 8 x 7 = 56 per GPU. 8192 tokens per pass: a GPU's 8 prompts
        # (<= 1024 tokens) in one pass, activations ~0.4 GiB.
        vllm_gpu_memory_utilization=0.2, vllm_max_num_batched_tokens=8192),
}


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
