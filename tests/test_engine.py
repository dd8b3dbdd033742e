"""The generation engine: both backends return well-formed completions, agree with each other and
with a teacher-forced forward pass of the transformers model, and vLLM follows the trainer's
weights after push_weights (and visibly does not without it)."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mathrl.engine import (MAX_NUM_SEQS, HFEngine, Sampling, VLLMEngine, cpu_kv_cache_bytes,
                           kv_bytes_per_token, make_engine, rank_stream, stop_token_ids, trainer_engine)
from mathrl.distributed import Dist
from mathrl.models import build_tiny_model

SINGLE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SHORT_PROMPTS = ["Hi", "Solve 2x+3=7.\n", "abc"]
LONG_PROMPT = "Solve for x: 3x + 5 = 20, then check the answer. " * 4  # 200 tokens, > one KV block


def perturb(model, scale: float, seed: int):
    """Random-init logits are nearly uniform; noise makes greedy paths and log-probs non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # head_dim 128/4 = 32: vLLM's CPU attention kernels reject smaller heads (e.g. 16).
    model, tokenizer = build_tiny_model(num_layers=2)
    perturb(model, 0.3, seed=1).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, str(path)


@pytest.fixture(scope="module")
def vllm_engine(tiny):
    pytest.importorskip("vllm")
    model, tokenizer, path = tiny
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    # float32: with dtype "auto" vLLM on CPU casts a float32 checkpoint to bfloat16.
    engine = VLLMEngine(path, tokenizer, SINGLE, dtype="float32", max_model_len=512,
                        kv_cache_memory_bytes=32 << 20)
    # vLLM reseeds the global RNG on start; a resumed run's restored RNG state must survive it.
    assert torch.equal(torch.get_rng_state(), rng_before)
    return engine


