"""mathrl/lora.py: h = W x + (alpha / r) B A x on a tiny Qwen2, its merge, its peft-format files, FSDP2."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mathrl import distributed, lora, memplan, models

SIZES = dict(hidden_size=32, num_layers=2, num_heads=2)
TOKENS = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def randomise_b(model, seed=1, std=0.1):
    """B = 0 hides every mistake but the base path's: give B values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * std)


def adapted(seed=0, rank=4, alpha=8.0, targets=lora.TARGETS, random_b=True):
    model, _ = models.build_tiny_model(**SIZES)
    model.eval()
    lora.apply_lora(model, rank, alpha, targets, dropout=0.0, seed=seed)
    if random_b:
        randomise_b(model)
    return model


def base():
    return models.build_tiny_model(**SIZES)[0].eval()


def test_step_zero_is_the_base_model_exactly():
    model = adapted(random_b=False)
    assert len(lora.lora_modules(model)) == 2 * 7
    assert torch.equal(logits(model), logits(base()))
    a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert a.abs().max().item() > 0 and a.abs().max().item() <= 1 / a.shape[1] ** 0.5  # U(+-1/sqrt(in))


def test_forward_is_w_x_plus_scaled_b_a_x():
    linear = torch.nn.Linear(8, 6)
    layer = lora.LoRALinear(linear, rank=3, alpha=6.0, dropout=0.0,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 8)
    a, b, w = layer.lora_A.weight, layer.lora_B.weight, linear.weight
    expected = x @ w.T + linear.bias + (6.0 / 3) * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert layer.weight is linear.weight and layer.bias is linear.bias  # the base names keep their tensors


def test_dropout_acts_on_the_adapter_input_only():
    linear = torch.nn.Linear(8, 6)
    layer = lora.LoRALinear(linear, rank=3, alpha=6.0, dropout=0.5,
                            generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 8)
    assert torch.equal(layer.train()(x), linear(x))  # B = 0: dropout must not touch W x
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    torch.manual_seed(0)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5)  # the same draw as the layer's below
    torch.manual_seed(0)
    expected = linear(x) + 2.0 * layer.lora_B(layer.lora_A(x * mask))
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_merged_weights_give_the_adapted_logits_under_the_base_names():
    model = adapted()
    merged = lora.merged_state_dict(model)
    reference = base()
    assert set(merged) == set(reference.state_dict()) - {"lm_head.weight"}  # tied: the embedding
    reference.load_state_dict(merged, strict=False)
    assert not torch.equal(logits(model), logits(base()))
    torch.testing.assert_close(logits(reference), logits(model), atol=1e-5, rtol=0)


def test_adapters_disabled_is_the_base_model_exactly():
    model = adapted()
    before = logits(model)
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model), logits(base()))
    assert torch.equal(logits(model), before)  # switched back on


def test_only_the_adapters_train():
    model = adapted()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    trainable = {id(p) for p in lora.trainable_parameters(model)}
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == set(lora.adapter_state_names(model))
    assert {n for n, p in named.items() if p.grad is not None} == set(lora.adapter_state_names(model))
    assert all(named[n].grad.abs().sum() > 0 for n in lora.adapter_state_names(model))
    assert trainable == {id(named[n]) for n in lora.adapter_state_names(model)}
    # The trainers' gradient checkpointing (fsdp.shard_model: non-reentrant) reaches the adapters even
    # though no input of a checkpointed layer requires grad (the embeddings are frozen).
    checkpointed = adapted()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()(input_ids=TOKENS, labels=TOKENS).loss.backward()
    for n, p in checkpointed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, named[n].grad, atol=1e-6, rtol=1e-5, msg=n)
    shape = memplan.shape_from_config(model.config.to_dict())
    assert lora.adapter_parameter_count(shape, 4) == sum(p.numel() for p in lora.trainable_parameters(model))
    assert lora.adapter_parameter_count(shape, 4, "q,v") == 2 * 4 * (32 + 32 + 32 + 16)  # kv_dim 16


