"""LoRA (Hu et al. 2021, arXiv:2106.09685): train a low-rank update of chosen linear layers, the base
weights frozen. A target layer y = W x + b becomes

    h = W x + b + (alpha / r) B A x        A: [r, in], B: [out, r], r << min(in, out)

with A ~ kaiming-uniform(a = sqrt(5)) (nn.Linear's own init: U(-1/sqrt(in), 1/sqrt(in))) and B = 0, as
peft initialises it (peft 0.21.2, tuners/lora/layer.py:332-343, reset_lora_parameters): at step 0
B A = 0 and the model is exactly the base model. Dropout acts on the adapter's input only, as in
peft's Linear.forward (layer.py:1102): lora_B(lora_A(dropout(x))) * scaling.

What the trainers get from it:
- the optimizer runs over trainable_parameters(model), the adapters only;
- the reference policy is the same model inside `with adapters_disabled(model):`, no second copy;
- merged_tensors(model) streams W + (alpha / r) B A one tensor at a time, in the base model's own
  names, for the engine's push path and for the final save_pretrained model;
- save_adapter / load_adapter write and read peft's adapter folder (adapter_model.safetensors,
  adapter_config.json), which peft.PeftModel.from_pretrained and vLLM's LoRA loader accept.

Names. A wrapped layer keeps its `weight` and `bias` Parameters under their own names (the same
Parameter objects), and adds submodules lora_A and lora_B (Linear layers without bias). The model's
state dict therefore holds the base names unchanged plus `<module>.lora_A.weight` and
`<module>.lora_B.weight`; peft saves exactly these with the prefix `base_model.model.`
(peft's PeftModel.base_model is a LoraModel whose .model is the transformers model; save_and_load.py
drops the adapter name "default" from `lora_A.default.weight`). vLLM strips that prefix again
(vllm/lora/utils.py, parse_fine_tuned_lora_name).

Under FSDP2 apply_lora comes first, on the whole model on every rank (same seed, same A everywhere),
then fsdp.shard_model: the adapters are sharded with their decoder layer. Every function that reads
the weights gathers each DTensor with full_tensor(), a collective: all ranks must call it together.
"""
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mathrl.checkpoints import WRITE_ERRORS, _agree_all_wrote, _saved_tensor_names
from mathrl.distributed import Dist

# The attention and MLP projections of the Qwen2/Llama family, the default; the short
# spellings are those of the --lora-targets flag.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT_NAMES = {name.removesuffix("_proj"): name for name in TARGETS}
PEFT_PREFIX = "base_model.model."  # peft's name for the transformers model inside a PeftModel


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable update (alpha / r) B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and storage unchanged
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # drawn on the CPU (the generator's device), then moved beside W
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, dtype=base.weight.dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5, generator=generator)
            nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.device)
        self.lora_B.to(base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.enabled = True  # False: the base layer alone (adapters_disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # W x + b, exactly nn.Linear's forward
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def check_targets(names) -> tuple[str, ...]:
    """--lora-targets, a comma-separated string or a list, into module names: "q" -> "q_proj" etc.
    Any other name is kept as written (a module's name or its last dotted parts, peft's rule)."""
    if isinstance(names, str):
        names = names.split(",")
    names = [name.strip() for name in names]
    if not names or any(not name for name in names):
        raise ValueError(f"--lora-targets {','.join(names)!r}: expected comma-separated module names "
                         f"such as q,k,v,o,gate,up,down")
    return tuple(dict.fromkeys(SHORT_NAMES.get(name, name) for name in names))  # in order, once each


def check_config(rank: int, alpha: float, dropout: float):
    """The numbers, before any model loads. (rank 0 = LoRA off is the trainers' flag rule, not here.)"""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank {rank!r}: LoRA needs a rank >= 1")
    if not alpha > 0:  # `not >` also refuses NaN
        raise ValueError(f"--lora-alpha {alpha!r}: must be > 0 (the update is scaled by alpha / rank)")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora-dropout {dropout!r}: must be in [0, 1)")


def settings(cfg, architecture) -> tuple[float, tuple[str, ...]]:
    """(alpha, targets) of a trainer's --lora-* flags, checked against the model's config (no weights
    load): alpha 0 means alpha = rank (see flags.TrainFlags). Raises ValueError naming the flag."""
    alpha = cfg.lora_alpha or float(cfg.lora_rank)
    check_config(cfg.lora_rank, alpha, cfg.lora_dropout)
    targets = check_targets(cfg.lora_targets)
    check_targets_match(architecture, targets)
    return alpha, targets


def checked_flags(cfg, checkpoint) -> tuple[float | None, tuple[str, ...] | None]:
    """The RL trainers' LoRA checks, as one line each (SystemExit): the checkpoint to resume is of the same
    kind, and the flags fit --model's architecture (its config.json only). (alpha, targets); None, None
    without LoRA."""
    check_checkpoint_kind(checkpoint, cfg.lora_rank)
    if not cfg.lora_rank:
        return None, None
    from transformers import AutoConfig

    try:
        return settings(cfg, AutoConfig.from_pretrained(cfg.model))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def check_checkpoint_kind(checkpoint, rank: int):
    """A LoRA checkpoint (an adapter/ folder) resumes only with LoRA on, a full one only with it off."""
    if checkpoint is not None and (Path(checkpoint) / "adapter").is_dir() != bool(rank):
        raise SystemExit(f"error: {checkpoint} is a {'LoRA' if rank == 0 else 'full'} checkpoint; "
                         f"resume it with the --lora-rank it was written with, or use another --output-dir")


def matching_linears(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """The nn.Linear modules a target names: the module's full name is the target, or ends with
    "." + target (peft's rule for a list of target_modules, tuners_utils.py:2372-2376).
    Raises naming the first target that matches none."""
    targets = check_targets(targets)
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}
    ends = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in found):
            raise ValueError(f"--lora-targets: {target!r} matches no nn.Linear module of the model "
                             f"(its linear layers end in: {', '.join(sorted(ends))})")
    return found


