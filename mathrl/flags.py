"""Flags: a dataclass of defaults, named presets on top, explicit flags on top of those.

A trainer's Config is a dataclass whose fields are declared with flag(): default, --help text, choices
and bounds in one place. The flags every trainer shares are TrainFlags (precision, memory, checkpoints,
logging, the memory plan); grpo.py and ppo.py add RLFlags (the engine, the grader, the cosine reward's
shape). parse_args builds argparse from the dataclass and checks every value before anything loads.
"""
import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

COUNT = dict(low=1)            # a number of things: at least one
FRACTION = dict(low=0, high=1)  # in [0, 1]
NON_NEGATIVE = dict(low=0)


def flag(default, help: str, choices=None, *, low=None, above=None, high=math.inf):
    """A Config field that is a command-line flag: its default, its --help text, its allowed values, and
    its range: at least `low`, or strictly more than `above`, and at most `high` (checked by check_flags)."""
    if low is not None and above is not None:
        raise ValueError("give a flag `low` or `above`, not both")
    bounds = (low, high, True) if low is not None else (above, high, False) if above is not None else None
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds})


@dataclasses.dataclass
class TrainFlags:
    """The flags every trainer (sft.py, grpo.py, ppo.py) shares that are not its algorithm: precision and
    memory, checkpoints, logging, the memory plan. A trainer's Config inherits them; its own fields come
    first in --help. Defaults are what a GPU run wants; the CPU presets (tiny) turn bf16 and
    gradient checkpointing off."""
    bf16: bool = flag(True, "bf16 compute (GPU); master weights stay fp32")
    gradient_checkpointing: bool = flag(True, "recompute activations in backward")
    logprob_chunk_size: int = flag(1024, "tokens whose full-vocabulary logits exist at once in the log-prob "
                                         "pass (memory: chunk x vocab x 16-24 bytes)", **COUNT)
    max_tokens_per_micro_batch: int = flag(0, "cut length-sorted rows into micro-batches of at most N padded "
                                              "tokens (rows x longest) instead of --micro-batch-size rows each "
                                              "(0: off); the step is the same, the memory flat", **NON_NEGATIVE)
    rope_theta: float = flag(0.0, "override the model's RoPE base (0: its own) in the trainer, the engine "
                                  "and every saved config (open-r1 ran Qwen2.5-Math-7B at 300000 for 32k)",
                             low=0)
    max_position_embeddings: int = flag(0, "override the model's max_position_embeddings (0: its own), as "
                                           "--rope-theta (open-r1: 32768)", low=0)
    save_total_limit: int = flag(0, "keep the newest N complete checkpoints, delete older ones (0: keep all)",
                                 **NON_NEGATIVE)
    dist_timeout_minutes: float = flag(30.0, "minutes a rank waits for the others in a collective (a "
                                             "checkpoint being written, a long generation) before the run "
                                             "aborts", above=0)
    report_to: str = flag("none", "none, wandb or tensorboard", ["none", "wandb", "tensorboard"])
    lr_schedule: str = flag("transformers", "how the warm-up and cosine of the learning rate are counted "
                                            "(mathrl/fsdp.py): transformers (the papers' trainers: lr 0 at "
                                            "step 1, ceil(warmup-ratio x steps) warm-up steps) or mathrl "
                                            "(the tiny presets': lr / warmup at step 1, round(...) steps)",
                            ["transformers", "mathrl"])
    dry_run: bool = flag(False, "print the per-GPU memory plan (mathrl/memplan.py) and exit: 0 if it fits, "
                                "1 if not")
    plan_gpus: int = flag(0, "GPUs the memory plan is for (0: this launch's ranks)", **NON_NEGATIVE)
    gpu_memory_gb: float = flag(80.0, "memory of one GPU for the memory plan, GiB", above=0)
    # LoRA (mathrl/lora.py): a low-rank update of the listed projections, the base weights frozen.
    lora_rank: int = flag(0, "LoRA rank r (0: off, full fine-tuning); ppo.py: the actor's, its critic is "
                              "trained in full", low=0)
    # alpha = r, a scale alpha / r of 1: peft's LoraConfig defaults (r=8, lora_alpha=8: peft 0.21.2
    # tuners/lora/config.py:632,652) and Unsloth's notebooks' (r=16, lora_alpha=16) both have this ratio.
    lora_alpha: float = flag(0.0, "LoRA alpha: the update is scaled by alpha / rank (0: alpha = rank, "
                                  "scale 1, as peft's and Unsloth's defaults)", low=0)
    lora_targets: str = flag("q,k,v,o,gate,up,down", "comma-separated Linear modules LoRA adapts "
                                                     "(q, k, v, o, gate, up, down are *_proj; any name)")
    lora_dropout: float = flag(0.0, "dropout on the LoRA adapters' input (peft's default 0)", low=0, high=1)


