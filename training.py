"""Shared training machinery for sft.py, grpo.py and ppo.py.

What every trainer needs and no algorithm owns: command-line flags with presets, one process or
many under torchrun, the model and tokenizer (a hub checkpoint or the tiny CPU model), FSDP2
sharding, a loss normalised over the global token count, a learning-rate schedule, metrics, and
checkpoints that are written atomically and resume exactly.
"""
import argparse
import collections
import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import random
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

# ----------------------------------------------------------------------------------------------
# Flags: a dataclass of defaults, named presets on top, explicit flags on top of those.


def flag(default, help: str, choices=None):
    """A Config field that is a command-line flag: its default, its --help text, its allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class RLFlags:
    """The flags grpo.py and ppo.py share that are not their algorithm: the cosine reward's shape,
    precision and memory, the engine, the grader, checkpoints, logging, the memory plan. A trainer's
    Config inherits them; its own fields come first in --help."""
    cosine_max_len: int = flag(1000, "cosine reward: the length where it reaches its END values "
                                     "(Open-RS: 1000; their Exp. 3: 3584)")
    cosine_unit: str = flag("chars", "cosine reward: length in characters of the completion (Open-RS) "
                                     "or in tokens", ["chars", "tokens"])
    cosine_clamp: bool = flag(False, "cosine reward: hold lengths past --cosine-max-len at END "
                                     "(Open-RS: no, the cosine turns back up)")
    cosine_correct: str = flag("1.0:0.5", "cosine reward of a right answer, START:END = at length 0 : "
                                          "at --cosine-max-len (Open-RS: 1.0:0.5)")
    cosine_wrong: str = flag("0.0:-0.5", "cosine reward of a wrong answer, START:END (Open-RS: 0.0:-0.5; "
                                         "a negative START needs =, as --cosine-wrong=-1:-0.5)")
    bf16: bool = flag(True, "bf16 compute (GPU); master weights stay fp32")
    gradient_checkpointing: bool = flag(True, "recompute activations in backward")
    logprob_chunk_size: int = flag(1024, "tokens whose full-vocabulary logits exist at once in the log-prob "
                                         "pass (memory: chunk x vocab x ~14 bytes)")
    engine: str = flag("vllm", "generation engine: vllm or hf", ["vllm", "hf"])
    vllm_gpu_memory_utilization: float = flag(
        0.3, "GPU only: fraction of each GPU's memory the colocated vLLM engine takes while generating (its "
             "bf16 weights, activations, KV cache); it releases all of it during updates. A preset's value "
             "comes from the arithmetic beside it; on CPU see --vllm-cpu-kv-cache-gb")
    vllm_max_num_batched_tokens: int = flag(
        4096, "GPU only: tokens in one vLLM forward pass (prompt chunks + one per decoding sequence); sets "
              "the activation memory vLLM reserves (4096: TRL's colocate value)")
    vllm_cpu_kv_cache_gb: float = flag(0.5, "CPU only: each rank's vLLM KV cache, GiB (vLLM would otherwise "
                                            "size it from free RAM, every rank alike)")
    grader_workers: int = flag(4, "processes grading answers, each answer under a time limit")
    save_total_limit: int = flag(0, "keep the newest N complete checkpoints, delete older ones (0: keep all)")
    dist_timeout_minutes: float = flag(30.0, "minutes a rank waits for the others in a collective (a "
                                             "checkpoint being written, a long generation) before the run "
                                             "aborts")
    log_completions_steps: int = flag(10, "append a sample of completions to completions.jsonl every N steps")
    report_to: str = flag("none", "none, wandb or tensorboard", ["none", "wandb", "tensorboard"])
    dry_run: bool = flag(False, "print the per-GPU memory plan (memplan.py) and exit: 0 if it fits, 1 if not")
    plan_gpus: int = flag(0, "GPUs the memory plan is for (0: this launch's ranks)")
    gpu_memory_gb: float = flag(80.0, "memory of one GPU for the memory plan, GiB")


def parse_args(config_class, presets: dict, argv=None, description: str = ""):
    """Build argparse from a dataclass whose fields carry `metadata={"help": ...}`; check the values.

    Precedence: dataclass default < preset < flag given on the command line. The preset is read by
    a first parse and becomes the parser's defaults, so argparse alone decides what was given.
    Abbreviations are off: `--max-st 3` is an error, never a flag silently taken for another.
    """
    preset_help = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                            for name, values in presets.items())
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # one line, like every other bad input (argparse would print the whole usage above it)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help=f"a named bundle of flag values (flags given explicitly win). {preset_help}")
    own = config_class.__dict__.get("__annotations__", {})  # the trainer's own flags first, then shared ones
    for field in sorted(dataclasses.fields(config_class), key=lambda f: f.name not in own):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            kind = kind if kind in (int, float, str) else str
            parser.add_argument(flag, type=kind, default=field.default, help=help_text,
                                choices=field.metadata.get("choices"))
    # The first parse reads --preset alone; any error in the arguments is left to the full parse.
    preset_reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    preset_reader.add_argument("--preset")
    try:
        parser.set_defaults(**presets.get(preset_reader.parse_known_args(argv)[0].preset, {}))
    except argparse.ArgumentError:  # `--preset` without a value: the full parse says so
        pass
    namespace = parser.parse_args(argv)
    config = config_class(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_class)})
    config.preset = namespace.preset
    check_flags(config)
    return config


# Bounds of the trainers' flags, by field name (a trainer checks the ones it has):
# (lowest, highest, whether the lowest value itself is allowed).
_COUNTS = ("max_steps", "prompts_per_step", "num_generations", "micro_batch_size", "batch_size",
           "train_batch_size", "ppo_epochs", "num_iterations", "max_prompt_length", "max_completion_length",
           "max_length", "save_steps", "log_steps", "grader_workers", "logprob_chunk_size", "cosine_max_len",
           "max_sampling_rounds")
FLAG_BOUNDS = {
    **{name: (1, math.inf, True) for name in _COUNTS},
    "temperature": (0, math.inf, False),  # the log-probs divide the logits by it: 0 would train on NaN
    "top_p": (0, 1, False),
    "vllm_gpu_memory_utilization": (0, 1, False),
    **{name: (0, math.inf, False) for name in ("dist_timeout_minutes", "gpu_memory_gb")},
    "vllm_max_num_batched_tokens": (1, math.inf, True),
    "vllm_cpu_kv_cache_gb": (0, math.inf, False),
    **{name: (0, 1, True) for name in ("warmup_ratio", "min_lr_ratio", "adam_beta2", "gamma", "lam",
                                       "epsilon_low", "clip_eps")},
    **{name: (0, math.inf, True) for name in ("lr", "actor_lr", "critic_lr", "weight_decay", "grad_clip",
                                              "beta", "kl_coef", "tis_cap", "epsilon_high", "value_clip",
                                              "critic_warmup_steps", "log_completions_steps",
                                              "save_total_limit", "plan_gpus")},
    "seed": (0, 2 ** 32 - 1, True),  # numpy's seed range
}


def check_flags(config):
    """Every value in range, every float finite, the output folder usable: checked before anything
    loads, so a bad flag is one line naming it, never a traceback minutes later or NaN weights."""
    for field in dataclasses.fields(config):
        value, flag = getattr(config, field.name), "--" + field.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"error: {flag} must be a finite number, not {value}")
        if field.name in FLAG_BOUNDS and not isinstance(value, bool):
            low, high, low_allowed = FLAG_BOUNDS[field.name]
            if not (low <= value <= high) or (value == low and not low_allowed):
                bound = f"in {'[' if low_allowed else '('}{low}, {high}]" if high < math.inf else \
                    f"{'>=' if low_allowed else '>'} {low}"
                raise SystemExit(f"error: {flag} must be {bound}, not {value}")
    output_dir = getattr(config, "output_dir", None)
    if output_dir:
        existing = Path(output_dir).expanduser().absolute()
        while not existing.exists():  # the folder is made later; its nearest existing ancestor must allow it
            existing = existing.parent
        if not existing.is_dir():
            raise SystemExit(f"error: --output-dir {output_dir!r}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK):
            raise SystemExit(f"error: --output-dir {output_dir!r}: {existing} is not writable")
    if getattr(config, "engine", None) == "vllm" and str(getattr(config, "model", "")).endswith(".gguf"):
        raise SystemExit(f"error: --model {config.model!r} is a GGUF file; --engine vllm loads a "
                         f"save_pretrained folder or hub id, so use --engine hf")


# ----------------------------------------------------------------------------------------------
# Processes: `python x.py` is one process; `torchrun --nproc_per_node N x.py` is N ranks.


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float = 30.0) -> Dist:
    """timeout_minutes: how long a collective waits for the slowest rank before the run is aborted
    (NCCL's default is 10: too short for a rank still writing a large checkpoint or generating)."""
    from datetime import timedelta

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        local_rank, device = int(os.environ.get("LOCAL_RANK", 0)), torch.device("cpu")
        # Each CPU rank gets its own threads; ranks fighting over the same cores run ~40x slower.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=timeout_minutes))
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return Dist(0, 1, local_rank, device)


def all_reduce_sum(value, d: Dist) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64 if not torch.is_tensor(value) else value.dtype,
                             device=d.device).clone()
    if d.enabled:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(value: torch.Tensor, d: Dist) -> torch.Tensor:
    value = value.detach().clone()
    if d.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist):
    """Leave the process group before exiting: a rank that exits with gloo's threads still alive
    can abort ("terminate called without an active exception") while another rank finishes."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_per_rank(seed: int, d: Dist):
    """Give each rank its own random stream; call it after the models are built.

    Models must be initialised identically on every rank (a new critic value head, the tiny model),
    so every rank first seeds with `seed`. Sampling must not be identical: with one stream on every
    rank, rank r's k-th draw equals rank 0's, and the completions of different ranks are correlated,
    which every estimator here assumes they are not. Rank 0 keeps the stream it has (a one-process run
    with the HF engine samples as before; the vLLM engine derives each call's stream from this one and the
    rank, engine.rank_stream); rank r > 0 reseeds from (seed, r), hashed so no two (seed, rank) pairs
    share a stream. The checkpoint saves each rank's RNG state, so a resumed run continues each stream."""
    if d.rank > 0:
        seed_everything(int(np.random.SeedSequence([seed, d.rank]).generate_state(1)[0]))


