"""Checkpoints. `D/checkpoint-N/` holds
  - the model as a save_pretrained folder (config, safetensors weights, tokenizer): transformers and
    vLLM load it as it is. PPO's critic is a second such folder, `critic/`. A LoRA run writes its
    adapters instead, peft's folder `adapter/` (the base is the starting model) beside the tokenizer;
  - `optimizer/`: the Adam states in torch.distributed.checkpoint's sharded format: each rank writes
    and reads only its own shard, and a checkpoint of N ranks loads on any number (DCP reshards);
  - `trainer_state.pt` (a few kB): step, schedulers, each rank's random state, the world size;
  - `complete.json`, written last: every file of the checkpoint with its size.
It is written as `.partial-checkpoint-N` and renamed when complete. A checkpoint is used only when
its marker is there and every file it lists is whole; the newest such one is resumed from.
"""
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from mathrl.distributed import (Dist, all_gather_objects, all_reduce_sum, barrier, rng_state, seed_everything,
                                set_rng_state, stop)

COMPLETE_MARKER = "complete.json"
# Rank 0 holds one weights file at a time while writing: 5 GB (transformers 4's default shard size)
# bounds its host memory whatever the model's size (a 7B model in fp32 is 7 files).
MAX_SHARD_BYTES = 5 * 2**30
WRITE_ERRORS = (OSError, SafetensorError)  # safetensors raises the latter for a full disk, not OSError


def full_model_state(model, dist: Dist) -> dict:
    """The whole state dict in fp32 on CPU, gathered on rank 0 (other ranks get an empty dict).
    For tests and small models only: checkpoints stream the weights instead (save_pretrained)."""
    if not dist.enabled:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class CheckpointWriteError(Exception):
    """A file of a checkpoint or model folder could not be written (e.g. the disk is full)."""


def _agree_all_wrote(error, dist: Dist, what):
    """Every rank learns whether any rank failed to write (rank 0 writes alone; the others must not
    carry on into the next collective as if it had worked, nor wait for it until the timeout)."""
    if all_reduce_sum(float(error is not None), dist).item() > 0:
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


def save_pretrained(model, tokenizer, path, dist: Dist, max_shard_bytes: int = MAX_SHARD_BYTES):
    """model.save_pretrained's folder, written one tensor at a time.

    Each tensor is gathered in full (under FSDP2 every rank holds 1/world_size of it) and only rank 0
    keeps it, until its weights file is written: rank 0 never holds more than one file's worth
    (max_shard_bytes), the other ranks one tensor. Several files come with the usual
    model.safetensors.index.json. Raises CheckpointWriteError on every rank if a write fails."""
    from mathrl import lora  # here, not above: lora imports this module

    path = Path(path)
    state = model.state_dict()  # under FSDP2: each rank's shards (DTensors); nothing is gathered here
    # A LoRA model is saved merged, W + (alpha / r) B A under the base names: the plain architecture
    # that transformers and vLLM load as it is. merged_tensors walks these same names in this order.
    adapter_names = set(lora.adapter_state_names(model))
    names = [name for name in _saved_tensor_names(model, state) if name not in adapter_names]
    merged = lora.merged_tensors(model) if adapter_names else None
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
            if merged is not None:
                merged_name, tensor = next(merged)  # gathered and merged (collectives)
                assert merged_name == name, (merged_name, name)
            else:
                tensor = state[name].detach()
                tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a collective
            if dist.is_main:
                tensors[name] = tensor.to("cpu").contiguous()
        if dist.is_main and error is None:
            try:
                path.mkdir(parents=True, exist_ok=True)
                save_file(tensors, path / file_name, metadata={"format": "pt"})
            except WRITE_ERRORS as e:
                error = e
        del tensors
    if dist.is_main and error is None:
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
        except WRITE_ERRORS as e:
            error = e
    _agree_all_wrote(error, dist, path)


