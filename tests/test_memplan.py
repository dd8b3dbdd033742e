"""memplan.py: the parameter counts are exact, the per-rank weight / gradient / Adam bytes equal what
FSDP holds on 1 and 2 ranks (measured by tools/bench/memory.py), and --dry-run's verdicts name the flag."""
import dataclasses
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import grpo
import sft
from mathrl import flags, memplan, models
from test_grpo import VocabWideTensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
memory_bench = importlib.import_module("memory")


def built_parameters(shape: memplan.Shape, critic=False) -> int:
    """Parameters of the transformers model of that shape, built on the meta device (no memory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied, num_labels=1)
    with torch.device("meta"):
        model = (Qwen2ForTokenClassification if critic else Qwen2ForCausalLM)(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(memplan.KNOWN_MODELS))
def test_parameter_counts_of_known_models_equal_the_built_models(name):
    shape = memplan.KNOWN_MODELS[name]
    assert shape.parameters() == built_parameters(shape)
    assert shape.critic_parameters() == built_parameters(shape, critic=True)


def test_known_sizes():
    assert memplan.KNOWN_MODELS["Qwen/Qwen2.5-32B-Instruct"].parameters() == 32_763_876_352
    assert memplan.KNOWN_MODELS["Qwen/Qwen2.5-Math-7B"].parameters() == 7_615_616_512
    assert memplan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"].parameters() == 1_543_714_304


def test_tiny_and_local_config_shapes(tmp_path):
    model, _ = models.build_tiny_model()
    assert memplan.model_shape("tiny").parameters() == sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)  # a local folder's config.json
    assert memplan.model_shape(str(tmp_path)) == memplan.model_shape("tiny")
    assert memplan.model_shape(str(tmp_path / "absent")) is None


TINY = "[64, 2, 4, 2, 128]"  # hidden, layers, heads, kv heads, intermediate: every dim splits over 2 ranks


@pytest.mark.parametrize("ranks", [1, 2])
def test_weights_gradients_and_adam_per_rank_equal_what_fsdp_holds(ranks):
    for variant in ("full", "lora"):  # LoRA: the frozen base's weights; gradients and Adam of the adapters
        measured = memory_bench.run(TINY, ranks, micro_batches=2, seq=64, vocab=1000, variant=variant)
        plan = memory_bench.planned(TINY, ranks, 2, 64, vocab=1000, variant=variant)
        assert len(measured) == ranks
        for rank in measured:
            assert rank["parameters"] == plan["parameters"]
            for what in ("weights", "gradients", "adam"):
                assert rank[what] == plan[what], (variant, what)


def plan_of(trainer, argv):
    module = importlib.import_module(trainer)
    cfg = flags.parse_args(module.Config, module.PRESETS, argv)
    return memplan.make_plan(trainer, cfg, cfg.plan_gpus, cfg.gpu_memory_gb)


def test_presets_fit_on_eight_80gb_gpus_and_sharding_divides_the_state():
    presets = [(trainer, name) for trainer in ("grpo", "ppo", "sft")
               for name in importlib.import_module(trainer).PRESETS if name != "tiny"]
    assert len(presets) >= 4
    for trainer, preset in presets:
        plans = {gpus: plan_of(trainer, ["--preset", preset, "--plan-gpus", str(gpus)]) for gpus in (1, 8)}
        assert plans[8].fits, (trainer, preset, plans[8].advice)
        state = {gpus: sum(size for phase, what, size in plan.rows if what.startswith(("weights", "Adam")))
                 for gpus, plan in plans.items()}
        assert state[1] == pytest.approx(8 * state[8], rel=1e-12)


def test_logprob_memory_stops_growing_at_the_chunk():
    shape = memplan.KNOWN_MODELS["Qwen/Qwen2.5-Math-7B"]
    sizes = [memplan.logprob_bytes(shape, tokens, 1024, 2) for tokens in (512, 1024, 4096, 16384)]
    assert sizes[0] == 512 * 152064 * 24 and sizes[1] == sizes[2] == sizes[3] == 1024 * 152064 * 24
    assert memplan.logprob_bytes(shape, 4096, None, 2) == 4 * sizes[1]  # unchunked grows with length


class PeakOfVocabularyWideTensors(VocabWideTensors):
    """tests/test_grpo.py's record of [n, V] tensors (V the vocabulary, parameters aside), also keeping the
    largest number of bytes those alive held at once."""

    def __init__(self, vocab: int, parameters):
        super().__init__(vocab, parameters)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        live = {id(s()): s().nbytes() for s in self.storages if s() is not None}
        self.peak = max(self.peak, sum(live.values()))
        return out


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("trainer", ["grpo", "sft"])
def test_the_logprob_term_holds_what_the_heads_keep_at_their_peak(trainer, bf16):
    """Forward and backward of one chunk of the trainers' real log-prob heads (grpo's at a temperature,
    sft's without), counting every live [n, V] tensor: the plan charges no less, and at most 10% more."""
    from mathrl import sequences

    model, _ = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    ids, completion_mask = sequences.pack([[5, 6, 7]], [list(range(8, 28))], 0, "cpu")
    counter = PeakOfVocabularyWideTensors(model.config.vocab_size, model.parameters())
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logp = (grpo.token_logprobs(model, ids, completion_mask, 0.7, 64)[0] if trainer == "grpo" else
                sequences.next_token_scores(model, ids, sft.log_softmax_at, 64)[0])
        logp.sum().backward()
    shape = memplan.model_shape("tiny")
    positions = ids.shape[1] - 1
    plan = memplan.logprob_bytes(shape, positions, 64, 2 if bf16 else 4, temperature=trainer == "grpo")
    assert 0.9 * plan <= counter.peak <= plan