def test_target_names_and_bad_input():
    assert lora.check_targets("q,k,v,o,gate,up,down") == lora.TARGETS
    assert lora.check_targets(["q", "self_attn.o_proj", "q_proj"]) == ("q_proj", "self_attn.o_proj")
    only_q = adapted(targets="q")
    assert sorted(lora.lora_modules(only_q)) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert lora.adapter_config(only_q, "tiny")["target_modules"] == ["q_proj"]
    one_layer = adapted(targets="layers.1.self_attn.q_proj")  # peft must not wrap layer 0's q_proj too
    assert lora.adapter_config(one_layer, "tiny")["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    model, _ = models.build_tiny_model(**SIZES)
    with pytest.raises(ValueError, match=r"^--lora-targets: 'qq_proj' matches no nn.Linear module"):
        lora.apply_lora(model, 4, 8.0, "q,qq_proj")
    with pytest.raises(ValueError, match=r"'qq_proj' matches no nn.Linear module"):
        lora.check_targets_match(model.config, "q,qq_proj")  # on the meta device, no weights
    lora.check_targets_match(model.config, lora.TARGETS)
    with pytest.raises(ValueError, match=r"^--lora-rank 0: LoRA needs a rank >= 1$"):
        lora.apply_lora(model, 0, 8.0)
    with pytest.raises(ValueError, match=r"^--lora-alpha -1.0: must be > 0"):
        lora.apply_lora(model, 4, -1.0)
    with pytest.raises(ValueError, match=r"^--lora-targets 'q,': expected comma-separated"):
        lora.check_targets("q,")
    assert not lora.lora_modules(model)  # nothing was wrapped by the refused calls
    lora.apply_lora(model, 4, 8.0)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, 4, 8.0)


def test_save_adapter_is_what_peft_loads_and_merges(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a development dependency (requirements-cpu.txt)")
    model = adapted()
    lora.save_adapter(model, tmp_path / "adapter", "tiny", distributed.init_distributed())
    config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    assert (config.r, config.lora_alpha, config.peft_type) == (4, 8.0, peft.PeftType.LORA)
    peft_model = peft.PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-6, rtol=0)
    merged_by_peft = peft_model.merge_and_unload().state_dict()
    ours = lora.merged_state_dict(model)
    for name, tensor in ours.items():
        torch.testing.assert_close(merged_by_peft[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_load_adapter_round_trip_is_bit_exact(tmp_path):
    dist = distributed.init_distributed()
    model = adapted(seed=0)
    lora.save_adapter(model, tmp_path / "adapter", "tiny", dist)
    fresh = adapted(seed=7, random_b=False)
    lora.load_adapter(fresh, tmp_path / "adapter")
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(saved[n], loaded[n]) for n in lora.adapter_state_names(model))
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(ValueError, match=r"adapter r = 4, but the model's LoRA has 2"):
        lora.load_adapter(adapted(rank=2, alpha=4.0), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"adapter tensor '.*k_proj.lora_A.weight' is not in the model"):
        lora.load_adapter(adapted(targets="q,v,o,gate,up,down"), tmp_path / "adapter")


def test_two_rank_fsdp_step_on_the_adapters_equals_one_process(tmp_path):
    import lora_worker  # tests/ is on sys.path under pytest

    lora_worker.main(str(tmp_path / "one"))  # one process: this one (no RANK set, no process group)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "lora_worker.py")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    worker, str(tmp_path / "two")], cwd=ROOT, env=env, check=True)
    one, two = torch.load(tmp_path / "one" / "result.pt"), torch.load(tmp_path / "two" / "result.pt")
    assert one["with_grad"] == two["with_grad"] == sorted(n for n in one["with_grad"] if ".lora_" in n)
    moved = [k for k in one["merged"] if not torch.equal(one["merged"][k], one["before"][k])]
    assert len(moved) == 14 and all(k.endswith("_proj.weight") for k in moved)  # the 14 adapted layers only
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
    # SGD, not Adam: a step is lr x gradient, so 1 vs 2 ranks' summation order shows at float rounding
    # only (measured 1.5e-8 in the merged weights, whose entries are ~0.02-1).
    for k in one["merged"]:
        torch.testing.assert_close(one["merged"][k], two["merged"][k], atol=1e-6, rtol=0, msg=k)
    assert one["reload_equal"] and two["reload_equal"]  # load_adapter under FSDP2 restores the step's weights
    from safetensors.torch import load_file

    files = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("one", "two")]
    assert set(files[0]) == set(files[1])
    assert all(k.startswith("base_model.model.model.layers.") for k in files[0])
    for k in files[0]:
        torch.testing.assert_close(files[0][k], files[1][k], atol=1e-6, rtol=0, msg=k)
