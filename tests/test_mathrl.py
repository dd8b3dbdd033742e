"""The shared machinery (mathrl/): tiny model and tokenizer, data order, schedule, flags, checkpoints."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mathrl import checkpoints, distributed, flags, fsdp, models, sequences


def test_tiny_tokenizer_round_trips_text_after_reloading_from_disk(tmp_path):
    from transformers import AutoTokenizer

    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
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

    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path))
    assert type(loaded) is type(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert loaded.config.model_type == "qwen2"
    ids = torch.tensor([tokenizer("1 + 2 = 3", add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_batch_indices_cover_each_epoch_once_and_depend_only_on_step():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in sequences.batch_indices(step, batch, n, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    assert sequences.batch_indices(3, batch, n, seed=3) == stream[12:16]
    assert sequences.batch_indices(3, batch, n, seed=4) != stream[12:16]


def test_cosine_schedule_warms_up_then_decays_to_min_ratio():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = fsdp.cosine_schedule(optimizer, max_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
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
    assert flags.parse_args(_Flags, presets, []).lr == 1.0
    config = flags.parse_args(_Flags, presets, ["--preset", "p"])
    assert (config.lr, config.bf16) == (2.0, True)
    config = flags.parse_args(_Flags, presets, ["--preset", "p", "--lr", "3", "--no-bf16"])
    assert (config.lr, config.bf16, config.name) == (3.0, False, "a")
    config = flags.parse_args(_Flags, presets, ["--lr=5", "--preset=p"])
    assert config.lr == 5.0


def test_checkpoint_round_trip_and_partial_checkpoints_are_ignored(tmp_path):
    dist = distributed.init_distributed()
    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = fsdp.cosine_schedule(optimizer, 10, 0.0, 0.1)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    scheduler.step()
    torch.manual_seed(123)
    checkpoints.save_checkpoint(tmp_path, 1, model, tokenizer, {"m": (model, optimizer)}, {"m": scheduler}, {"step": 1}, dist)
    expected_random = torch.rand(3)
    (tmp_path / ".partial-checkpoint-2").mkdir()          # a crash mid-write
    (tmp_path / "checkpoint-3").mkdir()                   # a folder without trainer state
    latest = checkpoints.latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-1"

    reloaded = models.load_model(str(latest))
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    optimizer2 = torch.optim.AdamW(reloaded.parameters(), lr=1e-2)
    scheduler2 = fsdp.cosine_schedule(optimizer2, 10, 0.0, 0.1)
    torch.manual_seed(999)
    trainer = checkpoints.restore_checkpoint(checkpoints.load_trainer_state(latest), {"m": (reloaded, optimizer2)},
                                             {"m": scheduler2}, dist)
    assert trainer == {"step": 1}
    torch.testing.assert_close(torch.rand(3), expected_random)  # RNG restored
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    state_a, state_b = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    for key in state_a:
        torch.testing.assert_close(state_a[key]["exp_avg"], state_b[key]["exp_avg"])


def test_rope_override_is_computed_with_saved_and_reloaded(tmp_path):
    """--rope-theta / --max-position-embeddings change the model's config before it is built (so the logits
    change), and a save carries them: the reloaded model computes the same logits with no flag given."""
    from mathrl import models

    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    model.save_pretrained(tmp_path / "start")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 8])
    plain = models.load_model(str(tmp_path / "start"))
    extended = models.load_model(str(tmp_path / "start"), rope_theta=500_000.0, max_positions=4096)
    assert extended.config.rope_parameters["rope_theta"] == 500_000.0
    assert extended.config.max_position_embeddings == 4096
    with torch.no_grad():
        before, after = plain(ids).logits, extended(ids).logits
        assert (before - after).abs().max().item() > 1e-4   # the rotary embedding really changed
        extended.save_pretrained(tmp_path / "saved")
        reloaded = models.load_model(str(tmp_path / "saved"))
        assert reloaded.config.rope_parameters["rope_theta"] == 500_000.0
        torch.testing.assert_close(reloaded(ids).logits, after, atol=0, rtol=0)


def test_rope_override_on_a_model_without_rope_is_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from mathrl import models

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="--rope-theta: this gpt2 model has no rotary"):
        models.load_model(str(tmp_path), rope_theta=1e5)


def test_tools_model_folder_writes_a_folder_that_loads_and_refuses_to_overwrite_one(tmp_path):
    """tools/model_folder.py (models.save_model_folder) on a model folder: the copy computes the same
    logits, its tokenizer tokenises as the source's, and a second write into it is refused in one line."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import model_folder
    from conftest import save_tiny_model
    from mathrl import models

    source = save_tiny_model(tmp_path / "source", hidden_size=32, num_layers=1, num_heads=2)
    model_folder.main([str(source), str(tmp_path / "copy")])
    ids = torch.tensor([[3, 4, 5, 6]])
    a, b = (models.load_model(str(d)) for d in (source, tmp_path / "copy"))
    assert torch.equal(a(ids).logits, b(ids).logits)
    text = "Solve for x:\n2x + 1 = 7"
    assert models.load_tokenizer(str(tmp_path / "copy"))(text)["input_ids"] == \
        models.load_tokenizer(str(source))(text)["input_ids"]
    with pytest.raises(SystemExit, match="already holds a model"):
        model_folder.main([str(source), str(tmp_path / "copy")])