def teacher_forced_logprobs(model, tokenizer, prompt: str, token_ids: list[int], temperature: float = 1.0):
    """log_softmax(logits / T) of each generated token, from one forward pass over prompt + completion."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1:-1].float()
    logprobs = (logits / temperature).log_softmax(-1)
    return logprobs, logprobs.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)


def greedy(engine, prompts, max_new_tokens=24):
    return [samples[0] for samples in engine.generate(prompts, Sampling(temperature=0, max_new_tokens=max_new_tokens))]


def assert_same_greedy(reference, other):
    for a, b in zip(reference, other):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def check_well_formed(completions, tokenizer, stop_ids, max_new_tokens):
    for c in completions:
        assert len(c.token_ids) == len(c.logprobs) > 0
        assert all(lp <= 1e-6 for lp in c.logprobs)
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert not any(t in stop_ids for t in c.token_ids[:-1])  # nothing generated past an EOS
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stop_ids
        else:
            assert c.finish_reason == "length"
            assert c.token_ids[-1] not in stop_ids and len(c.token_ids) == max_new_tokens


# ----------------------------------------------------------------------------------------------
# Both engines


@pytest.fixture(params=["hf", "vllm"])
def engine(request, tiny):
    model, tokenizer, path = tiny
    if request.param == "hf":
        return HFEngine(model, tokenizer, SINGLE)
    return request.getfixturevalue("vllm_engine")


def test_completions_are_well_formed(engine, tiny):
    _, tokenizer, _ = tiny
    sampling = Sampling(n=16, temperature=1.5, max_new_tokens=24)
    torch.manual_seed(0)
    out = engine.generate(SHORT_PROMPTS, sampling)
    assert [len(samples) for samples in out] == [16] * len(SHORT_PROMPTS)
    completions = [c for samples in out for c in samples]
    check_well_formed(completions, tokenizer, [tokenizer.eos_token_id], sampling.max_new_tokens)
    # At this temperature both endings occur, so both branches of the check above ran.
    assert {c.finish_reason for c in completions} == {"stop", "length"}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_teacher_forcing(engine, tiny, temperature):
    model, tokenizer, _ = tiny
    torch.manual_seed(1)
    out = engine.generate(SHORT_PROMPTS, Sampling(n=4, temperature=temperature, max_new_tokens=12))
    for prompt, samples in zip(SHORT_PROMPTS, out):
        assert len({tuple(c.token_ids) for c in samples}) > 1  # it does sample
        for c in samples:
            _, reference = teacher_forced_logprobs(model, tokenizer, prompt, c.token_ids, temperature)
            assert torch.allclose(torch.tensor(c.logprobs), reference, atol=1e-4)


def test_top_p_samples_inside_the_nucleus_with_renormalized_logprobs(engine, tiny):
    model, tokenizer, _ = tiny
    top_p, temperature = 0.6, 0.8
    torch.manual_seed(2)
    out = engine.generate(SHORT_PROMPTS, Sampling(n=4, temperature=temperature, top_p=top_p, max_new_tokens=10))
    for prompt, samples in zip(SHORT_PROMPTS, out):
        for c in samples:
            logprobs, _ = teacher_forced_logprobs(model, tokenizer, prompt, c.token_ids, temperature)
            probs = logprobs.exp()
            # vLLM's rule, written without sorting: a token survives when the probability mass of
            # the tokens at most as likely as it (itself included) exceeds 1 - top_p.
            mass_at_or_below = (probs[:, None, :] * (probs[:, None, :] <= probs[:, :, None])).sum(-1)
            kept = mass_at_or_below > 1 - top_p
            rows = torch.arange(len(c.token_ids))
            assert kept[rows, c.token_ids].all()
            renormalized = logprobs[rows, c.token_ids] - (probs * kept).sum(-1).log()
            assert torch.allclose(torch.tensor(c.logprobs), renormalized, atol=1e-4)


def test_first_token_frequencies_follow_the_tempered_distribution(engine, tiny):
    model, tokenizer, _ = tiny
    temperature, n = 0.7, 600
    torch.manual_seed(3)
    samples = engine.generate(["Hi"], Sampling(n=n, temperature=temperature, max_new_tokens=1))[0]
    counts = Counter(c.token_ids[0] for c in samples)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("Hi", add_special_tokens=False).input_ids])).logits[0, -1]
    expected = (logits / temperature).softmax(-1)
    observed = torch.tensor([counts[i] / n for i in range(len(expected))])
    # Total variation: ~0.03 for a correct sampler at n=600; temperature 1 or argmax gives > 0.2.
    assert 0.5 * (observed - expected).abs().sum() < 0.1


def test_restoring_the_rng_state_reproduces_samples(engine):
    sampling = Sampling(n=3, temperature=1.0, max_new_tokens=10)
    torch.manual_seed(4)
    first = engine.generate(SHORT_PROMPTS, sampling)
    torch.manual_seed(4)
    again = engine.generate(SHORT_PROMPTS, sampling)
    other = engine.generate(SHORT_PROMPTS, sampling)
    ids = lambda out: [[c.token_ids for c in samples] for samples in out]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)


def test_stop_tokens_include_the_generation_config_eos(tiny):
    model, tokenizer, _ = tiny
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = [tokenizer.eos_token_id, 97]
    assert stop_token_ids(tokenizer, config) == sorted({tokenizer.eos_token_id, 97})
    config.eos_token_id = None
    assert stop_token_ids(tokenizer, config) == [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------
# HF engine


def test_hf_batching_and_left_padding_do_not_change_outputs(tiny):
    model, tokenizer, _ = tiny
    prompts = SHORT_PROMPTS + [LONG_PROMPT]
    one_at_a_time = greedy(HFEngine(model, tokenizer, SINGLE, batch_size=1), prompts)
    batched = greedy(HFEngine(model, tokenizer, SINGLE, batch_size=64), prompts)
    assert_same_greedy(one_at_a_time, batched)
    for prompt, c in zip(prompts, batched):
        logprobs, reference = teacher_forced_logprobs(model, tokenizer, prompt, c.token_ids)
        assert c.token_ids == logprobs.argmax(-1).tolist()[:len(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), reference, atol=1e-4)


def test_hf_restores_train_mode_and_rejects_empty_prompts(tiny):
    model, tokenizer, _ = tiny
    engine = make_engine("hf", model, tokenizer, "", SINGLE, batch_size=2, gpu_memory_utilization=0.5)
    assert isinstance(engine, HFEngine) and engine.batch_size == 2
    model.train()
    try:
        engine.generate(["Hi"], Sampling(temperature=0, max_new_tokens=2))
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate(["Hi", ""], Sampling(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        engine.generate(["Hi"], Sampling(max_new_tokens=0))
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("tgi", model, tokenizer, "", SINGLE)


# ----------------------------------------------------------------------------------------------
# vLLM engine against the HF engine


def test_vllm_greedy_matches_hf_for_short_and_long_prompts(tiny, vllm_engine):
    model, tokenizer, _ = tiny
    block_size = vllm_engine.llm.llm_engine.vllm_config.cache_config.block_size
    assert len(tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids) > block_size
    prompts = SHORT_PROMPTS + [LONG_PROMPT]
    assert_same_greedy(greedy(HFEngine(model, tokenizer, SINGLE), prompts), greedy(vllm_engine, prompts))


def test_vllm_follows_pushed_weights(tiny, vllm_engine):
    model, tokenizer, _ = tiny
    prompts = SHORT_PROMPTS + [LONG_PROMPT]
    greedy(vllm_engine, prompts)  # fills the prefix cache with blocks computed from the old weights
    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    batch = torch.tensor([tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids])
    for _ in range(3):
        trained(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained.eval()
    expected = greedy(HFEngine(trained, tokenizer, SINGLE), prompts)
    try:
        # Sync deliberately skipped: vLLM still samples from the old policy.
        stale = greedy(vllm_engine, prompts)
        gaps = [max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) for a, b in zip(expected, stale)]
        assert all(a.token_ids != b.token_ids or gap > 1e-2 for a, b, gap in zip(expected, stale, gaps))
        vllm_engine.push_weights(trained)
        assert_same_greedy(expected, greedy(vllm_engine, prompts))
    finally:
        vllm_engine.push_weights(model)  # leave the shared engine as the other tests expect it
    assert_same_greedy(greedy(HFEngine(model, tokenizer, SINGLE), prompts), greedy(vllm_engine, prompts))


def test_vllm_ranks_sample_apart_even_from_equal_generators(vllm_engine):
    """vLLM samples under generators seeded with the rank mixed in: two ranks whose torch generators
    agree (a caller that seeded every rank alike) still draw different completions, and each rank
    replays its own."""
    sampling = Sampling(n=4, temperature=1.0, max_new_tokens=10)
    ids = lambda out: [[c.token_ids for c in samples] for samples in out]  # noqa: E731
    by_rank = {}
    try:
        for rank in (0, 1, 1):
            vllm_engine.dist = Dist(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
            torch.manual_seed(5)
            by_rank.setdefault(rank, []).append(ids(vllm_engine.generate(SHORT_PROMPTS, sampling)))
    finally:
        vllm_engine.dist = SINGLE
    assert by_rank[1][0] == by_rank[1][1]
    assert all(a != b for a, b in zip(by_rank[0][0], by_rank[1][0]))  # every prompt, not just one


def test_rank_stream_seeds_every_generator_from_the_callers_draw_and_the_rank():
    import numpy as np

    def inside(rank):
        with rank_stream(rank):
            return torch.rand(3).tolist(), np.random.rand(3).tolist()

    torch.manual_seed(0)
    np.random.seed(0)
    first = inside(rank=0)
    after = torch.get_rng_state(), np.random.get_state()[1].copy()
    torch.manual_seed(0)
    assert inside(rank=0) == first  # replayed from the caller's torch stream
    assert torch.equal(torch.get_rng_state(), after[0])  # the caller's stream moved by exactly one draw
    assert (np.random.get_state()[1] == after[1]).all()  # numpy's is given back untouched
    torch.manual_seed(0)
    other_rank = inside(rank=1)
    assert first[0] != other_rank[0] and first[1] != other_rank[1]
    assert inside(rank=0) != first  # the next call draws afresh


class FakeLLM:
    """Records what VLLMEngine asks of vLLM; generate answers every request with n one-token samples."""
    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.params = kwargs, [], None

        class Core:
            def shutdown(_):
                self.calls.append("shutdown")

        self.llm_engine = type("Engine", (), {"engine_core": Core()})()

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags):
        self.calls.append(f"wake {','.join(tags)}")

    def apply_model(self, function):
        calls = self.calls

        class Model:
            class lm_head:
                class quant_method:
                    def process_weights_after_loading(layer):
                        calls.append("rebuild lm_head")

            def load_weights(_, weights):
                calls.append(f"load {len(list(weights))} tensors")
        function(Model())

    def collective_rpc(self, method, kwargs):
        self.calls.append(f"{method} {len(list(kwargs['weights_iterator']))} tensors")

    def reset_prefix_cache(self):
        self.calls.append("reset prefix cache")

    def generate(self, requests, params, use_tqdm):
        from types import SimpleNamespace

        from vllm.logprobs import Logprob

        self.calls.append("generate")
        self.params = params
        n = params[0].n if isinstance(params, list) else params.n
        sample = SimpleNamespace(token_ids=[0], logprobs=[{0: Logprob(-0.5)}])
        return [SimpleNamespace(outputs=[sample] * n) for _ in requests]


def fake_engine(tokenizer, on_gpu: bool, tensor_parallel_size: int = 1) -> VLLMEngine:
    """A VLLMEngine in the trainers' sleep mode whose vLLM is a FakeLLM."""
    engine = object.__new__(VLLMEngine)
    engine.llm, engine.tokenizer, engine.dist, engine.stop_ids = FakeLLM(), tokenizer, SINGLE, [0]
    engine.on_gpu, engine.sleep_mode, engine.releases = on_gpu, True, on_gpu
    engine.resident, engine.weights_valid = {"weights", "kv_cache"}, True
    engine.tensor_parallel_size = tensor_parallel_size
    return engine


