"""Checkpoints: the model folder transformers loads, sharded trainer state (DCP), validation before
use, --save-total-limit, log truncation, and resuming on another number of ranks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mathrl import checkpoints, distributed, fsdp, logs, models

ROOT = Path(__file__).resolve().parents[1]
ONE = distributed.Dist(0, 1, 0, torch.device("cpu"))


def trained_tiny(steps=1):
    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = fsdp.cosine_schedule(optimizer, 10, 0.0, 0.1)
    for _ in range(steps):
        model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, tokenizer, optimizer, scheduler


def save(folder, step, model, tokenizer, optimizer, scheduler, **kwargs):
    checkpoints.save_checkpoint(folder, step, model, tokenizer, {"m": (model, optimizer)}, {"m": scheduler},
                                {"step": step}, ONE, **kwargs)


def all_tensors(folder) -> dict:
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("max_shard_bytes", [checkpoints.MAX_SHARD_BYTES, 40_000])
def test_model_folder_equals_save_pretrained_and_loads_in_transformers(tmp_path, max_shard_bytes):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, _, _ = trained_tiny()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    checkpoints.save_pretrained(model, tokenizer, tmp_path / "ours", ONE, max_shard_bytes=max_shard_bytes)

    ours, theirs = all_tensors(tmp_path / "ours"), all_tensors(tmp_path / "hf")
    assert ours.keys() == theirs.keys()                           # the tied lm_head is written once, as HF does
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    files = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    if max_shard_bytes == checkpoints.MAX_SHARD_BYTES:
        assert files == ["model.safetensors"]
    else:  # several files, each under the limit unless one tensor alone is larger, and the usual index
        assert len(files) > 2
        index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ours) and set(index["weight_map"].values()) == set(files)
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ours.values())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "hf" / name).read_text())

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name
    text = "2x + 3 = 7\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "ours")(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_checkpoint_round_trip_through_sharded_optimizer_state(tmp_path):
    model, tokenizer, optimizer, scheduler = trained_tiny(steps=2)
    torch.manual_seed(7)
    save(tmp_path, 2, model, tokenizer, optimizer, scheduler)
    expected_random = torch.rand(4)
    folder = tmp_path / "checkpoint-2"
    assert (folder / "optimizer" / ".metadata").is_file() and list((folder / "optimizer").glob("*.distcp"))
    assert checkpoints.checkpoint_problem(folder) is None
    assert (folder / "trainer_state.pt").stat().st_size < 100_000  # the Adam states are not in it

    reloaded = models.load_model(str(folder))
    optimizer2 = torch.optim.AdamW(reloaded.parameters(), lr=1e-2)
    scheduler2 = fsdp.cosine_schedule(optimizer2, 10, 0.0, 0.1)
    torch.manual_seed(0)
    state = checkpoints.load_trainer_state(folder)
    assert checkpoints.restore_checkpoint(state, {"m": (reloaded, optimizer2)}, {"m": scheduler2}, ONE) == {"step": 2}
    assert torch.equal(torch.rand(4), expected_random)                  # same world size: the exact stream
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(optimizer.state_dict()["state"].values(), optimizer2.state_dict()["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    for a, b in zip(model.parameters(), reloaded.parameters()):  # sizing the optimizer moved no weight
        assert torch.equal(a, b)


def test_an_optimizer_that_has_not_stepped_stays_fresh(tmp_path):
    """PPO's actor during the critic's warm-up: saving must not create Adam state for it (a step at
    lr 0 would count as Adam's first and change every later update), and resuming keeps it empty."""
    model, tokenizer, optimizer, scheduler = trained_tiny(steps=1)
    frozen, _, _, _ = trained_tiny(steps=0)
    frozen_optimizer = torch.optim.AdamW(frozen.parameters(), lr=1e-2)
    checkpoints.save_checkpoint(tmp_path, 1, model, tokenizer, {"m": (model, optimizer), "f": (frozen, frozen_optimizer)},
                                {"m": scheduler}, {"step": 1}, ONE)
    assert not frozen_optimizer.state
    fresh = torch.optim.AdamW(frozen.parameters(), lr=1e-2)
    checkpoints.restore_checkpoint(checkpoints.load_trainer_state(tmp_path / "checkpoint-1"),
                                   {"m": (model, torch.optim.AdamW(model.parameters())), "f": (frozen, fresh)},
                                   {"m": scheduler}, ONE)
    assert not fresh.state


DAMAGES = {
    "tokenizer.json": lambda f: (f / "tokenizer.json").unlink(),
    "model.safetensors": lambda f: os.truncate(f / "model.safetensors", 1000),
    "complete.json": lambda f: (f / "complete.json").unlink(),
    "__0_0.distcp": lambda f: (f / "optimizer" / "__0_0.distcp").unlink(),
    "config.json": lambda f: (f / "config.json").write_text("{}"),
}


@pytest.mark.parametrize("damaged", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capsys, damaged):
    model, tokenizer, optimizer, scheduler = trained_tiny()
    for step in (2, 4):
        save(tmp_path, step, model, tokenizer, optimizer, scheduler)
    DAMAGES[damaged](tmp_path / "checkpoint-4")
    (tmp_path / ".partial-checkpoint-6").mkdir()           # a write cut short is never even looked at
    (tmp_path / "checkpoint-5").mkdir()                    # a folder that was never finished
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2 and "checkpoint-5: complete.json is missing" in warnings[0]
    assert "checkpoint-4" in warnings[1] and damaged in warnings[1], warnings


def test_save_total_limit_keeps_the_newest_complete_checkpoints(tmp_path):
    model, tokenizer, optimizer, scheduler = trained_tiny()
    for step in range(1, 6):
        save(tmp_path / "two", step, model, tokenizer, optimizer, scheduler, save_total_limit=2)
        save(tmp_path / "all", step, model, tokenizer, optimizer, scheduler)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert len(checkpoints.complete_checkpoints(tmp_path / "all")) == 5
    # a damaged folder older than every kept checkpoint can never be resumed from: rotation removes it too
    DAMAGES["tokenizer.json"](tmp_path / "two" / "checkpoint-5")
    (tmp_path / "two" / "checkpoint-3").mkdir()          # a deletion cut short, marker already gone
    for step in (6, 7):
        save(tmp_path / "two", step, model, tokenizer, optimizer, scheduler, save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint-6", "checkpoint-7"]


def test_logs_keep_each_step_once_and_lose_a_torn_last_line(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')      # killed mid-write
    logs.truncate_logs(tmp_path, 2, ONE)                     # resumed from checkpoint-2
    assert log.read_text().splitlines() == lines[:2]
    assert "dropped 1 unreadable line" in capsys.readouterr().err
    logs.truncate_logs(tmp_path, 0, ONE)                     # a fresh start: an earlier attempt's lines go
    assert log.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def run(args, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run(launcher + args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                          capture_output=True, text=True)


def test_a_two_rank_checkpoint_resumes_on_one_and_on_four_ranks(tmp_path):
    args = ["sft.py", "--preset", "tiny", "--max-steps", "4", "--save-steps", "2", "--batch-size", "8",
            "--micro-batch-size", "2"]
    run(args + ["--output-dir", str(tmp_path / "two")], nproc=2)
    checkpoint = tmp_path / "two" / "checkpoint-2"
    shards = sorted((checkpoint / "optimizer").glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]    # each rank wrote its own half
    assert max(p.stat().st_size for p in shards) < 0.7 * sum(p.stat().st_size for p in shards)
    two = all_tensors(tmp_path / "two")
    at_checkpoint = all_tensors(checkpoint)

    for ranks in (1, 4):
        folder = tmp_path / f"on-{ranks}"
        shutil.copytree(tmp_path / "two", folder)
        out = run(args + ["--output-dir", str(folder)], nproc=ranks).stdout
        assert f"resumed from {folder / 'checkpoint-2'} at step 2" in out
        assert f"written by 2 rank(s), this run has {ranks}: optimizer state resharded" in out
        resumed = all_tensors(folder)
        assert max((resumed[k] - at_checkpoint[k]).abs().max().item() for k in two) > 1e-4   # it trained on
        # the same steps 3 and 4 on another number of ranks: equal up to summation order (measured < 1e-7)
        assert max((resumed[k] - two[k]).abs().max().item() for k in two) < 2e-5, ranks
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
