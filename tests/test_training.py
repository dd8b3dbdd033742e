"""The shared machinery: tiny model and tokenizer, data order, schedule, flags, checkpoints."""
import math
from dataclasses import dataclass, field

import pytest
import torch

import training


def test_tiny_tokenizer_round_trips_text_after_reloading_from_disk(tmp_path):
    from transformers import AutoTokenizer

    model, tokenizer = training.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Solve:\n  2x + 3y = 7\n x - y = 1\n\\boxed{(3, -2)}\t~ end.  "
    text = text.replace("\t", " ")  # the vocabulary is printable ASCII plus newline
    for tok in (tokenizer, reloaded):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert reloaded.eos_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert reloaded.pad_token_id is not None


def test_tiny_model_is_a_real_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = training.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = training.load_model(str(tmp_path))
    assert type(loaded) is type(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert loaded.config.model_type == "qwen2"
    ids = torch.tensor([tokenizer("1 + 2 = 3", add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_batch_indices_cover_each_epoch_once_and_depend_only_on_step():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in training.batch_indices(step, batch, n, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    assert training.batch_indices(3, batch, n, seed=3) == stream[12:16]
    assert training.batch_indices(3, batch, n, seed=4) != stream[12:16]


def test_cosine_schedule_warms_up_then_decays_to_min_ratio():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = training.cosine_schedule(optimizer, max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert min(lrs) >= 0.1 - 1e-9 and lrs[-1] == pytest.approx(0.1, abs=1e-3)


@dataclass
class _Flags:
    lr: float = field(default=1.0, metadata={"help": "learning rate"})
    name: str = field(default="a", metadata={"help": "a name"})
    bf16: bool = field(default=False, metadata={"help": "bf16"})


def test_flags_precedence_default_then_preset_then_command_line():
    presets = {"p": {"lr": 2.0, "bf16": True}}
    assert training.parse_args(_Flags, presets, []).lr == 1.0
    config = training.parse_args(_Flags, presets, ["--preset", "p"])
    assert (config.lr, config.bf16) == (2.0, True)
    config = training.parse_args(_Flags, presets, ["--preset", "p", "--lr", "3", "--no-bf16"])
    assert (config.lr, config.bf16, config.name) == (3.0, False, "a")
    config = training.parse_args(_Flags, presets, ["--lr=5", "--preset=p"])
    assert config.lr == 5.0


def test_checkpoint_round_trip_and_partial_checkpoints_are_ignored(tmp_path):
    d = training.init_distributed()
    model, tokenizer = training.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = training.cosine_schedule(optimizer, 10, 0.0, 0.1)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    torch.manual_seed(123)
    training.save_checkpoint(tmp_path, 1, model, tokenizer, {"m": (model, optimizer)}, {"m": scheduler}, {"step": 1}, d)
    expected_random = torch.rand(3)
    (tmp_path / ".partial-checkpoint-2").mkdir()          # a crash mid-write
    (tmp_path / "checkpoint-3").mkdir()                   # a folder without trainer state
    latest = training.latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-1"

    reloaded = training.load_model(str(latest))
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    optimizer2 = torch.optim.AdamW(reloaded.parameters(), lr=1e-2)
    scheduler2 = training.cosine_schedule(optimizer2, 10, 0.0, 0.1)
    torch.manual_seed(999)
    trainer = training.restore_checkpoint(training.load_trainer_state(latest), {"m": (reloaded, optimizer2)},
                                          {"m": scheduler2}, d)
    assert trainer == {"step": 1}
    torch.testing.assert_close(torch.rand(3), expected_random)  # RNG restored
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    state_a, state_b = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    for key in state_a:
        torch.testing.assert_close(state_a[key]["exp_avg"], state_b[key]["exp_avg"])



def test_trajectories_record_each_prompt_in_the_epoch_it_was_drawn_in_whatever_the_ranks(tmp_path):
    """lim.py reads per-epoch accuracy: a prompt logged under the wrong epoch has one epoch twice and
    one missing. grpo.rollout gives rank r's j-th group the position step * P + r + j * W; a step whose
    batch crosses an epoch boundary must log every prompt in the epoch batch_indices drew it in,
    whatever the number of ranks."""
    import json

    from engine import Completion

    problems = [{"id": f"p{i}", "answer": "1"} for i in range(10)]
    prompts_per_step, group_size, step = 4, 2, 2   # batch positions 8-11: epoch 0 ends at position 10
    batch = training.batch_indices(step, prompts_per_step, len(problems), seed=0)

    def logged_epochs(world_size, out):
        out.mkdir()
        groups = [training.Group(i, step * prompts_per_step + rank + j * world_size,
                                 [Completion([1, 2], "x", [0.0, 0.0], "stop")] * group_size,
                                 {name: [1.0] * group_size for name in ("correct", "total", "accuracy")})
                  for rank in range(world_size) for j, i in enumerate(batch[rank::world_size])]
        groups.sort(key=lambda g: g.position)
        training.log_groups(step, groups, problems, ["q"] * 10, ["accuracy"], prompts_per_step, out, 0,
                            training.Dist(0, world_size, 0, torch.device("cpu")))
        lines = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
        assert len(lines) == prompts_per_step
        return {line["id"]: line["epoch"] for line in lines}

    expected = {f"p{i}": (step * prompts_per_step + k) // len(problems) for k, i in enumerate(batch)}
    assert sorted(set(expected.values())) == [0, 1]   # the batch does cross the boundary
    assert logged_epochs(1, tmp_path / "one") == expected
    assert logged_epochs(2, tmp_path / "two") == expected