def test_gpu_sleep_releases_weights_and_wakes_them_for_the_push_first(tiny):
    """TRL's colocate cycle: level 2 during the update, the weights woken alone for the push, the KV
    cache only before generating; generating without a push after a sleep is refused."""
    model, tokenizer, _ = tiny
    engine = fake_engine(tokenizer, on_gpu=True)
    engine.sleep()
    engine.sleep()  # already asleep: nothing more
    with pytest.raises(RuntimeError, match="push_weights"):
        engine.wake_up()
    engine.push_weights(model)
    assert engine.resident == {"weights"}  # the KV cache stays released until generation
    engine.wake_up()
    engine.wake_up()
    tensors = len(model.state_dict()) - int(model.config.tie_word_embeddings)
    assert engine.llm.calls == ["sleep 2", "wake weights", f"load {tensors} tensors", "reset prefix cache",
                                "wake kv_cache"]


def test_cpu_engine_keeps_the_gpu_sleep_protocol(tiny):
    """On CPU vLLM frees nothing in sleep (its CPU worker ignores it), yet the engine refuses to
    generate after a sleep until a push, as a GPU must: dynamic sampling's extra rounds (wake,
    generate, sleep per round) would otherwise pass on CPU and fail on the first GPU run."""
    model, tokenizer, _ = tiny
    engine = fake_engine(tokenizer, on_gpu=False)
    greedy_one = Sampling(temperature=0, max_new_tokens=1)
    engine.wake_up()
    engine.generate(["Hi"], greedy_one)
    engine.sleep()
    for call in (engine.wake_up, lambda: engine.generate(["Hi"], greedy_one)):
        with pytest.raises(RuntimeError, match="push_weights"):
            call()
    engine.push_weights(model)
    assert engine.generate(["Hi"], greedy_one)[0][0].token_ids == [0]
    tensors = len(model.state_dict()) - int(model.config.tie_word_embeddings)
    assert model.config.tie_word_embeddings  # so the push rebuilds the tied lm_head's CPU kernel
    assert engine.llm.calls == ["generate", f"reload_weights {tensors} tensors", "rebuild lm_head",
                                "reset prefix cache", "generate"]  # no sleep or wake reaches vLLM on CPU


