"""FSDP2 and optimisation: shard each decoder layer, then the root. Parameters stay fp32 (the optimizer's
master copy); on GPU the forward and backward run in bf16 with fp32 gradient reduction. One process
runs the same model under autocast instead. Also: the frozen reference policy, gradient clipping, the
NaN guard, and the learning-rate schedule.
"""
import math
import types

import torch

from mathrl import sequences
from mathrl.distributed import Dist, stop
from mathrl.models import load_model


def shard_model(model, dist: Dist, bf16: bool, gradient_checkpointing: bool):
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(dist.device)
    if not dist.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # Gradient accumulation keeps FSDP2's default: each micro-batch's backward reduce-scatters its
    # gradients, so a rank only ever holds its shard of them (fp32, 4 bytes x parameters / ranks).
    # Skipping the sync until the last micro-batch (set_requires_gradient_sync(False)) would hold every
    # gradient unsharded in fp32 meanwhile: 28 GiB per rank for a 7B model.
    #
    # next_token_scores runs the decoder and lm_head itself rather than model.forward; registering it
    # makes FSDP gather the root's parameters (embeddings, final norm, lm_head) around it as around forward.
    model.next_token_scores = types.MethodType(sequences.model_next_token_scores, model)
    register_fsdp_forward_method(model, "next_token_scores")
    return model


def load_reference(name_or_path: str, dist: Dist, bf16: bool, **overrides):
    """The frozen reference policy pi_ref, sharded like the policy. No optimizer needs fp32 master weights,
    so it is bf16 under FSDP with bf16 (see frozen_dtype)."""
    reference = load_model(name_or_path, dtype=frozen_dtype(dist, bf16), **overrides)  # models.load_model
    reference = shard_model(reference, dist, bf16, False).eval()
    return reference.requires_grad_(False)


def reshard(*models) -> None:
    """Free what FSDP2 gathered for no-grad forwards. FSDP2 leaves the root's parameters (embeddings,
    final norm, lm_head) gathered after a forward, to be resharded in backward (torch fsdp
    _fully_shard/_fsdp_state.py:203-207 sets the root's post-forward mesh info to None), and a frozen model
    never runs backward: at 7B its full root (~2 GiB) would stay on every rank for the whole run."""
    for model in models:
        if model is not None and hasattr(model, "reshard"):  # one process: nothing is sharded
            model.reshard()


def unsharded_parameters(model) -> list[str]:
    """The names of model's parameters FSDP2 holds gathered now (none once it has resharded)."""
    from torch.distributed.tensor import DTensor

    return [name for name, p in model.named_parameters() if not isinstance(p, DTensor)]


def frozen_dtype(dist: Dist, bf16: bool) -> torch.dtype:
    """The dtype of a frozen model (the reference): bf16 under FSDP with bf16, where the policy computes
    from bf16 copies of its weights too; one process runs pi's fp32 weights under autocast, and a bf16
    reference would differ from pi at step 0 (the residual stream stays fp32 under autocast)."""
    return torch.bfloat16 if bf16 and dist.enabled else torch.float32


def autocast(dist: Dist, bf16: bool):
    """Single-process runs have no FSDP mixed-precision policy: autocast does the same job."""
    enabled = bf16 and not dist.enabled
    return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16, enabled=enabled)


def clip_grad_norm(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def stop_if_not_finite(values: dict, optimizer_step: int, dist: Dist):
    """The NaN guard: a non-finite gradient norm stops the run with one line before the optimizer
    applies it; a non-finite loss (known after the step) stops it before anything more is saved. So no
    checkpoint or final model ever holds NaN or inf weights. Pass only values that are the same on every
    rank (gradient norms, all-reduced losses): then every rank stops at the same point, rank 0 says why."""
    bad = ", ".join(f"{name} is {value}" for name, value in values.items() if not math.isfinite(value))
    if bad:
        stop(f"error: {bad} at optimizer step {optimizer_step}: stopped, nothing more saved (checkpoints "
              f"already written hold finite weights); is the learning rate too high?", dist)


# The learning-rate schedule, two ways of counting the same shape (a linear warm-up, then a cosine from
# lr down to min_lr_ratio x lr):
#   transformers  transformers' own scheduler, built as the papers' trainers build it (TRL and open-r1
#                 through Trainer.create_scheduler, OpenRLHF in ppo_actor.py, LLaMA-Factory through the
#                 Trainer): lr 0 at the first optimizer step, step / warmup, and ceil(ratio x steps)
#                 warm-up steps (TrainingArguments.get_warmup_steps). The named presets use it.
#   mathrl        cosine_schedule below: (step + 1) / warmup over round(ratio x steps) steps, so the first
#                 step already moves. Kept for the tiny presets, whose CPU results it produced.


def lr_schedule(optimizer, schedule: str, steps: int, warmup_ratio: float, min_lr_ratio: float,
                warmup_steps: int = 0):
    """The scheduler of `steps` optimizer steps; warmup_steps > 0 replaces ceil(warmup_ratio x steps), as
    OpenRLHF's --lr_warmup_steps does (transformers only). Either is a LambdaLR, whose state_dict the
    checkpoints keep: a resumed run continues the same schedule."""
    if schedule == "mathrl":
        if warmup_steps:
            raise ValueError("a warm-up given in steps needs the transformers schedule")
        return cosine_schedule(optimizer, steps, warmup_ratio, min_lr_ratio)
    from transformers import get_scheduler

    # "cosine_with_min_lr" at min_lr_rate 0 is "cosine" to the last bit (transformers/optimization.py:326-332)
    return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup_steps or
                         math.ceil(steps * warmup_ratio), num_training_steps=steps,
                         scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio})


def cosine_schedule(optimizer, max_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warm-up from lr / warmup at the first step, then cosine decay from lr to min_lr_ratio * lr
    (the `mathrl` schedule)."""
    warmup = int(round(warmup_ratio * max_steps))

    def multiplier(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