# ----------------------------------------------------------------------------------------------
# Data order: the same global batches whatever the number of ranks, and after a resume.


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """The examples of global batch `step`: a fixed stream of seeded per-epoch permutations.

    It depends on nothing but the step, so a resumed run and a run on any number of ranks see
    exactly the same batches.
    """
    indices, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            orders[epoch] = torch.randperm(num_examples, generator=generator)
        indices.append(int(orders[epoch][offset]))
    return indices


# ----------------------------------------------------------------------------------------------
# Models and tokenizers. A hub id, a local save_pretrained folder, a GGUF file, or `tiny`.

def build_tiny_tokenizer():
    """A character-level tokenizer for the synthetic tasks: one token per printable ASCII char.

    It is a byte-level BPE with no merges, the same kind of tokenizer as Qwen2's. That matters:
    `AutoTokenizer` reloads any tokenizer saved beside a Qwen2 config as `Qwen2Tokenizer`, whose
    byte-level pre-tokenizer silently drops spaces and newlines from a plain character vocabulary.
    Written in byte-level form (space = "Ġ", newline = "Ċ"), the round trip is exact.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = [byte_level.pre_tokenize_str(chr(b))[0][0] for b in [10, *range(32, 127)]]
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    eos, *extra = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos,
                                   additional_special_tokens=extra)


def build_tiny_model(hidden_size=128, num_layers=4, num_heads=4, max_positions=1024, seed=0):
    """A Qwen2-architecture model small enough to train on a laptop CPU in minutes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config), tokenizer


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path, gguf_file = _split_gguf(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:  # batching needs a pad token; it is always masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype=torch.float32):
    """Loads a causal LM in the dtype its master weights are kept in (fp32; bf16 compute comes from FSDP)."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = _split_gguf(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def _split_gguf(name_or_path: str):
    """`dir/model.gguf` loads through transformers' GGUF reader (e.g. the SmolLM2 test model)."""
    if name_or_path.endswith(".gguf"):
        return str(Path(name_or_path).parent), Path(name_or_path).name
    return name_or_path, None


def check_model_path(name_or_path: str, flag: str = "--model"):
    """Fail in a second, naming the flag, when a model cannot load: a missing path, a folder that is
    not a model, a hub id that is neither in the local cache nor on a reachable hub. Never minutes of
    download retries: with HF_HUB_OFFLINE set the hub is not asked, otherwise asked once, briefly."""
    path = os.path.expanduser(name_or_path)
    if path.endswith(".gguf") or os.path.exists(path):
        if path.endswith(".gguf") and not os.path.isfile(path):
            raise SystemExit(f"error: {flag} {name_or_path!r}: no such GGUF file")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"error: {flag} {name_or_path!r} is a folder without config.json, "
                             f"not a saved model")
        if os.path.isfile(path) and not path.endswith(".gguf"):
            raise SystemExit(f"error: {flag} {name_or_path!r} is a file; expected a model folder, "
                             f".gguf file or hub id")
        return
    if len(path.split("/")) != 2 or path.startswith((".", "/")):
        raise SystemExit(f"error: {flag} {name_or_path!r} is neither a local path nor a hub id (org/name)")
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    missing = f"error: {flag} {name_or_path!r}: no such local folder, and not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise SystemExit(f"{missing} (HF_HUB_OFFLINE is set: nothing is downloaded); "
                         f"pass a local model folder")
    try:
        HfApi().model_info(path, timeout=10)
    except GatedRepoError:
        pass  # it exists; the download says whether this login may read it
    except RepositoryNotFoundError:
        raise SystemExit(f"{missing} or on the hub") from None
    except Exception as error:  # no network, DNS, timeout: say so now rather than after the loader's retries
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SystemExit(f"{missing}, and the hub cannot be reached ({reason})") from None