def test_real_cpu_engine_in_sleep_mode_refuses_stale_weights_then_follows_the_push(tiny, vllm_engine):
    model, tokenizer, _ = tiny
    expected = greedy(HFEngine(model, tokenizer, SINGLE), SHORT_PROMPTS)
    vllm_engine.sleep_mode = True  # as trainer_engine builds it (enable_sleep_mode=True)
    try:
        vllm_engine.sleep()
        with pytest.raises(RuntimeError, match="push_weights"):
            greedy(vllm_engine, SHORT_PROMPTS)
        vllm_engine.push_weights(model)
        assert_same_greedy(expected, greedy(vllm_engine, SHORT_PROMPTS))
    finally:
        vllm_engine.sleep_mode = False
        vllm_engine.weights_valid, vllm_engine.resident = True, {"weights", "kv_cache"}


def test_close_wakes_an_asleep_engine_before_shutting_it_down(tiny):
    """A run ends with sleep (the update) and a push (weights only): on CUDA, freeing the asleep KV
    cache at shutdown would release unmapped memory a second time."""
    model, tokenizer, _ = tiny
    engine = fake_engine(tokenizer, on_gpu=True)
    engine.sleep()
    engine.push_weights(model)
    llm = engine.llm
    engine.close()
    assert llm.calls[-2:] == ["wake kv_cache", "shutdown"] and engine.llm is None
    engine = fake_engine(tokenizer, on_gpu=True)
    engine.sleep()  # asleep with no push at all (a run stopped mid-step)
    llm = engine.llm
    engine.close()
    assert llm.calls == ["sleep 2", "wake weights", "wake kv_cache", "shutdown"]
    engine = fake_engine(tokenizer, on_gpu=False)
    engine.sleep()
    llm = engine.llm
    engine.close()
    assert llm.calls == ["shutdown"]  # nothing was released on CPU: nothing to wake