def check_targets_match(config, targets):
    """The target check without loading any weights: the architecture built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        matching_linears(AutoModelForCausalLM.from_config(config), targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS, dropout: float = 0.0,
               seed: int = 0) -> nn.Module:
    """Wrap every target Linear in place, freeze everything else. A comes from its own generator
    (seed), so every rank draws the same A and the caller's random stream does not move."""
    check_config(rank, alpha, dropout)
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    found = matching_linears(model, targets)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in found.items():  # named_modules' order: the same on every rank
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, rank, alpha, dropout, generator))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer updates: A and B of every adapter, nothing else."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def adapter_parameter_count(shape, rank: int, targets=TARGETS) -> int:
    """r (in + out) per adapted layer, from a memplan.Shape: the trainable parameters of apply_lora."""
    kv, h, i = shape.kv_dim, shape.hidden, shape.intermediate
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    targets = check_targets(targets)
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise ValueError(f"--lora-targets {unknown[0]!r}: the memory plan knows only {', '.join(TARGETS)}")
    return shape.layers * sum(rank * sum(dims[t]) for t in targets)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every LoRALinear computes W x + b alone. The reference policy of the RL
    trainers with LoRA is the policy inside this block."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard (DTensor) all-gathered; a plain tensor as it is."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def merged_tensors(model: nn.Module):
    """(name, tensor) of the base model, each tensor once under its first name (a tied lm_head is the
    embedding, skipped as save_pretrained and vLLM skip it), a target's weight merged:
    W' = W + (alpha / r) B A, computed in W's dtype. One full tensor alive at a time; every rank
    walks the same names in state_dict order and gathers the same tensors (collectives)."""
    modules = lora_modules(model)
    state = model.state_dict()
    adapter_names = set(adapter_state_names(model))
    for name in _saved_tensor_names(model, state):
        if name in adapter_names:
            continue
        tensor = _full(state[name])
        prefix = name.removesuffix(".weight")
        module = modules.get(prefix) if name.endswith(".weight") else None
        if module is not None:
            a, b = _full(state[f"{prefix}.lora_A.weight"]), _full(state[f"{prefix}.lora_B.weight"])
            tensor = tensor + module.scale * (b.to(tensor.dtype) @ a.to(tensor.dtype))
        yield name, tensor


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """merged_tensors collected on CPU: for tests and small models."""
    return {name: tensor.to("cpu", copy=True) for name, tensor in merged_tensors(model)}


def adapter_state_names(model: nn.Module) -> list[str]:
    return [f"{name}.lora_{ab}.weight" for name in lora_modules(model) for ab in "AB"]


def adapter_config(model: nn.Module, base_model_name: str) -> dict:
    """peft's adapter_config.json for this model's adapters: one rank, alpha and dropout for all.
    target_modules are the wrapped layers' last names (q_proj...) when these name no other Linear,
    else the full names: peft wraps exactly the modules listed (tuners_utils.py:2372-2376)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    first = next(iter(modules.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    suffixes = {name.rsplit(".", 1)[-1] for name in modules}
    unwrapped = [name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in suffixes]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout,
            "target_modules": sorted(modules if unwrapped else suffixes),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}


def save_adapter(model: nn.Module, folder, base_model_name: str, dist: Dist):
    """peft's adapter folder: adapter_model.safetensors (base_model.model.<module>.lora_A.weight,
    .lora_B.weight) and adapter_config.json. Every rank gathers, rank 0 writes; raises
    CheckpointWriteError on every rank if the write fails."""
    from safetensors.torch import save_file

    folder, state = Path(folder), model.state_dict()
    tensors = {PEFT_PREFIX + name: _full(state[name]).to("cpu").contiguous()
               for name in adapter_state_names(model)}
    error = None
    if dist.is_main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
            config = adapter_config(model, base_model_name)
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        except WRITE_ERRORS as e:
            error = e
    _agree_all_wrote(error, dist, folder)


def load_adapter(model: nn.Module, folder):
    """Copy a save_adapter folder's A and B into the model's adapters, bit for bit. The folder must
    hold exactly this model's adapters with the same rank and alpha; under FSDP2 each rank keeps
    its shard of every tensor."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    mine = adapter_config(model, config.get("base_model_name_or_path"))
    for key in ("r", "lora_alpha"):
        if config.get(key) != mine[key]:
            raise ValueError(f"{folder}: adapter {key} = {config.get(key)}, "
                             f"but the model's LoRA has {mine[key]}")
    saved = {name.removeprefix(PEFT_PREFIX): tensor
             for name, tensor in load_file(folder / "adapter_model.safetensors").items()}
    names = adapter_state_names(model)
    if set(saved) != set(names):
        odd = sorted(set(saved) ^ set(names))[0]
        where = "not in the model" if odd in saved else "missing"
        raise ValueError(f"{folder}: adapter tensor {odd!r} is {where}")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            parameter, tensor = parameters[name], saved[name].to(parameters[name].dtype)
            if hasattr(parameter, "device_mesh"):  # a DTensor: this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor

                tensor = distribute_tensor(tensor.to(parameter.device), parameter.device_mesh,
                                           parameter.placements)
            parameter.copy_(tensor)