def run_dry(trainer, argv, capsys):
    module = importlib.import_module(trainer)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv + ["--dry-run"])
    return exit_.value.code, capsys.readouterr().out


SEVEN_B = ["--model", "Qwen/Qwen2.5-Math-7B", "--plan-gpus", "8", "--micro-batch-size", "4", "--max-prompt-length",
           "512", "--max-completion-length", "3072", "--vllm-gpu-memory-utilization", "0.3"]
SFT_7B = ["--model", "Qwen/Qwen2.5-7B-Instruct", "--plan-gpus", "8", "--micro-batch-size", "1",
          "--max-length", "16384", "--bf16", "--gradient-checkpointing"]


def test_dry_run_exits_0_when_it_fits(capsys):
    code, out = run_dry("grpo", SEVEN_B + ["--logprob-chunk-size", "1024"], capsys)
    assert code == 0 and "Qwen/Qwen2.5-Math-7B (7.62B parameters), 8 GPU(s) x 80 GiB" in out
    assert "log-probs: 1024 tokens x 152064 vocabulary" in out and out.rstrip().endswith("fits")


@pytest.mark.parametrize("trainer, argv, flag", [
    ("grpo", SEVEN_B + ["--micro-batch-size", "64"], "--micro-batch-size"),
    ("grpo", SEVEN_B + ["--vllm-gpu-memory-utilization", "0.2"], "raise --vllm-gpu-memory-utilization"),
    ("grpo", SEVEN_B + ["--vllm-gpu-memory-utilization", "0.9"], "lower --vllm-gpu-memory-utilization"),
    ("grpo", SEVEN_B + ["--logprob-chunk-size", "16384", "--gpu-memory-gb", "40",
                        "--vllm-gpu-memory-utilization", "0.5"], "lower --logprob-chunk-size"),
    ("ppo", SEVEN_B + ["--plan-gpus", "2"], "--nproc_per_node"),
    ("sft", SFT_7B + ["--no-gradient-checkpointing"], "--gradient-checkpointing"),
    ("sft", SFT_7B + ["--max-length", "262144"], "shorten --max-length"),
    ("sft", SFT_7B + ["--gpu-memory-gb", "24"], "more GPUs than 8"),
])
def test_dry_run_of_a_config_that_does_not_fit_names_the_flag(trainer, argv, flag, capsys):
    code, out = run_dry(trainer, argv, capsys)
    assert code == 1 and "does NOT fit" in out and flag in out


def test_dry_run_of_an_unknown_model_says_so_in_one_line(tmp_path, capsys):
    code, _ = run_dry("sft", ["--model", str(tmp_path / "nowhere")], capsys)
    assert code.startswith("error: --dry-run: the shape of --model") and "\n" not in code


def test_real_runs_print_the_summary_on_gpus_only(capsys):
    cfg = flags.parse_args(importlib.import_module("sft").Config, {}, ["--model", "tiny"])
    on_gpu = SimpleNamespace(world_size=1, is_main=True, device=torch.device("cuda", 0))
    plan = memplan.report("sft", cfg, on_gpu)   # nothing touches the device: the plan is arithmetic
    out = capsys.readouterr().out
    assert plan.fits and out.startswith("memory plan: sft, tiny") and "--dry-run for the breakdown" in out
    assert memplan.report("sft", cfg, SimpleNamespace(world_size=1, is_main=True, device=torch.device("cpu"))) is None
    assert capsys.readouterr().out == ""   # a GPU budget means nothing on a CPU run


def one_qwen2_layer(shape: memplan.Shape, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=1,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.intermediate)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype).model