def test_tensor_parallel_requests_carry_seeds_from_the_callers_stream(tiny):
    """Tensor parallel workers are processes this process's generators do not reach: each request
    gets a seed drawn from the caller's stream (rank_stream), distinct per request, replayed on resume."""
    _, tokenizer, _ = tiny
    engine = fake_engine(tokenizer, on_gpu=True, tensor_parallel_size=2)
    sampling = Sampling(n=3, temperature=1.0, max_new_tokens=4)
    seeds = []
    for torch_seed in (7, 7, 8):
        torch.manual_seed(torch_seed)
        engine.generate(SHORT_PROMPTS, sampling)
        seeds.append([params.seed for params in engine.llm.params])
    assert seeds[0] == seeds[1] != seeds[2]
    # request i's n samples take seed_i + j (vLLM's parallel sampling): no two samples share a seed
    assert len({s + j for s in seeds[0] for j in range(sampling.n)}) == len(SHORT_PROMPTS) * sampling.n
    engine.tensor_parallel_size = 1  # one process: its generators are seeded instead (rank_stream)
    engine.generate(SHORT_PROMPTS, sampling)
    assert engine.llm.params.seed is None


# ----------------------------------------------------------------------------------------------
# Sizing vLLM from the work


@pytest.fixture
def captured_llm_kwargs(monkeypatch):
    """VLLMEngine builds a FakeLLM instead of vLLM's; returns the kwargs it was given."""
    vllm = pytest.importorskip("vllm")
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    return lambda engine: engine.llm.kwargs


