"""Memory at scale, shown on CPU: chunked log-probs, sharded gradients, per-rank sampling streams, and
the bf16 ratio. (The same on a GPU with torch.cuda.max_memory_allocated: tests/test_gpu.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import grpo
from mathrl import distributed, fsdp, models, sequences

ROOT = Path(__file__).resolve().parents[1]


def unchunked_logprobs(model, input_ids, completion_mask, temperature):
    """The textbook computation: every position's full-vocabulary logits at once."""
    logits = model(input_ids=input_ids).logits[:, :-1].float() / temperature
    logsumexp = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - logsumexp
    entropy = logsumexp - (logits.softmax(-1) * logits).sum(-1)
    return logp * completion_mask[:, 1:], entropy


def two_rows():
    return sequences.pack([[5, 6, 7], [11, 12]], [[8, 9, 10, 21, 22], [13, 14, 15, 16, 17, 18, 19, 20]], 0, "cpu")


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 1024])
def test_chunked_logprobs_entropy_and_their_gradients_equal_the_unchunked_ones(chunk_size):
    model, _ = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=3)
    ids, cm = two_rows()
    weights = torch.rand(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))
    expected, expected_entropy = unchunked_logprobs(model, ids, cm, 0.7)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(model.parameters()))
    logp, entropy = grpo.token_logprobs(model, ids, cm, 0.7, chunk_size, with_entropy=True)
    grads = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy.detach(), atol=1e-6, rtol=0)
    for got, want in zip(grads, expected_grads):  # sums over chunks in another order: fp32 rounding only
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_the_entropy_is_reported_without_gradient_and_only_when_asked_for():
    """The entropy is a metric: it carries no graph (which would keep [n, V] tensors alive through
    backward); an entropy bonus asks for its gradient (docs/ablations/02-entropy-bonus.patch)."""
    model, _ = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    ids, cm = two_rows()
    logp, entropy = grpo.token_logprobs(model, ids, cm, 1.0, 4, with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad
    assert grpo.token_logprobs(model, ids, cm, 1.0, 4)[1] is None


class WidestLogits(TorchDispatchMode):
    """The most positions of any vocabulary-wide tensor created (logits, their softmax, their gradient);
    lm_head's weight seen transposed, (hidden, vocab), is no logits."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.positions = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            vocabulary_wide = isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[-1] == self.vocab
            if vocabulary_wide and t.shape[:-1] != (self.hidden,):
                self.positions = max(self.positions, t.numel() // self.vocab)
        return out


def test_logits_exist_one_chunk_at_a_time_forward_and_backward_and_nothing_vocab_wide_is_kept():
    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    ids, cm = sequences.pack([[5] * 41] * 3, [[7] * 60] * 3, 0, "cpu")   # 3 x 100 predicted positions
    kept = []
    for chunk_size in (16, 64):
        widest = WidestLogits(vocab, hidden)
        saved = []
        with widest, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            logp, _ = grpo.token_logprobs(model, ids, cm, 0.9, chunk_size, with_entropy=True)
        with widest:
            logp.sum().backward()
        assert widest.positions == chunk_size
        kept.append([s for s in saved if s[-1] == vocab])
    assert kept == [[], []]   # the checkpointed chunks keep their inputs, never their logits
    widest = WidestLogits(vocab, hidden)
    with widest:   # what the whole micro-batch at once would build
        unchunked_logprobs(model, ids, cm, 0.9)[0].sum().backward()
    assert widest.positions == 3 * 101   # model.forward's logits: every position of every row


def test_sft_loss_equals_cross_entropy_over_response_tokens():
    import sft

    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    examples = [([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([3, 4, 5], [-100, 4, 5])]
    input_ids, labels = sft.collate(examples, 0, "cpu")
    logp = sequences.next_token_scores(model, input_ids, sft.log_softmax_at, 3)[0] * (labels[:, 1:] != -100)
    expected = torch.nn.functional.cross_entropy(model(input_ids).logits[:, :-1].flatten(0, 1),
                                                 labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    assert (-logp.sum()).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank torchrun of tests/memory_worker.py; each rank's record."""
    tmp = tmp_path_factory.mktemp("memory")
    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "tests" / "memory_worker.py"), str(tmp / "out"), str(tmp / "model")],
                   cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, timeout=600)
    return [torch.load(tmp / "out" / f"rank-{r}.pt") for r in range(2)]


def test_gradients_stay_sharded_between_micro_batches(two_ranks):
    for rank in two_ranks:
        first, *later = rank["grad_states"]
        assert len(later) == 2 and first["sharded_grads"] == 0       # 3 micro-batches; none before the first
        for state in later:
            assert state["unsharded_grads"] == 0                      # no full-size gradient is ever held
            assert state["sharded_grads"] > 0 and state["all_sharded"]
            assert abs(state["local_elements"] - state["global_elements"] / 2) <= 64   # half, up to padding


def test_models_are_identical_on_all_ranks_but_each_rank_samples_its_own_stream(two_ranks):
    torch.testing.assert_close(two_ranks[0]["critic_head"], two_ranks[1]["critic_head"], atol=0, rtol=0)
    samples = [rank["samples"] for rank in two_ranks]
    assert len(set(map(tuple, samples[0]))) > 1                      # sampling is random within a rank
    assert sum(a == b for a, b in zip(*samples)) <= 1                # and not the same across ranks


def test_single_process_bf16_ratio_is_exactly_one_on_the_first_pass(monkeypatch):
    """pi_old and pi_ref are computed under the autocast pi runs under: at the first of mu passes
    pi = pi_old, so rho = 1 exactly, and the KL to a reference with the same weights is exactly 0."""
    from grpo_update_worker import fixed_rollouts

    policy, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    reference, _ = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    cfg = grpo.Config(micro_batch_size=4, num_iterations=2, beta=0.1, temperature=0.9, max_completion_length=16,
                      lr=1e-2, bf16=True, gradient_checkpointing=False, logprob_chunk_size=8)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    seen = {"ratio": [], "kl": []}
    objective, k3 = grpo.clipped_objective, grpo.k3_kl
    monkeypatch.setattr(grpo, "clipped_objective", lambda logp, old, *a: seen["ratio"].append(
        torch.exp(logp - old).detach()) or objective(logp, old, *a))
    monkeypatch.setattr(grpo, "k3_kl", lambda logp, ref: seen["kl"].append(k3(logp, ref).detach()) or k3(logp, ref))
    d = distributed.Dist(0, 1, 0, torch.device("cpu"))
    grpo.policy_update(policy, reference.eval(), optimizer, fsdp.cosine_schedule(optimizer, 2, 0.0, 1.0),
                       fixed_rollouts(), cfg, d, tokenizer.pad_token_id)
    first_pass = len(seen["ratio"]) // 2
    assert first_pass == 3
    for ratio, kl in zip(seen["ratio"][:first_pass], seen["kl"][:first_pass]):
        assert torch.equal(ratio, torch.ones_like(ratio)) and torch.equal(kl, torch.zeros_like(kl))
    assert any((ratio != 1).any() for ratio in seen["ratio"][first_pass:])   # the second pass moved