# ----------------------------------------------------------------------------------------------
# FSDP2: shard each decoder layer, then the root. Parameters stay fp32 (the optimizer's master
# copy); on GPU the forward and backward run in bf16 with fp32 gradient reduction.


def shard_model(model, d: Dist, bf16: bool, gradient_checkpointing: bool):
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(d.device)
    if not d.enabled:
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
    model.next_token_scores = types.MethodType(_next_token_scores, model)
    register_fsdp_forward_method(model, "next_token_scores")
    return model


def load_reference(name_or_path: str, d: Dist, bf16: bool):
    """The frozen reference policy pi_ref, sharded like the policy. No optimizer needs fp32 master weights,
    so it is bf16 under FSDP with bf16 (see frozen_dtype)."""
    reference = shard_model(load_model(name_or_path, dtype=frozen_dtype(d, bf16)), d, bf16, False).eval()
    return reference.requires_grad_(False)


def frozen_dtype(d: Dist, bf16: bool) -> torch.dtype:
    """The dtype of a frozen model (the reference): bf16 under FSDP with bf16, where the policy computes
    from bf16 copies of its weights too; one process runs pi's fp32 weights under autocast, and a bf16
    reference would differ from pi at step 0 (the residual stream stays fp32 under autocast)."""
    return torch.bfloat16 if bf16 and d.enabled else torch.float32