def test_vllm_is_sized_from_the_work(tiny, captured_llm_kwargs):
    model, tokenizer, path = tiny
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # K and V, fp32
    kwargs = captured_llm_kwargs(VLLMEngine(path, tokenizer, SINGLE, dtype="float32", max_model_len=300,
                                            max_num_seqs=50))
    assert kwargs["max_model_len"] == 300 and kwargs["max_num_seqs"] == 50
    assert kwargs["kv_cache_memory_bytes"] == 50 * 300 * per_token  # every sequence at full length at once
    assert kwargs["enforce_eager"] and "gpu_memory_utilization" not in kwargs
    # bfloat16 halves it; the model's own length caps max_model_len; an explicit size wins
    kwargs = captured_llm_kwargs(VLLMEngine(path, tokenizer, SINGLE, dtype="bfloat16", max_model_len=10**6,
                                            max_num_seqs=50))
    assert kwargs["max_model_len"] == config.max_position_embeddings
    assert kwargs["kv_cache_memory_bytes"] == 50 * config.max_position_embeddings * per_token // 2
    kwargs = captured_llm_kwargs(VLLMEngine(path, tokenizer, SINGLE, max_num_seqs=5000,
                                            kv_cache_memory_bytes=1 << 20))
    assert kwargs["max_num_seqs"] == MAX_NUM_SEQS and kwargs["kv_cache_memory_bytes"] == 1 << 20
    # vLLM refuses more sequences than tokens per step
    kwargs = captured_llm_kwargs(VLLMEngine(path, tokenizer, SINGLE, max_num_seqs=900,
                                            max_num_batched_tokens=512))
    assert kwargs["max_num_seqs"] == 512


def test_the_cpu_kv_cache_is_capped_by_free_ram(tiny, monkeypatch):
    import psutil

    model, _, _ = tiny
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 8 << 30})())
    assert cpu_kv_cache_bytes(model.config, "float32", 10**4, 10**4, ranks=2) == 2 << 30  # half of 8, shared
    assert cpu_kv_cache_bytes(model.config, "float32", 1, 100, ranks=2) == 100 * kv_bytes_per_token(
        model.config, "float32")


def test_the_trainers_engine_holds_a_ranks_share_of_the_step(tiny, captured_llm_kwargs):
    from types import SimpleNamespace

    _, tokenizer, path = tiny
    cfg = SimpleNamespace(engine="vllm", micro_batch_size=4, vllm_gpu_memory_utilization=0.3, bf16=False,
                          max_prompt_length=64, max_completion_length=32, prompts_per_step=10,
                          num_generations=4, vllm_max_num_batched_tokens=4096, vllm_cpu_kv_cache_gb=0.25,
                          rope_theta=0.0, max_position_embeddings=0)
    four_ranks = Dist(rank=1, world_size=4, local_rank=1, device=torch.device("cpu"))
    engine = trainer_engine(cfg, None, tokenizer, path, four_ranks)
    kwargs = captured_llm_kwargs(engine)
    assert engine.sleep_mode and not engine.releases  # the protocol on CPU, nothing really released
    assert kwargs["max_model_len"] == 96 and kwargs["max_num_seqs"] == 3 * 4  # ceil(10 / 4) prompts x G
    assert kwargs["kv_cache_memory_bytes"] == 1 << 28
    assert kwargs["distributed_executor_backend"] == "external_launcher"


ROPE_ENGINE = r'''
import json, sys
import torch
from mathrl import models
from mathrl.distributed import Dist
from mathrl.engine import Sampling, VLLMEngine
path, prompt = sys.argv[1], sys.argv[2]
config_overrides = models.config_overrides(models.load_model(path).config, 300.0, 2048)
engine = VLLMEngine(path, models.load_tokenizer(path), Dist(0, 1, 0, torch.device("cpu")), dtype="float32",
                    max_model_len=512, kv_cache_memory_bytes=32 << 20, hf_overrides=config_overrides)
c = engine.generate([prompt], Sampling(temperature=0, max_new_tokens=16))[0][0]
engine.close()
print("RESULT", json.dumps({"token_ids": c.token_ids, "logprobs": c.logprobs}))
'''


