"""Shared training machinery for sft.py, grpo.py and ppo.py.

What every trainer needs and no algorithm owns: command-line flags with presets, one process or
many under torchrun, the model and tokenizer (a hub checkpoint or the tiny CPU model), FSDP2
sharding, a loss normalised over the global token count, a learning-rate schedule, metrics, and
checkpoints that are written atomically and resume exactly.
"""
import argparse
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# Flags: a dataclass of defaults, named presets on top, explicit flags on top of those.


def parse_args(config_class, presets: dict, argv=None, description: str = ""):
    """Build argparse from a dataclass whose fields carry `metadata={"help": ...}`.

    Precedence: dataclass default < preset < flag given on the command line.
    """
    preset_help = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                            for name, values in presets.items())
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help=f"a named bundle of flag values (flags given explicitly win). {preset_help}")
    for field in dataclasses.fields(config_class):
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
    namespace = parser.parse_args(argv)
    values = {f.name: f.default for f in dataclasses.fields(config_class)}
    if namespace.preset:
        values.update(presets[namespace.preset])
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    given |= {g[3:] for g in given if g.startswith("no_")}
    for name in values:
        if name in given:
            values[name] = getattr(namespace, name)
    config = config_class(**values)
    config.preset = namespace.preset
    return config


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


def init_distributed() -> Dist:
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
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
            orders[epoch] = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(orders[epoch][offset]))
    return indices


# ----------------------------------------------------------------------------------------------
# Models and tokenizers. A hub id, a local save_pretrained folder, a GGUF file, or `tiny`.

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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
    eos, *extra = TINY_SPECIAL_TOKENS
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
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else \
        AutoTokenizer.from_pretrained(path)
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


def check_model_path(name_or_path: str):
    """Fail in a second, not after minutes, when a local model path does not exist."""
    path = os.path.expanduser(name_or_path)
    looks_like_hub_id = len(path.split("/")) == 2 and not path.startswith((".", "/"))
    if not os.path.exists(path) and not looks_like_hub_id:
        raise SystemExit(f"error: model {name_or_path!r} is neither a local path nor a hub id (org/name)")


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
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def autocast(d: Dist, bf16: bool):
    """Single-process runs have no FSDP mixed-precision policy: autocast does the same job."""
    enabled = bf16 and not d.enabled
    return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=enabled)


