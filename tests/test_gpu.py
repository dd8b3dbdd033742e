"""What only a GPU can show: FSDP2 + NCCL in bf16, the NaN guard, memory measured by CUDA's allocator,
per-rank streams.

    .venv/bin/python -m pytest -q tests/test_gpu.py      # one GPU, no network, a few minutes

Every model is a random Qwen2 config built here: nothing is downloaded. Skipped without CUDA.
(The vLLM GPU tests are in tests/test_gpu_vllm.py; all of them run in tools/gpu_check.sh.)
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist

import grpo
from mathrl import distributed, fsdp, models, sequences
from mathrl.engine import HFEngine, Sampling

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda", 0)
MiB = 2 ** 20


@dataclasses.dataclass
class OneRankFSDP(distributed.Dist):
    """World size 1, but sharded as the trainers shard for several ranks: FSDP2's bf16 policy, its
    reduce-scatter (of one), its registered log-prob forward, NCCL."""
    enabled = True


@pytest.fixture(scope="module")
def nccl(tmp_path_factory):
    torch.cuda.set_device(DEVICE)
    store = f"file://{tmp_path_factory.mktemp('pg')}/store"
    dist.init_process_group("nccl", init_method=store, rank=0, world_size=1)
    yield OneRankFSDP(0, 1, 0, DEVICE)
    dist.destroy_process_group()


def random_qwen2(vocab=32_000, hidden=256, layers=4, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=8192, tie_word_embeddings=True))


def rollouts(num_rows, prompt_len=64, completion_len=192, vocab=32_000, seed=0):
    """Equal-length rows (so micro-batches are alike), random tokens, engine log-probs and advantages."""
    generator = torch.Generator().manual_seed(seed)
    return [grpo.Rollout(torch.randint(10, vocab, (prompt_len,), generator=generator).tolist(),
             torch.randint(10, vocab, (completion_len,), generator=generator).tolist(),
             (-torch.rand(completion_len, generator=generator) * 5).tolist(), float(i % 3 - 1))
            for i in range(num_rows)]


def update(policy, optimizer, rows, d, **overrides):
    cfg = grpo.Config(**{**dict(micro_batch_size=4, num_iterations=1, beta=0.0, temperature=1.0, lr=1e-5,
                                max_completion_length=192, bf16=True, gradient_checkpointing=True,
                                logprob_chunk_size=256), **overrides})
    scheduler = fsdp.cosine_schedule(optimizer, 10, 0.0, 1.0)
    return grpo.policy_update(policy, None, optimizer, scheduler, rows, cfg, d, pad_id=0)


def test_fsdp2_bf16_update_at_world_size_one(nccl):
    """FSDP2 on NCCL with bf16 compute and fp32 gradients: the first of two passes has ratio 1 exactly
    (clip_frac 0 even with a tiny clip range), gradients are fp32 DTensors, the weights move."""
    from torch.distributed.tensor import DTensor

    policy = fsdp.shard_model(random_qwen2(), nccl, bf16=True, gradient_checkpointing=True)
    start = {k: v.full_tensor().clone() for k, v in policy.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    seen = []
    objective = grpo.clipped_objective
    grpo.clipped_objective = lambda logp, old, *a: seen.append(torch.exp(logp - old).detach()) or \
        objective(logp, old, *a)
    try:
        stats = update(policy, optimizer, rollouts(8), nccl, num_iterations=2, epsilon_low=1e-6,
                       epsilon_high=1e-6)
    finally:
        grpo.clipped_objective = objective
    assert all(torch.equal(r, torch.ones_like(r)) for r in seen[:2])     # 2 micro-batches in the first pass
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    moved = max((policy.state_dict()[k].full_tensor() - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-6
    logp = grpo.token_logprobs(policy, *sequences.pack([[5, 6]], [[7, 8, 9]], 0, DEVICE), 1.0, 1024)[0]
    logp.sum().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(isinstance(g, DTensor) and g.dtype == torch.float32 for g in grads)
    optimizer.zero_grad(set_to_none=True)


def test_nan_guard_stops_an_fsdp2_update_before_the_step(nccl, capsys):
    """A NaN weight makes the gradient norm NaN: the update stops with one line before AdamW applies it,
    so every other weight is unchanged (fsdp.stop_if_not_finite, on NCCL at world size 1)."""
    policy = fsdp.shard_model(random_qwen2(), nccl, bf16=True, gradient_checkpointing=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.to_local().fill_(float("nan"))
    start = {k: v.full_tensor().clone() for k, v in policy.state_dict().items() if "layers.0.mlp.down" not in k}
    with pytest.raises(SystemExit) as stopped:
        update(policy, optimizer, rollouts(4), nccl)
    assert stopped.value.code == 1
    assert "gradient norm is nan at optimizer step 1: stopped, nothing more saved" in capsys.readouterr().err
    assert all(torch.equal(policy.state_dict()[k].full_tensor(), v) for k, v in start.items())
    optimizer.zero_grad(set_to_none=True)


def test_update_memory_does_not_grow_with_the_number_of_micro_batches(nccl):
    """Peak memory of one update with 2, 4 and 8 micro-batches of the same size: accumulation holds the
    sharded fp32 gradients, never one set of full gradients per micro-batch."""
    policy = fsdp.shard_model(random_qwen2(), nccl, bf16=True, gradient_checkpointing=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    update(policy, optimizer, rollouts(4), nccl)   # Adam's states exist from here on, in every measurement
    peaks = {}
    for micro_batches in (2, 4, 8):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        update(policy, optimizer, rollouts(4 * micro_batches, seed=micro_batches), nccl)
        torch.cuda.synchronize()
        peaks[micro_batches] = torch.cuda.max_memory_allocated() / MiB
    print(f"peak MiB by micro-batches: {peaks}")
    assert peaks[8] <= peaks[2] * 1.05 + 16, peaks


def logprob_pass_peak(model, length: int, chunk_size: int, chunked=True, body_only=False) -> float:
    """Peak MiB above what was allocated before one forward + backward of the log-prob computation
    (or of the model body alone: its activations grow with the length whatever the chunking)."""
    ids = torch.randint(10, model.config.vocab_size, (1, length), device=DEVICE)
    mask = torch.ones(1, length, device=DEVICE)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if body_only:
            logp = model.model(input_ids=ids).last_hidden_state.float()
        elif chunked:
            logp = grpo.token_logprobs(model, ids, mask, 0.7, chunk_size, with_entropy=True)[0]
        else:
            logits = model(input_ids=ids).logits[:, :-1].float() / 0.7
            logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])
    logp.sum().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MiB


def test_logprob_peak_does_not_grow_with_length_beyond_the_chunk():
    """Vocabulary 152k (Qwen2.5's): one chunk of 256 positions is 148 MiB of fp32 logits, a 4096-token
    sequence's whole logits 2.3 GiB. Above the model body's own peak, the chunked pass needs the same
    memory at any length."""
    model = random_qwen2(vocab=151_936, hidden=64, layers=1).to(DEVICE)
    model.config.use_cache = False
    chunk, fp32_chunk_mib = 256, 256 * 151_936 * 4 / MiB
    lengths = (1024, 4096)
    above_body = {n: logprob_pass_peak(model, n, chunk) - logprob_pass_peak(model, n, chunk, body_only=True)
                  for n in lengths}
    unchunked = logprob_pass_peak(model, 4096, chunk, chunked=False) - \
        logprob_pass_peak(model, 4096, chunk, body_only=True)
    print(f"log-prob peak MiB above the body's, by length (chunk {chunk}): {above_body}; "
          f"unchunked at 4096: {unchunked:.0f}")
    assert above_body[4096] - above_body[1024] < 0.5 * fp32_chunk_mib, above_body   # 4x the length: same
    # ~14 bytes per logit of one chunk (3.5 fp32 chunks, memplan's figure) plus the 10M weights' gradients
    assert above_body[4096] < 5 * fp32_chunk_mib, above_body
    assert unchunked > 2 * 4096 * 151_936 * 4 / MiB   # whole-sequence logits, several fp32 copies


def test_each_rank_samples_from_its_own_cuda_stream():
    """distributed.seed_per_rank on CUDA: ranks 0 and 1 draw different completions of one prompt, and a
    rank reseeded the same way draws the same ones again (resume replays a rank's stream)."""
    tokenizer = models.build_tiny_tokenizer()
    model = random_qwen2(vocab=len(tokenizer)).to(DEVICE)

    def sample(rank):
        distributed.seed_everything(0)
        distributed.seed_per_rank(0, distributed.Dist(rank, 2, rank, DEVICE))
        engine = HFEngine(model, tokenizer, distributed.Dist(0, 1, 0, DEVICE), batch_size=8)
        completions = engine.generate(["1 + 2 ="], Sampling(n=8, temperature=1.0, max_new_tokens=16))[0]
        return [c.token_ids for c in completions]

    rank0, rank1, rank0_again = sample(0), sample(1), sample(0)
    assert rank0 == rank0_again
    assert sum(a == b for a, b in zip(rank0, rank1)) <= 1