def save_checkpoint(output_dir, step: int, model, tokenizer, optimizers: dict, schedulers: dict,
                    trainer_state: dict, dist: Dist, extra_models: dict | None = None,
                    save_total_limit: int = 0):
    """Everything needed to continue as if never stopped. `optimizers` = {name: (model, optimizer)},
    `schedulers` = {name: scheduler}, `extra_models` = {folder name: model} (PPO's critic).
    Keeps the newest `save_total_limit` complete checkpoints (0: all). A failed write (a full disk)
    removes the half-written folder and stops the run with one line; the previous checkpoint stays."""
    output_dir = Path(output_dir)
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f".partial-checkpoint-{step}"
    try:
        error = None
        if dist.is_main:
            try:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            except WRITE_ERRORS as e:
                error = e
        _agree_all_wrote(error, dist, partial)
        from mathrl import lora  # here, not above: lora imports this module

        adapters = bool(lora.lora_modules(model))
        if adapters:  # LoRA: the frozen base is the starting model; only A and B are the run's own
            lora.save_adapter(model, partial / "adapter", model.name_or_path, dist)
            if dist.is_main:
                try:
                    tokenizer.save_pretrained(partial)
                except WRITE_ERRORS as e:
                    error = e
            _agree_all_wrote(error, dist, partial)
        else:
            save_pretrained(model, tokenizer, partial, dist)
        for name, extra in (extra_models or {}).items():
            save_pretrained(extra, tokenizer, partial / name, dist)
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
        rng_states = all_gather_objects(rng_state(), dist)
        if dist.is_main:
            try:
                small_state = io.BytesIO()  # written by Python, so a full disk is an OSError that says so
                torch.save({"step": step, "world_size": dist.world_size, "trainer": trainer_state,
                            "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                            "optimizers": sorted(stepped), "rng": rng_states}, small_state)
                (partial / "trainer_state.pt").write_bytes(small_state.getvalue())
                model_folders = [*([] if adapters else [""]), *[f"{name}/" for name in extra_models or {}]]
                _write_marker(partial, step, dist.world_size, model_folders, ["adapter/"] if adapters else [])
                if final.exists():  # a damaged checkpoint of this step, skipped when this run resumed
                    shutil.rmtree(final)
                os.replace(partial, final)  # atomic: the folder appears complete or not at all
            except WRITE_ERRORS as e:
                error = e
        _agree_all_wrote(error, dist, final)
    except CheckpointWriteError as failure:
        if dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(output_dir, warn=False)
        kept = f"{previous} is intact" if previous else "there is no earlier checkpoint"
        stop(f"error: {failure}; the run stops here and {kept}: rerun the same command to resume from it",
             dist)
    if dist.is_main and save_total_limit > 0:
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
    barrier(dist)


@contextlib.contextmanager
def _quiet_without_process_group():
    """DCP warns at every save and load in one process that it assumes one process: it is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable")
        yield


def _write_marker(folder: Path, step: int, world_size: int, model_folders: list[str],
                  adapter_folders: list[str]):
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    marker = folder / f".{COMPLETE_MARKER}.tmp"
    with open(marker, "w") as f:
        json.dump({"step": step, "world_size": world_size, "models": model_folders,
                   "adapters": adapter_folders, "files": files}, f, indent=1)
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
        adapter_folders = list(marker.get("adapters", []))  # LoRA checkpoints (older markers: none)
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
    for prefix in adapter_folders:
        needed += [f"{prefix}adapter_config.json", f"{prefix}adapter_model.safetensors"]
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


def restore_checkpoint(state: dict, optimizers: dict, schedulers: dict, dist: Dist, seed: int = 0):
    """Optimizer, scheduler and RNG state; model weights come from loading the checkpoint folder.

    Each rank reads only its shard of the optimizer state, whatever the number of ranks that wrote
    it. On the same number of ranks each rank gets its own random state back, and the run continues
    exactly; on another number the streams are reseeded from (seed, step, rank), said in one line."""
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
    if state["world_size"] == dist.world_size:
        set_rng_state(state["rng"][dist.rank])
    else:
        entropy = np.random.SeedSequence([seed, state["step"], dist.rank]).generate_state(1)[0]
        seed_everything(int(entropy))
        if dist.is_main:
            print(f"resume: {state['checkpoint']} was written by {state['world_size']} rank(s), this run has "
                  f"{dist.world_size}: optimizer state resharded; random streams reseeded from (seed {seed}, "
                  f"step {state['step']}, rank), so sampling differs from an uninterrupted run")
    return state["trainer"]


def finish(output_dir, model, tokenizer, dist: Dist):
    """The final model at the root of the output dir, loadable by transformers and vLLM. A LoRA model
    is saved merged, and its adapters beside it in peft's folder `adapter/` (for peft and vLLM's LoRA)."""
    from mathrl import lora  # here, not above: lora imports this module

    try:
        save_pretrained(model, tokenizer, output_dir, dist)
        if lora.lora_modules(model):
            lora.save_adapter(model, Path(output_dir) / "adapter", model.name_or_path, dist)
    except CheckpointWriteError as failure:
        stop(f"error: {failure}", dist)