def test_vllm_computes_with_the_trainers_rope_override(tiny):
    """--rope-theta reaches vLLM as hf_overrides: its log-probs are those of the HF model built with the
    same override, not the unmodified model's. (A process of its own: one vLLM engine per process.)"""
    from mathrl import models

    pytest.importorskip("vllm")
    plain, tokenizer, path = tiny
    run = subprocess.run([sys.executable, "-c", ROPE_ENGINE, path, LONG_PROMPT], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT"))[7:])
    overridden = models.load_model(path, rope_theta=300.0, max_positions=2048).eval()
    assert overridden.config.max_position_embeddings == 2048
    _, reference = teacher_forced_logprobs(overridden, tokenizer, LONG_PROMPT, out["token_ids"])
    _, unmodified = teacher_forced_logprobs(plain, tokenizer, LONG_PROMPT, out["token_ids"])
    assert (torch.tensor(out["logprobs"]) - reference).abs().max().item() < 1e-4
    assert (torch.tensor(out["logprobs"]) - unmodified).abs().max().item() > 1e-3  # the override acted


# ----------------------------------------------------------------------------------------------
# Two ranks under torchrun: FSDP2-sharded model, different prompt counts per rank.

TWO_RANKS = r'''
import os, sys, json
sys.path.insert(0, sys.argv[1])
import torch
from torch.distributed.fsdp import fully_shard
from mathrl.engine import HFEngine, Sampling, make_engine
from mathrl.distributed import init_distributed
from mathrl.models import load_model, load_tokenizer
dist = init_distributed()
model, tokenizer = load_model(sys.argv[2]), load_tokenizer(sys.argv[2])
greedy = Sampling(temperature=0, max_new_tokens=12)
# Unsharded (as in evaluate.py), ranks are independent: a rank without prompts may skip generate.
unsharded = [c[0].token_ids for c in HFEngine(model, tokenizer, dist).generate(["Hi"], greedy)] if dist.rank == 0 else None
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
# Rank 0 gets three prompts in three batches, rank 1 one: without lock-step batches and
# forward passes, the FSDP all-gathers would deadlock.
prompts = [["Hi", "Solve 2x+3=7.\n", "abc"], ["x" * 150]][dist.rank]
hf = [c[0].token_ids for c in HFEngine(model, tokenizer, dist, batch_size=1).generate(prompts, greedy)]
result = {"hf": hf, "unsharded": unsharded}
if sys.argv[3] == "vllm":
    engine = make_engine("vllm", model, tokenizer, sys.argv[2], dist, dtype="float32", max_model_len=512,
                         kv_cache_memory_bytes=32 << 20)
    # One training step changes the sharded weights; vLLM must follow them.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = torch.tensor([tokenizer(prompts[0], add_special_tokens=False).input_ids])
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    hf_after = [c[0].token_ids for c in HFEngine(model, tokenizer, dist).generate(prompts, greedy)]
    engine.push_weights(model)
    result.update(hf_after=hf_after, vllm=[c[0].token_ids for c in engine.generate(prompts, greedy)])
    engine.close()  # before the group goes: vLLM's own teardown needs it
with open(os.path.join(sys.argv[4], f"rank{dist.rank}.json"), "w") as f:
    json.dump(result, f)
if torch.distributed.is_initialized():  # engine.close() leaves it destroyed
    torch.distributed.destroy_process_group()
'''


def test_two_fsdp_ranks_with_uneven_prompts(tiny, tmp_path):
    backends = "vllm" if importlib.util.find_spec("vllm") else "hf"  # one launch checks both when it can
    model, tokenizer, path = tiny
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), root, path, backends, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]   # a clean exit, vLLM's teardown included
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    prompts = [["Hi", "Solve 2x+3=7.\n", "abc"], ["x" * 150]]
    assert results[0]["unsharded"] == [c.token_ids for c in greedy(HFEngine(model, tokenizer, SINGLE), ["Hi"], 12)]
    for rank_prompts, result in zip(prompts, results):
        assert result["hf"] == [c.token_ids for c in greedy(HFEngine(model, tokenizer, SINGLE), rank_prompts, 12)]
        if backends == "vllm":
            assert result["vllm"] == result["hf_after"] != result["hf"]