def set_gradient_sync(model, sync: bool):
    """Skip the reduce-scatter on all but the last micro-batch of a gradient-accumulation step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def clip_grad_norm(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


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
    """The engine's log-probs laid out like token_logprobs' output (position t predicts token t+1)."""
    out = torch.zeros((len(logprobs), width - 1), device=device)
    for row, (lp, start) in enumerate(zip(logprobs, prompt_lengths)):
        out[row, start - 1:start - 1 + len(lp)] = torch.tensor(lp)
    return out


def token_logprobs(model, input_ids, completion_mask, temperature: float, with_entropy=False):
    """log pi(o_t | q, o_<t) of each completion token at the sampling temperature (and entropy),
    on rows packed by pack()."""
    logits = model(input_ids=input_ids).logits[:, :-1].float() / temperature
    targets = input_ids[:, 1:]
    logsumexp = torch.logsumexp(logits, dim=-1)
    logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = logsumexp - (torch.softmax(logits, -1) * logits).sum(-1)
    return logp * completion_mask[:, 1:], entropy


def prepare_prompts(problems, tokenizer, template: str, max_prompt_length: int, d: Dist, who: str):
    """Format and tokenize every prompt once; prompts over the length budget are left out, and said so."""
    import data

    prompts = [data.format_prompt(p["prompt"], tokenizer, template) for p in problems]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= max_prompt_length]
    if d.is_main and len(keep) < len(problems):
        print(f"{who}: left out {len(problems) - len(keep)} of {len(problems)} prompts longer than "
              f"{max_prompt_length} tokens")
    return [problems[i] for i in keep], [prompts[i] for i in keep], [prompt_ids[i] for i in keep]


def log_rollouts(step: int, completions, owners, scores: dict, problems, prompts, reward_names, group_size: int,
                 prompts_per_step: int, output_dir, log_completions_steps: int, d: Dist) -> dict:
    """The rollout half of an RL step's metrics (rewards, accuracy, lengths) over all ranks, plus
    two files on rank 0: trajectories.jsonl (for lim.py: per prompt and epoch, how many of its
    group were right) and, every log_completions_steps, a sample of completions.jsonl."""
    gathered = all_gather_objects({"scores": scores, "owners": owners, "lengths": [len(c.token_ids) for c in completions],
                                   "truncated": [c.finish_reason == "length" for c in completions]}, d)
    every = lambda key: [x for part in gathered for x in part[key]]
    column = lambda name: [x for part in gathered for x in part["scores"][name]]
    lengths = every("lengths")
    metrics = {}
    for name in list(reward_names) + ["total"]:
        metrics[f"reward/{name}"] = float(np.mean(column(name)))
        metrics[f"reward/{name}_std"] = float(np.std(column(name), ddof=1)) if len(lengths) > 1 else 0.0
    metrics |= {"accuracy": float(np.mean(column("correct"))), "response_length_mean": float(np.mean(lengths)),
                "response_length_max": max(lengths), "truncated_frac": float(np.mean(every("truncated"))),
                "epoch": (step + 1) * prompts_per_step / len(problems)}
    if d.is_main:
        all_owners, correct = every("owners"), column("correct")
        with open(Path(output_dir) / "trajectories.jsonl", "a") as f:
            for g in range(0, len(all_owners), group_size):
                f.write(json.dumps({"step": step + 1, "id": problems[all_owners[g]]["id"],
                                    "epoch": (step * prompts_per_step + g // group_size) // len(problems),
                                    "correct": sum(correct[g:g + group_size]), "n": group_size}) + "\n")
        if log_completions_steps and (step + 1) % log_completions_steps == 0:
            with open(Path(output_dir) / "completions.jsonl", "a") as f:
                for c, i, r in list(zip(completions, owners, scores["total"]))[:group_size]:
                    f.write(json.dumps({"step": step + 1, "prompt": prompts[i], "completion": c.text,
                                        "answer": problems[i]["answer"], "reward": r}) + "\n")
    return metrics


# ----------------------------------------------------------------------------------------------
# Checkpoints. `D/checkpoint-N/` is a save_pretrained folder (transformers and vLLM load it as it
# is) plus `trainer_state.pt` (optimizer, scheduler, step, data position, each rank's RNG). It is
# written under a temporary name and renamed when complete, so a crash mid-write never leaves a
# folder that looks finished.


def full_model_state(model, d: Dist) -> dict:
    """The whole state dict in fp32 on CPU, gathered on rank 0 (other ranks get an empty dict)."""
    if not d.enabled:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_pretrained(model, tokenizer, path, d: Dist, state=None):
    state = full_model_state(model, d) if state is None else state
    if d.is_main:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)
    barrier(d)


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
                    trainer_state: dict, d: Dist, extra_models: dict | None = None):
    """Everything needed to continue as if never stopped. `optimizers`/`schedulers` are by name."""
    output_dir = Path(output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".partial-checkpoint-{step}"
    if d.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    barrier(d)
    save_pretrained(model, tokenizer, partial, d)
    for name, extra in (extra_models or {}).items():  # e.g. PPO's critic
        extra_state = full_model_state(extra, d)
        if d.is_main:
            torch.save(extra_state, partial / f"{name}.pt")
    optimizer_states = {name: _full_optimizer_state(model_of, opt, d)
                        for name, (model_of, opt) in optimizers.items()}
    rng_states = all_gather_objects(rng_state(), d)
    if d.is_main:
        torch.save({"step": step, "optimizers": optimizer_states,
                    "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                    "trainer": trainer_state, "rng": rng_states, "world_size": d.world_size},
                   partial / "trainer_state.pt")
        os.replace(partial, final)  # atomic: the folder appears complete or not at all
    barrier(d)


def _full_optimizer_state(model, optimizer, d: Dist):
    if not d.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete checkpoint; partial ones (temporary names) are never considered."""
    candidates = [Path(p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
                  if (Path(p) / "trainer_state.pt").exists()]
    return max(candidates, key=lambda p: int(p.name.split("-")[-1]), default=None)


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", weights_only=False)


def restore_checkpoint(state: dict, optimizers: dict, schedulers: dict, d: Dist):
    """Optimizer, scheduler and RNG state; model weights come from loading the checkpoint folder."""
    if state["world_size"] != d.world_size:
        raise SystemExit(f"error: checkpoint was written by {state['world_size']} ranks, "
                         f"this run has {d.world_size}; exact resume needs the same number")
    for name, (model, optimizer) in optimizers.items():
        saved = state["optimizers"][name]
        if d.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, saved,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved)
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(state["schedulers"][name])
    set_rng_state(state["rng"][d.rank])
    return state["trainer"]


def finish(output_dir, model, tokenizer, d: Dist):
    """The final model at the root of the output dir, loadable by transformers and vLLM."""
    save_pretrained(model, tokenizer, output_dir, d)


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
        elif report_to not in ("", "none"):
            raise SystemExit(f"error: --report-to must be none, wandb or tensorboard, not {report_to!r}")

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
    if torch.is_tensor(value):
        return value.item()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def truncate_jsonl_after(path, step: int, d: Dist):
    """On resume, drop the lines of steps the resumed run will redo, so logs hold each step once."""
    path = Path(path)
    if d.is_main and path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))
