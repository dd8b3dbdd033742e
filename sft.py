"""Supervised fine-tuning on (prompt, worked solution): the baseline RL is compared against.

    python sft.py --preset tiny --output-dir runs/sft-tiny             # CPU: tiny model, `linear`
    torchrun --nproc_per_node 8 sft.py --preset limo --output-dir runs/limo-sft

The loss is next-token cross-entropy on the response tokens only (the prompt is context, not
target), summed over tokens and divided by the number of response tokens in the whole global
batch, so every token weighs the same whatever rank or micro-batch it lands on (LIMO, s1).
"""
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import data
from mathrl import checkpoints, distributed, flags, fsdp, logs, lora, memplan, models, sequences
from mathrl.flags import COUNT, FRACTION, NON_NEGATIVE, flag

TEMPLATES = data.TEMPLATES  # inside Config, `data` is the --data field


@dataclass
class Config(flags.TrainFlags):
    # The defaults are one recipe, the limo preset's (LIMO's SFT, 8 GPUs; its sources are cited in PRESETS
    # below, tests/test_fidelity.py checks the two agree): `sft.py --data limo` is `sft.py --preset limo`.
    # The CPU run is --preset tiny.
    model: str = flag("Qwen/Qwen2.5-7B-Instruct", "hub id, local folder, .gguf file, or `tiny` (a fresh "
                                                  "~1M-parameter Qwen2 model with a character tokenizer)")
    data: str = flag("limo", "data spec for data.load_problems: a name (limo, linear, ...), a local file, "
                             "name=path, or a mixture a:N,b; the problems only: --preset NAME sets a whole "
                             "recipe")
    template: str = flag("qwen-math", "prompt template (data.format_prompt): " + ", ".join(TEMPLATES),
                         TEMPLATES)
    output_dir: str = flag("runs/sft", "checkpoints, metrics.jsonl, final model")
    max_steps: int = flag(192, "optimizer steps", **COUNT)
    batch_size: int = flag(64, "global batch (examples per optimizer step, all ranks)", **COUNT)
    micro_batch_size: int = flag(1, "examples per forward pass on one rank", **COUNT)
    max_length: int = flag(16384, "prompt+response tokens; longer examples are cut", **COUNT)
    lr: float = flag(5e-6, "peak learning rate (AdamW)", **NON_NEGATIVE)
    warmup_ratio: float = flag(0.0, "fraction of steps with linear warm-up (--lr-schedule counts them)",
                               **FRACTION)
    min_lr_ratio: float = flag(0.0, "cosine decays to lr * this", **FRACTION)
    weight_decay: float = flag(0.0, "AdamW weight decay", **NON_NEGATIVE)
    adam_beta2: float = flag(0.999, "AdamW beta2 (beta1 is 0.9; 0.999 is the transformers Trainer's: "
                                    "LLaMA-Factory, LIMO)", **FRACTION)
    grad_clip: float = flag(1.0, "max gradient norm (0: no clipping)", **NON_NEGATIVE)
    save_steps: int = flag(50, "write output-dir/checkpoint-N every N steps", **COUNT)
    log_steps: int = flag(10, "console line every N steps (metrics.jsonl: every step)", **COUNT)
    seed: int = flag(0, "data order, initialisation", low=0, high=2 ** 32 - 1)  # numpy's seed range


# ---- the loss on (prompt, solution) rows


def tokenize_examples(problems, tokenizer, template: str, max_length: int):
    """Each example: prompt ids + response ids (solution, then EOS); labels only on the response."""
    examples, truncated = [], 0
    for problem in problems:
        prompt = data.format_prompt(problem["prompt"], tokenizer, template)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = (tokenizer(problem["solution"], add_special_tokens=False)["input_ids"]
                        + [tokenizer.eos_token_id])
        ids = (prompt_ids + response_ids)[:max_length]
        truncated += len(prompt_ids) + len(response_ids) > max_length
        labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        examples.append((ids, labels))
    return examples, truncated


def collate(examples, pad_id: int, device):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    # right padding: no attention mask needed (see sequences.pack)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
    return input_ids.to(device), labels.to(device)