def layer_pass(model, tokens: int, dtype, autocast: bool, backward: bool):
    """One decoder layer's forward (and backward) on random hidden states, as the trainers run it; its
    input and the rotary cos and sin (computed once for all layers)."""
    x = torch.randn(1, tokens, model.config.hidden_size, dtype=torch.float32 if autocast else dtype,
                    requires_grad=True)
    positions = torch.arange(tokens)[None]
    rotary = model.rotary_emb(x, positions)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model.layers[0](x, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    out = out[0] if isinstance(out, tuple) else out
    if backward:
        out.backward(torch.ones_like(out))
    return [x, *rotary]


def saved_bytes(model, tokens: int, dtype, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in one layer's forward, less its inputs and weights."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        inputs = layer_pass(model, tokens, dtype, autocast, backward=False)
    for t in [*inputs, *model.parameters()]:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


LAYER = memplan.Shape(256, 1, 4, 2, 1024, 64, tied=True)


@pytest.mark.parametrize("dtype, fsdp", [(torch.bfloat16, True), (torch.float32, True),
                                         (torch.float32, False)])
def test_one_layer_activations_equal_what_a_qwen2_layer_saves(dtype, fsdp):
    """memplan's per-token bytes of one layer against the tensors a Qwen2DecoderLayer saves for backward:
    bf16 weights (FSDP's bf16 policy), fp32, and fp32 weights under bf16 autocast (one process). The
    difference between 256 and 128 tokens leaves out what does not grow with tokens (autocast's cached
    bf16 weights, counted by gathered_bytes, and a few small per-layer tensors)."""
    autocast = not fsdp
    model = one_qwen2_layer(LAYER, dtype)
    per_token = (saved_bytes(model, 256, dtype, autocast) - saved_bytes(model, 128, dtype, autocast)) / 128
    cb = 2 if dtype == torch.bfloat16 or autocast else 4
    assert memplan.layer_activation_bytes(LAYER, cb, fsdp) == pytest.approx(per_token, rel=0.01)


@pytest.mark.parametrize("intermediate", [1024, 4096])
def test_a_layers_backward_holds_one_intermediate_gradient_beside_its_saved_tensors(intermediate):
    """torch's MemTracker over one layer's forward and backward in bf16, 512 tokens: the peak, less the
    weights and their gradients and the saved tensors, is (intermediate + 2 hidden) x 2 B a token, the
    term activation_bytes charges beside the one layer's saved tensors and the final norm's."""
    from torch.distributed._tools.mem_tracker import MemTracker

    shape, tokens = dataclasses.replace(LAYER, intermediate=intermediate), 512
    model = one_qwen2_layer(shape, torch.bfloat16)
    saved = saved_bytes(model, tokens, torch.bfloat16, False)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        layer_pass(model, tokens, torch.bfloat16, False, backward=True)
    weights = sum(p.numel() * 2 for p in model.parameters())
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - 2 * weights
    extra = (memplan.activation_bytes(shape, tokens, 2, False)
             - tokens * memplan.layer_activation_bytes(shape, 2, True) - tokens * shape.hidden * (4 + 2))
    assert extra == tokens * (intermediate + 2 * shape.hidden) * 2
    assert peak - saved == pytest.approx(extra, rel=0.05)


def test_the_roots_reduce_scatter_is_its_own_moment_at_the_end_of_backward():
    shape = memplan.KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"]
    root = 2 * 152064 * 3584 + 3584   # untied embedding and LM head, final norm
    assert memplan.root_reduce_bytes(shape, 8, 2) == root * (2 + 4 + 4 / 8)
    assert root * 4 / memplan.GiB == pytest.approx(4.06, abs=0.01)   # the fp32 copy: ~4 GiB
    assert memplan.root_reduce_bytes(shape, 1, 2) == 0   # one process: no FSDP, nothing reduce-scattered
    plan = plan_of("sft", SFT_7B)
    size = {what: b for _, what, b in plan.rows}
    step = sum(size[w] for w in size if w.startswith(("gathered", "activations", "log-probs")))
    state = sum(b for phase, _, b in plan.rows if phase == "resident") + size["gradients, fp32, sharded"]
    assert plan.update_bytes == state + max(step, memplan.root_reduce_bytes(shape, 8, 2)) + 4 * memplan.GiB


def test_one_process_keeps_its_reference_in_fp32():
    """fsdp.frozen_dtype: bf16 only under FSDP; one process runs pi_ref's fp32 weights under autocast."""
    for gpus, dtype, size in ((1, "fp32", 4), (8, "bf16", 2 / 8)):
        plan = plan_of("grpo", ["--preset", "limo", "--plan-gpus", str(gpus)])
        [(what, bytes_)] = [(w, b) for _, w, b in plan.rows if w.startswith("reference")]
        assert dtype in what and bytes_ == size * memplan.KNOWN_MODELS["Qwen/Qwen2.5-Math-1.5B"].parameters()


@pytest.mark.parametrize("trainer, module, seq_flags", [
    ("grpo", grpo, ["--preset", "limo"]), ("sft", sft, ["--preset", "limo", "--max-length", "4096"])])
def test_a_token_budget_plans_the_budget_not_the_row_count(trainer, module, seq_flags):
    """With --max-tokens-per-micro-batch a micro-batch holds up to that many tokens whatever
    --micro-batch-size says: 16,384 tokens plan like 4 rows of 4,096."""
    plan = lambda *argv: memplan.make_plan(trainer, flags.parse_args(module.Config, module.PRESETS,
                                                                     [*seq_flags, *argv]), 8, 80)
    rows = lambda p: {what.split(" ")[0]: size for _, what, size in p.rows}
    budget, four_rows = plan("--max-tokens-per-micro-batch", "16384", "--micro-batch-size", "1"), \
        plan("--micro-batch-size", "4")
    assert budget.update_bytes == four_rows.update_bytes
    assert rows(budget)["activations"] == rows(four_rows)["activations"] > rows(plan("--micro-batch-size", "1"))[
        "activations"]