def autocast(d: Dist, bf16: bool):
    """Single-process runs have no FSDP mixed-precision policy: autocast does the same job."""
    enabled = bf16 and not d.enabled
    return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=enabled)


def clip_grad_norm(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def stop_if_not_finite(values: dict, optimizer_step: int, d: "Dist"):
    """The NaN guard: a non-finite gradient norm stops the run with one line before the optimizer
    applies it; a non-finite loss (known after the step) stops it before anything more is saved. So no
    checkpoint or final model ever holds NaN or inf weights. Pass only values that are the same on every
    rank (gradient norms, all-reduced losses): then every rank stops at the same point, rank 0 says why."""
    bad = ", ".join(f"{name} is {value}" for name, value in values.items() if not math.isfinite(value))
    if bad:
        _stop(f"error: {bad} at optimizer step {optimizer_step}: stopped, nothing more saved (checkpoints "
              f"already written hold finite weights); is the learning rate too high?", d)


def cosine_schedule(optimizer, max_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """Linear warm-up, then cosine decay from lr to min_lr_ratio * lr."""
    warmup = int(round(warmup_ratio * max_steps))

    def multiplier(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


# ----------------------------------------------------------------------------------------------
# Sequences for the RL trainers: prompt + completion rows and the log-probs of completion tokens.


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device):
    """Right-padded prompt+completion rows, and completion_mask marking the completion's tokens.

    No attention mask: with the pads after the real tokens, causal attention never lets a real
    token see one, so the log-probs are those of each row alone. (The pads' own outputs are
    garbage, and completion_mask drops them.) Measured on CPU, passing a mask costs about the same."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.float32)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        completion_mask[row, len(p):len(p) + len(c)] = 1
    return input_ids.to(device), completion_mask.to(device)


def pack_logprobs(logprobs: list[list[float]], prompt_lengths: list[int], width: int, device):
    """The engine's log-probs laid out like next_token_scores' output (position t predicts token t+1)."""
    out = torch.zeros((len(logprobs), width - 1), device=device)
    for row, (lp, start) in enumerate(zip(logprobs, prompt_lengths)):
        out[row, start - 1:start - 1 + len(lp)] = torch.tensor(lp)
    return out


LOGPROB_CHUNK_SIZE = 1024  # the default of every trainer's --logprob-chunk-size


def next_token_scores(model, input_ids, head, chunk_size: int = LOGPROB_CHUNK_SIZE):
    """head(logits, next_tokens) at every position t < T - 1 of the [B, T] rows: logits [n, V] (fp32) is
    the model's output at n positions, next_tokens [n] the tokens t + 1 those positions predict. head
    returns a pair of [n] tensors (or None for the second); they come back as [B, T - 1] each.

    This is plumbing for the memory bound; the algorithm files write the head (the log-softmax at the
    sampling temperature). The full-vocabulary logits of a micro-batch are never built: 4 x 3584
    positions x 152k vocabulary is 8 GiB in fp32, and logsumexp, softmax and backward multiply that.
    The model runs to its last hidden states, then lm_head and head run on `chunk_size` positions at a
    time under torch.utils.checkpoint: in backward each chunk's logits are recomputed, so one chunk's
    logits exist at a time, forward or backward, and the result equals the unchunked computation. (A lone
    chunk is checkpointed too: nothing vocabulary-wide outlives the forward, whatever head returns.) (It
    takes the logits to be lm_head(last hidden state), as Qwen2 and Llama compute them; a model that
    scales or caps its logits, like Gemma 2, would need that step here too.)"""
    forward = getattr(model, "next_token_scores", None) or types.MethodType(_next_token_scores, model)
    first, second = forward(input_ids, head, chunk_size)
    shape = (input_ids.shape[0], input_ids.shape[1] - 1)
    return first.view(shape), None if second is None else second.view(shape)


def _next_token_scores(model, input_ids, head, chunk_size: int):
    """next_token_scores' model pass, flat over rows x positions; shard_model registers it with FSDP as a
    forward method. (It returns whole tensors, not views: FSDP's backward hooks on a view can be lost.)"""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    # Position t predicts token t + 1: the last position predicts nothing, the first token is not predicted.
    rows, width = input_ids.shape[0], input_ids.shape[1] - 1
    hidden, targets = hidden[:, :-1].reshape(rows * width, -1), input_ids[:, 1:].reshape(-1)
    lm_head = model.get_output_embeddings()
    chunk_head = lambda h, y: head(lm_head(h).float(), y)  # fp32: bf16 would round pi / pi_old by ~1%
    firsts, seconds = [], []
    for start in range(0, len(targets), chunk_size):
        args = (hidden[start:start + chunk_size], targets[start:start + chunk_size])
        first, second = (torch.utils.checkpoint.checkpoint(chunk_head, *args, use_reentrant=False)
                         if torch.is_grad_enabled() else chunk_head(*args))
        firsts.append(first)
        seconds.append(second)
    return torch.cat(firsts), None if seconds[0] is None else torch.cat(seconds)


def prepare_prompts(problems, tokenizer, template: str, max_prompt_length: int, d: Dist, who: str):
    """Format and tokenize every prompt once; prompts over the length budget are left out, and said so."""
    import data

    try:
        prompts = [data.format_prompt(p["prompt"], tokenizer, template) for p in problems]
    except ValueError as error:  # qwen-math on a tokenizer without a chat template
        raise SystemExit(f"error: --template {template}: {error}") from None
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= max_prompt_length]
    if not keep:
        raise SystemExit(f"error: all {len(problems)} prompts are longer than --max-prompt-length "
                         f"{max_prompt_length} tokens (the shortest has "
                         f"{min(map(len, prompt_ids), default=0)})")
    if d.is_main and len(keep) < len(problems):
        print(f"{who}: left out {len(problems) - len(keep)} of {len(problems)} prompts longer than "
              f"{max_prompt_length} tokens")
    return [problems[i] for i in keep], [prompts[i] for i in keep], [prompt_ids[i] for i in keep]


@dataclasses.dataclass
class Group:
    """One prompt's completions and their rewards: what an RL trainer's rollout step hands on."""
    problem: int        # index of the prompt in the trainer's problem list
    position: int       # place in the stream of batches, step * prompts_per_step + j: epoch = position // N
    completions: list   # engine.Completion each: token_ids, text, logprobs, finish_reason
    rewards: dict       # reward name (and "correct", "total") -> one value per completion

    def summary(self, keep_text: bool) -> "Group":
        """This group as logging needs it, cheap to gather from every rank: each completion's text (only
        if keep_text), length and finish reason, without its token ids and log-probs (PPO at LIMR's
        scale samples 8,192 completions of up to 3,072 tokens a step: gigabytes as Python lists)."""
        return Group(self.problem, self.position, [Sampled(c.text if keep_text else "", c.num_tokens,
                                                           c.finish_reason) for c in self.completions],
                     self.rewards)


Sampled = collections.namedtuple("Sampled", "text num_tokens finish_reason")  # Group.summary's completions


def log_groups(step: int, groups: list[Group], problems, prompts, reward_names, prompts_per_step: int,
               output_dir, log_completions_steps: int, d: Dist) -> dict:
    """The rollout half of an RL step's metrics (rewards, accuracy, lengths) from the step's batch, the
    same list of groups on every rank, plus two files on rank 0: trajectories.jsonl (lim.py's input: per
    prompt and epoch, how many of its group were right) and, every log_completions_steps, a sample of
    completions.jsonl. A group's completions may be engine.Completion or Group.summary's Sampled."""
    completions = [c for g in groups for c in g.completions]
    column = lambda name: [x for g in groups for x in g.rewards[name]]
    lengths = [c.num_tokens for c in completions]
    metrics = {}
    for name in list(reward_names) + ["total"]:
        metrics[f"reward/{name}"] = float(np.mean(column(name)))
        metrics[f"reward/{name}_std"] = float(np.std(column(name), ddof=1)) if len(lengths) > 1 else 0.0
    metrics |= {"accuracy": float(np.mean(column("correct"))),
                "response_length_mean": float(np.mean(lengths)),
                "response_length_max": max(lengths),
                "truncated_frac": float(np.mean([c.finish_reason == "length" for c in completions])),
                "epoch": (step + 1) * prompts_per_step / len(problems)}
    if d.is_main:
        with open(Path(output_dir) / "trajectories.jsonl", "a") as f:
            for g in groups:
                f.write(json.dumps({"step": step + 1, "id": problems[g.problem]["id"],
                                    "epoch": g.position // len(problems),
                                    "correct": sum(g.rewards["correct"]), "n": len(g.completions)}) + "\n")
        if log_completions_steps and (step + 1) % log_completions_steps == 0:
            with open(Path(output_dir) / "completions.jsonl", "a") as f:
                g = groups[0]
                for c, r in zip(g.completions, g.rewards["total"]):
                    f.write(json.dumps({"step": step + 1, "prompt": prompts[g.problem], "completion": c.text,
                                        "answer": problems[g.problem]["answer"], "reward": r}) + "\n")
    return metrics


# ----------------------------------------------------------------------------------------------
# Checkpoints. `D/checkpoint-N/` holds
#   - the model as a save_pretrained folder (config, safetensors weights, tokenizer): transformers and
#     vLLM load it as it is. PPO's critic is a second such folder, `critic/`;
#   - `optimizer/`: the Adam states in torch.distributed.checkpoint's sharded format: each rank writes
#     and reads only its own shard, and a checkpoint of N ranks loads on any number (DCP reshards);
#   - `trainer_state.pt` (a few kB): step, schedulers, each rank's random state, the world size;
#   - `complete.json`, written last: every file of the checkpoint with its size.
# It is written as `.partial-checkpoint-N` and renamed when complete. A checkpoint is used only when
# its marker is there and every file it lists is whole; the newest such one is resumed from.

COMPLETE_MARKER = "complete.json"
# Rank 0 holds one weights file at a time while writing: 5 GB (transformers 4's default shard size)
# bounds its host memory whatever the model's size (a 7B model in fp32 is 7 files).
MAX_SHARD_BYTES = 5 * 2**30


def full_model_state(model, d: Dist) -> dict:
    """The whole state dict in fp32 on CPU, gathered on rank 0 (other ranks get an empty dict).
    For tests and small models only: checkpoints stream the weights instead (save_pretrained)."""
    if not d.enabled:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class CheckpointWriteError(Exception):
    """A file of a checkpoint or model folder could not be written (e.g. the disk is full)."""


def _write_errors() -> tuple:
    from safetensors import SafetensorError  # what safetensors raises for a full disk, not OSError

    return OSError, SafetensorError


def _agree_all_wrote(error, d: Dist, what):
    """Every rank learns whether any rank failed to write (rank 0 writes alone; the others must not
    carry on into the next collective as if it had worked, nor wait for it until the timeout)."""
    if all_reduce_sum(float(error is not None), d).item() > 0:
        raise CheckpointWriteError(f"could not write {what}: {_why(error, what)}")


def _why(error, path) -> str:
    """The error's own words, and the free space left: torch's writer words a full disk as
    "unexpected pos 704 vs 598"."""
    if error is None:
        return "another rank's write failed"
    words = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip()
    folder = Path(path)
    while not folder.exists():
        folder = folder.parent
    return f"{words} ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free on its disk)"


def _saved_tensor_names(model, state: dict) -> list[str]:
    """state_dict's names, each tensor once: a tied weight (lm_head.weight when it is the embedding)
    is saved under its first name only, as save_pretrained does; from_pretrained ties it again."""
    first_name = {}
    repeats = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(parameter), name) != name:
            repeats.add(name)
    return [name for name in state if name not in repeats]


def save_pretrained(model, tokenizer, path, d: Dist, max_shard_bytes: int = MAX_SHARD_BYTES):
    """model.save_pretrained's folder, written one tensor at a time.

    Each tensor is gathered in full (under FSDP2 every rank holds 1/world_size of it) and only rank 0
    keeps it, until its weights file is written: rank 0 never holds more than one file's worth
    (max_shard_bytes), the other ranks one tensor. Several files come with the usual
    model.safetensors.index.json. Raises CheckpointWriteError on every rank if a write fails."""
    from safetensors.torch import save_file

    path = Path(path)
    state = model.state_dict()  # under FSDP2: each rank's shards (DTensors); nothing is gathered here
    names = _saved_tensor_names(model, state)
    files, size = [[]], 0       # plan the files from the global shapes, the same on every rank
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    file_names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    error = None
    for file_name, file_tensors in zip(file_names, files):
        tensors = {}
        for name in file_tensors:
            tensor = state[name].detach()
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a collective
            if d.is_main:
                tensors[name] = tensor.to("cpu").contiguous()
        if d.is_main and error is None:
            try:
                path.mkdir(parents=True, exist_ok=True)
                save_file(tensors, path / file_name, metadata={"format": "pt"})
            except _write_errors() as e:
                error = e
        del tensors
    if d.is_main and error is None:
        try:
            if len(files) > 1:
                total = sum(state[n].numel() * state[n].element_size() for n in names)
                index = {"metadata": {"total_size": total},
                         "weight_map": {n: f for f, ns in zip(file_names, files) for n in ns}}
                (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            # Qwen2ForCausalLM, not FSDP2's dynamic subclass FSDPQwen2ForCausalLM
            unwrapped = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
            model.config.architectures = [unwrapped.__name__]
            model.config.save_pretrained(path)
            if model.can_generate():
                model.generation_config.save_pretrained(path)
            tokenizer.save_pretrained(path)
        except _write_errors() as e:
            error = e
    _agree_all_wrote(error, d, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir, step: int, model, tokenizer, optimizers: dict, schedulers: dict,
                    trainer_state: dict, d: Dist, extra_models: dict | None = None,
                    save_total_limit: int = 0):
    """Everything needed to continue as if never stopped. `optimizers` = {name: (model, optimizer)},
    `schedulers` = {name: scheduler}, `extra_models` = {folder name: model} (PPO's critic).
    Keeps the newest `save_total_limit` complete checkpoints (0: all). A failed write (a full disk)
    removes the half-written folder and stops the run with one line; the previous checkpoint stays."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    output_dir = Path(output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".partial-checkpoint-{step}"
    try:
        error = None
        if d.is_main:
            try:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            except _write_errors() as e:
                error = e
        _agree_all_wrote(error, d, partial)
        save_pretrained(model, tokenizer, partial, d)
        for name, extra in (extra_models or {}).items():
            save_pretrained(extra, tokenizer, partial / name, d)
        # An optimizer that has not stepped yet (PPO's actor during the critic's warm-up) has no state,
        # and DCP would create one by stepping it with zero gradients: it is left out, and stays fresh.
        stepped = {name: get_optimizer_state_dict(m, opt) for name, (m, opt) in optimizers.items()
                   if opt.state}
        try:
            with _quiet_without_process_group():
                dcp.save(stepped, checkpoint_id=partial / "optimizer")  # each rank writes its own shard
        except CheckpointException as e:  # raised on every rank when any rank failed
            failure = next(iter(e.failures.values()))[0] if e.failures else e
            raise CheckpointWriteError(f"could not write {partial / 'optimizer'}: {_why(failure, partial)}") \
                from None
        rng_states = all_gather_objects(rng_state(), d)
        if d.is_main:
            try:
                small_state = io.BytesIO()  # written by Python, so a full disk is an OSError that says so
                torch.save({"step": step, "world_size": d.world_size, "trainer": trainer_state,
                            "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                            "optimizers": sorted(stepped), "rng": rng_states}, small_state)
                (partial / "trainer_state.pt").write_bytes(small_state.getvalue())
                _write_marker(partial, step, d.world_size, ["", *[f"{name}/" for name in extra_models or {}]])
                if final.exists():  # a damaged checkpoint of this step, skipped when this run resumed
                    shutil.rmtree(final)
                os.replace(partial, final)  # atomic: the folder appears complete or not at all
            except _write_errors() as e:
                error = e
        _agree_all_wrote(error, d, final)
    except CheckpointWriteError as failure:
        if d.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(output_dir, warn=False)
        kept = f"{previous} is intact" if previous else "there is no earlier checkpoint"
        _stop(f"error: {failure}; the run stops here and {kept}: rerun the same command to resume from it", d)
    if d.is_main and save_total_limit > 0:
        kept = complete_checkpoints(output_dir)[-save_total_limit:]
        oldest_kept = int(kept[0].name.split("-", 1)[1]) if kept else 0
        # older complete ones, and damaged or unfinished ones older than those kept (never resumable)
        for old in [p for p in _checkpoint_folders(output_dir) if int(p.name.split("-", 1)[1]) < oldest_kept]:
            try:
                # the marker first: a deletion cut short never looks complete
                (old / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(old)
            except OSError as error:  # the run goes on; a folder left behind costs disk, not correctness
                warnings.warn(f"--save-total-limit: could not delete {old}: {error}")
    barrier(d)


def _stop(message: str, d: Dist):
    """Exit every rank with `message` said once. Under torchrun the first rank to exit gets the others
    killed: rank 0 says it, and has cleaned up, before any rank leaves."""
    if not d.enabled:
        raise SystemExit(message)
    if d.is_main:
        print(message, file=sys.stderr, flush=True)
    barrier(d)
    raise SystemExit(1)


@contextlib.contextmanager
def _quiet_without_process_group():
    """DCP warns at every save and load in one process that it assumes one process: it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable")
        yield


def _write_marker(folder: Path, step: int, world_size: int, model_folders: list[str]):
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    marker = folder / f".{COMPLETE_MARKER}.tmp"
    with open(marker, "w") as f:
        json.dump({"step": step, "world_size": world_size, "models": model_folders, "files": files}, f,
                  indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker, folder / COMPLETE_MARKER)


def checkpoint_problem(folder) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete: its marker is
    there, every file it lists has the size it was written with, and nothing it needs is missing
    (config, weights and tokenizer of each model, trainer state, optimizer shards' index)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        files, model_folders = dict(marker["files"]), list(marker["models"])
    except FileNotFoundError:
        return f"{COMPLETE_MARKER} is missing (written last: the checkpoint was never finished)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is unreadable"
    needed = ["trainer_state.pt", "tokenizer_config.json"]
    if any(name.startswith("optimizer/") for name in files):
        needed.append("optimizer/.metadata")
    for prefix in model_folders:
        index = "model.safetensors.index.json"  # a model saved in several files
        weights = "model.safetensors" if f"{prefix}model.safetensors" in files else index
        needed += [f"{prefix}config.json", prefix + weights]
    for name in needed:
        if name not in files:
            return f"{name} is missing"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} it was written with"
    return None


def _checkpoint_folders(output_dir) -> list[Path]:
    """checkpoint-N folders, oldest first (temporary .partial-checkpoint-N folders are not among them)."""
    folders = [Path(p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
               if Path(p).name.split("-", 1)[1].isdigit() and Path(p).is_dir()]
    return sorted(folders, key=lambda p: int(p.name.split("-", 1)[1]))


def complete_checkpoints(output_dir) -> list[Path]:
    return [p for p in _checkpoint_folders(output_dir) if checkpoint_problem(p) is None]


def latest_checkpoint(output_dir, warn: bool = True) -> Path | None:
    """The newest complete checkpoint. A newer one that is damaged or unfinished is skipped with a
    warning saying what is wrong with it; no file of it is read."""
    for folder in reversed(_checkpoint_folders(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        if warn and int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: skipping {folder}: {problem}", file=sys.stderr)
    return None


def load_trainer_state(checkpoint: Path) -> dict:
    """The small part of the trainer state (step, schedulers, RNG); the optimizer state stays on disk
    until restore_checkpoint reads this rank's shard of it."""
    state = torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=False)
    return state | {"checkpoint": Path(checkpoint)}


def restore_checkpoint(state: dict, optimizers: dict, schedulers: dict, d: Dist, seed: int = 0):
    """Optimizer, scheduler and RNG state; model weights come from loading the checkpoint folder.

    Each rank reads only its shard of the optimizer state, whatever the number of ranks that wrote
    it. On the same number of ranks each rank gets its own random state back, and the run continues
    exactly; on another number the streams are reseeded from (seed, step, rank), said in one line."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    saved = set(state["optimizers"])
    if saved - set(optimizers):
        raise SystemExit(f"error: {state['checkpoint']} holds optimizers {sorted(saved)}, "
                         f"this run has {sorted(optimizers)}")
    # The optimizers are fresh: get_optimizer_state_dict sizes their states (a step at lr 0, which
    # leaves the weights as they are) for DCP to read the saved values into.
    loaded = {name: get_optimizer_state_dict(m, opt) for name, (m, opt) in optimizers.items()
              if name in saved}
    if loaded:
        with _quiet_without_process_group():
            dcp.load(loaded, checkpoint_id=state["checkpoint"] / "optimizer")  # this rank's shard only
    for name, optimizer_state in loaded.items():
        set_optimizer_state_dict(*optimizers[name], optimizer_state)
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    if state["world_size"] == d.world_size:
        set_rng_state(state["rng"][d.rank])
    else:
        entropy = np.random.SeedSequence([seed, state["step"], d.rank]).generate_state(1)[0]
        seed_everything(int(entropy))
        if d.is_main:
            print(f"resume: {state['checkpoint']} was written by {state['world_size']} rank(s), this run has "
                  f"{d.world_size}: optimizer state resharded; random streams reseeded from (seed {seed}, "
                  f"step {state['step']}, rank), so sampling differs from an uninterrupted run")
    return state["trainer"]


def finish(output_dir, model, tokenizer, d: Dist):
    """The final model at the root of the output dir, loadable by transformers and vLLM."""
    try:
        save_pretrained(model, tokenizer, output_dir, d)
    except CheckpointWriteError as failure:
        _stop(f"error: {failure}", d)


# ----------------------------------------------------------------------------------------------
# Metrics: one JSON line per step in D/metrics.jsonl, a short console line, and optionally
# wandb or tensorboard (imported only when asked for).


class MetricsLogger:
    def __init__(self, output_dir, report_to: str, run_config: dict, d: Dist):
        self.active = d.is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.backend = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to == "wandb":
            import wandb

            self.backend = wandb.init(config=run_config, dir=str(output_dir))
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict):
        if not self.active:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.backend is not None and hasattr(self.backend, "log"):
            self.backend.log(record, step=step)
        elif self.backend is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.backend.add_scalar(key, value, step)


def _plain(value):
    if torch.is_tensor(value) or isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def truncate_logs(output_dir, step: int, d: Dist):
    """Logs hold each step once. At the start of every run, resumed (step = the checkpoint's) or fresh
    (step = 0), lines of later steps come from an attempt that died before its next checkpoint: the
    steps are redone, so those lines go. A line that does not parse (the last one, cut short by a kill
    or a full disk) is dropped with a warning. Each file is replaced atomically: a kill during this
    leaves the old file or the new one, never half of one."""
    for name in ("metrics.jsonl", "trajectories.jsonl", "completions.jsonl"):
        path = Path(output_dir) / name
        if not d.is_main or not path.exists():
            continue
        kept, unreadable = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                unreadable += line.strip() != ""
                continue
            if record_step <= step:
                kept.append(line + "\n")
        if unreadable:
            print(f"warning: {path}: dropped {unreadable} unreadable line(s) (a write cut short)",
                  file=sys.stderr)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)