def log_softmax_at(logits, next_tokens):
    """log p(next token) from [n, V] fp32 logits (sequences.next_token_scores runs it chunk by chunk)."""
    return logits.gather(-1, next_tokens[:, None]).squeeze(-1) - logits.logsumexp(-1), None


def main(argv=None):
    cfg = flags.parse_args(Config, PRESETS, argv, description=__doc__.split("\n\n")[0])
    dist = distributed.init_distributed(cfg.dist_timeout_minutes)
    distributed.seed_everything(cfg.seed)
    if 0 < cfg.max_tokens_per_micro_batch < cfg.max_length:
        raise SystemExit(f"error: --max-tokens-per-micro-batch {cfg.max_tokens_per_micro_batch} is less than "
                         f"the longest example, --max-length {cfg.max_length}")
    memplan.report("sft", cfg, dist)  # the budget, before anything loads

    # ---- data first: a bad file fails here in seconds, before any model is loaded
    problems = data.load_problems(cfg.data, split="train", seed=cfg.seed)
    missing = [p["id"] for p in problems if not p["solution"].strip()]
    if missing:
        raise SystemExit(f"error: SFT needs worked solutions; {len(missing)} of {len(problems)} rows of "
                         f"{cfg.data!r} have none (first: {missing[0]})")
    if cfg.batch_size % dist.world_size:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} must divide evenly over {dist.world_size} "
                         f"ranks")

    # ---- LoRA's flags against the model's architecture (its config only, no weights yet)
    if cfg.lora_rank:
        try:
            if cfg.model == "tiny":
                with torch.device("meta"):  # the architecture only, no weights
                    architecture = models.build_tiny_model(seed=cfg.seed)[0].config
            else:
                models.check_model_path(cfg.model)
                from transformers import AutoConfig
                architecture = AutoConfig.from_pretrained(cfg.model)
            lora_alpha, targets = lora.settings(cfg, architecture)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None

    # ---- the tokenizer and the examples, then the model:
    # the newest complete checkpoint, else the starting model. A LoRA checkpoint holds the adapters
    # only: the frozen base is the starting model again, the adapters are loaded into it below.
    checkpoint = checkpoints.latest_checkpoint(cfg.output_dir)
    lora.check_checkpoint_kind(checkpoint, cfg.lora_rank)
    start = str(checkpoint) if checkpoint is not None and not cfg.lora_rank else cfg.model
    if start != "tiny":
        models.check_model_path(start)
    tokenizer = models.build_tiny_tokenizer() if start == "tiny" else models.load_tokenizer(start)
    try:
        examples, num_truncated = tokenize_examples(problems, tokenizer, cfg.template, cfg.max_length)
    except ValueError as error:  # qwen-math on a tokenizer without a chat template
        raise SystemExit(f"error: --template {cfg.template}: {error}") from None
    if not any(label != -100 for _, labels in examples for label in labels[1:]):
        raise SystemExit(f"error: --max-length {cfg.max_length} cuts off every response: nothing to learn")
    if start == "tiny" and (cfg.rope_theta or cfg.max_position_embeddings):
        raise SystemExit("error: --rope-theta / --max-position-embeddings need a model folder, not tiny")
    model = models.build_tiny_model(seed=cfg.seed)[0] if start == "tiny" else models.load_model(
        start, rope_theta=cfg.rope_theta, max_positions=cfg.max_position_embeddings)
    if cfg.lora_rank:  # before sharding: every rank wraps the whole model alike (A from its own seed)
        lora.apply_lora(model, cfg.lora_rank, lora_alpha, targets, cfg.lora_dropout, seed=cfg.seed)
    if dist.is_main:
        print(f"sft: {len(examples)} examples from {cfg.data!r} "
              f"({num_truncated} cut at {cfg.max_length} tokens), "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M trained), "
              f"{dist.world_size} rank(s)")

    model = fsdp.shard_model(model, dist, cfg.bf16, cfg.gradient_checkpointing)
    trained = lora.trainable_parameters(model) if cfg.lora_rank else model.parameters()  # the shards
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, cfg.adam_beta2))
    scheduler = fsdp.lr_schedule(optimizer, cfg.lr_schedule, cfg.max_steps, cfg.warmup_ratio,
                                 cfg.min_lr_ratio)
    start_step = 0
    if checkpoint is not None:
        state = checkpoints.load_trainer_state(checkpoint)
        if cfg.lora_rank:
            lora.load_adapter(model, checkpoint / "adapter")  # each rank copies in its shard of A and B
        start_step = checkpoints.restore_checkpoint(state, {"model": (model, optimizer)},
                                                    {"model": scheduler}, dist, seed=cfg.seed)["step"]
        if dist.is_main:
            print(f"sft: resumed from {checkpoint} at step {start_step}")
    logs.truncate_logs(cfg.output_dir, start_step, dist)  # lines of steps that will be redone go
    logger = logs.MetricsLogger(cfg.output_dir, cfg.report_to, asdict(cfg), dist)

    # ---- the loop
    model.train()
    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                    disable=not dist.is_main, desc="sft")
    for step in progress:
        started = time.time()
        indices = sequences.batch_indices(step, cfg.batch_size, len(examples), cfg.seed)
        mine = indices[dist.rank::dist.world_size]  # this rank's share of the global batch
        micro_batches = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        if cfg.max_tokens_per_micro_batch:  # or as many examples as fit the budget, as many on every rank
            micro_batches = [[mine[i] for i in batch] for batch in sequences.token_budget_micro_batches(
                [len(examples[i][0]) for i in mine], cfg.max_tokens_per_micro_batch, dist)]

        # loss = sum of response-token NLL / response tokens in the global batch. FSDP averages
        # gradients over ranks, so each rank scales by world_size to turn that mean back into a sum.
        local_tokens = sum(sum(label != -100 for label in examples[i][1][1:]) for i in mine)
        global_tokens = distributed.all_reduce_sum(local_tokens, dist).item()
        loss_sum = torch.zeros((), device=dist.device)
        for index, micro in enumerate(micro_batches):
            # (an empty micro-batch, a rank's share of a token budget run out: one row of pads, no label)
            rows = [examples[i] for i in micro] or [([tokenizer.pad_token_id] * 2, [-100] * 2)]
            input_ids, labels = collate(rows, tokenizer.pad_token_id, dist.device)
            with fsdp.autocast(dist, cfg.bf16):  # log p(x_t+1 | x_<=t): position t scores token t + 1
                logp, _ = sequences.next_token_scores(model, input_ids, log_softmax_at,
                                                      cfg.logprob_chunk_size)
            token_nll = -(logp * (labels[:, 1:] != -100)).sum()     # the response tokens' NLL
            (token_nll / global_tokens * dist.world_size).backward()
            loss_sum += token_nll.detach()
        grad_norm = fsdp.clip_grad_norm(model, cfg.grad_clip)
        fsdp.stop_if_not_finite({"gradient norm": grad_norm}, step + 1, dist)  # NaN guard: before the step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss = distributed.all_reduce_sum(loss_sum.double(), dist).item() / global_tokens
        fsdp.stop_if_not_finite({"loss": loss}, step + 1, dist)
        seconds = time.time() - started
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": global_tokens / seconds, "step_s": seconds,
                   "epoch": (step + 1) * cfg.batch_size / len(examples)}
        logger.log(step + 1, metrics)
        if dist.is_main and ((step + 1) % cfg.log_steps == 0 or step == start_step):
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}")
        if (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.max_steps:
            checkpoints.save_checkpoint(cfg.output_dir, step + 1, model, tokenizer,
                                        {"model": (model, optimizer)}, {"model": scheduler},
                                        {"step": step + 1}, dist, save_total_limit=cfg.save_total_limit)

    checkpoints.finish(cfg.output_dir, model, tokenizer, dist)
    if dist.is_main:
        print(f"sft: final model in {cfg.output_dir}")
    distributed.shutdown(dist)


# ---- presets: the papers' settings, each value beside its source

PRESETS = {
    # The CPU run: a tiny model from scratch learns to solve linear systems in a few minutes. min_lr_ratio,
    # adam_beta2 and lr_schedule are the values its results were measured with (the defaults then).
    "tiny": dict(model="tiny", data="linear", template="plain", max_steps=1200, batch_size=32,
                 micro_batch_size=32, max_length=512, lr=3e-3, warmup_ratio=0.05, save_steps=200,
                 bf16=False, gradient_checkpointing=False, min_lr_ratio=0.1, adam_beta2=0.95,
                 lr_schedule="mathrl"),
    # LIMO (Ye et al. 2025): GAIR-NLP/LIMO train/examples/train_limo.yaml ("yaml:N"), LLaMA-Factory full
    # fine-tuning: lr 5e-6 (yaml:28), cosine to 0 (yaml:30), no warm-up (yaml:31), 15 epochs (yaml:29),
    # 16,384-token cutoff (yaml:13), bf16 (yaml:32), the Qwen chat template (yaml:16) with the system prompt
    # of README.md:95-98 (our qwen-math). Batch 64 is the paper's: the yaml has 1 per GPU and no
    # accumulation (yaml:26-27), so there the batch is the GPU count. 192 steps of 64 = 15 epochs of examples
    # (yaml:29); LLaMA-Factory's epochs of ceil(817 / 64) = 13 batches would make 195 steps.
    # Model: OURS. LIMO tuned Qwen2.5-32B-Instruct (yaml:2) with DeepSpeed ZeRO-3 (yaml:8) on several nodes
    # (README.md:198-206); Qwen2.5-7B-Instruct is the same family and chat template with a 32k context, at
    # the 7B-on-8-GPUs scale this project is written for. LIMR's SFT-vs-RL comparison used LIMO's data on
    # Qwen2.5-Math-7B (--model Qwen/Qwen2.5-Math-7B; its 4,096 positions are below LIMO's cutoff).
    "limo": dict(model="Qwen/Qwen2.5-7B-Instruct", data="limo", template="qwen-math", max_steps=192,
                 batch_size=64, micro_batch_size=1, max_length=16384, lr=5e-6, warmup_ratio=0.0,
                 min_lr_ratio=0.0, bf16=True, gradient_checkpointing=True, save_steps=50,
                 # LLaMA-Factory runs the transformers Trainer: its AdamW default (yaml sets none)
                 adam_beta2=0.999,
                 # and its scheduler (train/src/llamafactory/train/sft/trainer.py:78-82 -> Trainer.
                 # create_scheduler; transformers <= 4.48.2, train/requirements.txt:2): get_scheduler(
                 # "cosine" (yaml:30)), ceil(0.0 x 192) = 0 warm-up steps (yaml:31)
                 lr_schedule="transformers"),
    # The GRPO-vs-SFT study (experiments/ood.py's source: Qwen2.5-1.5B-Instruct on linear equations, GSM8K
    # 55.19 -> 0.73 after SFT): its code was not found (searched 2026-12-07 for the model, the task and the
    # GSM8K numbers), so only the model, the task and "LoRA with Unsloth's defaults" are its own.
    # LoRA: Unsloth's notebooks' FastLanguageModel.get_peft_model cell, r = 16, lora_alpha = 16,
    # lora_dropout = 0, target_modules the 7 projections q,k,v,o,gate,up,down (as quoted in public
    # copies of those notebooks; the study's own cell unseen). Everything else is UNKNOWN: the limo
    # defaults stand (steps, batch, length, lr: 5e-6 is a full fine-tuning rate; Unsloth's notebooks' 2e-4
    # is from memory, not a source seen); the template, Qwen's chat template with qwen-math's system
    # prompt, is OURS.
    "grpo-vs-sft-lora": dict(model="Qwen/Qwen2.5-1.5B-Instruct", data="linear", template="qwen-math",
                             lora_rank=16, lora_alpha=16.0, lora_dropout=0.0,
                             lora_targets="q,k,v,o,gate,up,down"),
}


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