@dataclasses.dataclass
class RLFlags(TrainFlags):
    """The flags grpo.py and ppo.py share on top of TrainFlags: the cosine reward's shape, the engine, the
    grader, the completions log."""
    cosine_max_len: int = flag(1000, "cosine reward: the length where it reaches its END values "
                                     "(Open-RS: 1000; their Exp. 3: 3584)", **COUNT)
    cosine_unit: str = flag("chars", "cosine reward: length in characters of the completion (Open-RS) "
                                     "or in tokens", ["chars", "tokens"])
    cosine_clamp: bool = flag(False, "cosine reward: hold lengths past --cosine-max-len at END "
                                     "(Open-RS: no, the cosine turns back up)")
    cosine_correct: str = flag("1.0:0.5", "cosine reward of a right answer, START:END = at length 0 : "
                                          "at --cosine-max-len (Open-RS: 1.0:0.5)")
    cosine_wrong: str = flag("0.0:-0.5", "cosine reward of a wrong answer, START:END (Open-RS: 0.0:-0.5; "
                                         "a negative START needs =, as --cosine-wrong=-1:-0.5)")
    overlong_buffer: int = flag(0, "overlong reward: L_cache, the last tokens before --max-completion-length "
                                   "over which it falls linearly from 0 to -1 (DAPO: 4096 of 20480)", low=0)
    engine: str = flag("vllm", "generation engine: vllm or hf", ["vllm", "hf"])
    vllm_gpu_memory_utilization: float = flag(
        0.3, "GPU only: fraction of each GPU's memory the colocated vLLM engine takes while generating (its "
             "bf16 weights, activations, KV cache); it releases all of it during updates. A preset's value "
             "comes from the arithmetic beside it; on CPU see --vllm-cpu-kv-cache-gb", above=0, high=1)
    vllm_max_num_batched_tokens: int = flag(
        4096, "GPU only: tokens in one vLLM forward pass (prompt chunks + one per decoding sequence); sets "
              "the activation memory vLLM reserves (4096: TRL's colocate value)", **COUNT)
    vllm_cpu_kv_cache_gb: float = flag(0.5, "CPU only: each rank's vLLM KV cache, GiB (vLLM would otherwise "
                                            "size it from free RAM, every rank alike)", above=0)
    grader_workers: int = flag(4, "processes grading answers, each answer under a time limit", **COUNT)
    log_completions_steps: int = flag(10, "append a sample of completions to completions.jsonl every N steps "
                                          "(0: never)", **NON_NEGATIVE)


def shared_flag(base, name: str, default):
    """A field of `base` (TrainFlags, RLFlags) declared again with another default and the same help and
    bounds: a trainer whose default recipe needs it (grpo.py's vLLM share)."""
    return dataclasses.field(default=default, metadata=base.__dataclass_fields__[name].metadata)


def parse_args(config_class, presets: dict, argv=None, description: str = ""):
    """Build argparse from a dataclass whose fields carry `metadata={"help": ...}`; check the values.

    Precedence: dataclass default < preset < flag given on the command line. The preset is read by
    a first parse and becomes the parser's defaults, so argparse alone decides what was given.
    Abbreviations are off: `--max-st 3` is an error, never a flag silently taken for another.
    A preset whose every value is the dataclass default is named in --help as the defaults' recipe, and
    `--data NAME` without --preset, NAME a preset too, gets a note of what that preset would also set.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    default_recipe = [name for name, values in presets.items()
                      if all(defaults.get(k) == v for k, v in values.items())]
    preset_help = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                            for name, values in presets.items())
    preset_help = (f"Without one, the defaults are the {default_recipe[0]} preset's values. "
                   if default_recipe else "Without one, the defaults are none of the papers' recipes. ") \
        + preset_help
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # one line, like every other bad input (argparse would print the whole usage above it)
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help=f"a named bundle of flag values (flags given explicitly win). {preset_help}")
    own = list(config_class.__dict__.get("__annotations__", {}))  # the trainer's own flags first, in order
    for field in sorted(dataclasses.fields(config_class),
                        key=lambda f: (f.name not in own, own.index(f.name) if f.name in own else 0)):
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
    given = [a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)]
    data_preset = presets.get(config.data) if "--data" in given and config.preset is None else None
    differs = {k: v for k, v in (data_preset or {}).items() if getattr(config, k) != v}
    if differs and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: --data {config.data} gives the {config.data} problems only; --preset {config.data} "
              f"would also set " + ", ".join(f"{k}={v}" for k, v in differs.items()), file=sys.stderr)
    return config


def check_flags(config):
    """Every value in range, every float finite, the output folder usable: checked before anything
    loads, so a bad flag is one line naming it, never a traceback minutes later or NaN weights."""
    for field in dataclasses.fields(config):
        value, flag = getattr(config, field.name), "--" + field.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"error: {flag} must be a finite number, not {value}")
        low, high, low_allowed = field.metadata.get("bounds") or (None, None, None)
        if low is not None and not isinstance(value, bool):
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
    if getattr(config, "warmup_steps", 0) and config.lr_schedule == "mathrl":
        raise SystemExit("error: --warmup-steps needs --lr-schedule transformers (mathrl counts warm-up by "
                         "--warmup-ratio only)")
    lora_given = [f"--lora-{name}" for name, default in [("alpha", 0.0), ("dropout", 0.0),
                  ("targets", "q,k,v,o,gate,up,down")] if getattr(config, f"lora_{name}", default) != default]
    if getattr(config, "lora_rank", 0) == 0 and lora_given:
        raise SystemExit(f"error: {lora_given[0]} needs --lora-rank > 0 (0 is LoRA off)")
    if getattr(config, "engine", None) == "vllm" and str(getattr(config, "model", "")).endswith(".gguf"):
        raise SystemExit(f"error: --model {config.model!r} is a GGUF file; --engine vllm loads a model "
                         f"folder: make one with `python tools/model_folder.py {config.model} FOLDER` "
                         f"(or use --engine hf)")
