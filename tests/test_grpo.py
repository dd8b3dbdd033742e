"""GRPO's equations against hand computations, and the update against itself across ranks."""
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import weakref
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import kill_after_first_checkpoint

import grpo

ROOT = Path(__file__).resolve().parents[1]


def test_group_advantages_match_a_direct_computation():
    torch.manual_seed(0)
    rewards = torch.rand(5 * 4)
    got = grpo.group_advantages(rewards, group_size=4, scale="group")
    for g in range(5):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)  # unbiased, as torch.std
        for i in range(4):
            assert got[4 * g + i].item() == pytest.approx((group[i] - mean) / (std + 1e-4), rel=1e-5)
    batch_std = rewards.std().item()
    got = grpo.group_advantages(rewards, 4, scale="batch")
    assert got[5].item() == pytest.approx((rewards[5] - rewards[4:8].mean()).item() / (batch_std + 1e-4), rel=1e-5)
    got = grpo.group_advantages(rewards, 4, scale="none")
    assert got[5].item() == pytest.approx((rewards[5] - rewards[4:8].mean()).item(), abs=1e-6)


def test_all_equal_groups_get_zero_advantage_not_nan():
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5]
    for scale in ("group", "batch", "none"):
        advantages = grpo.group_advantages(rewards, 3, scale)
        assert not torch.isnan(advantages).any()
        assert advantages[:6].tolist() == [0.0] * 6
    assert grpo.group_advantages([2.0] * 6, 3, "batch").tolist() == [0.0] * 6   # batch std 0 too
    # a binary group: +1 for the right answer, -1 for the wrong one (std of {1, 0} is 1/sqrt(2))
    a = grpo.group_advantages([1.0, 0.0], 2, "group")
    assert a.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)])


def test_clipped_objective_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    old = torch.zeros(1, 4)                                 # rho = 1.5, 0.5, 1.1, 0.7
    adv = torch.tensor([[1.0]])
    objective, clipped = grpo.clipped_objective(logp, old, adv, 0.2, 0.28)
    # A > 0: min(rho, clip(rho)) = 1.28, 0.5, 1.1, 0.7
    assert objective[0].tolist() == pytest.approx([1.28, 0.5, 1.1, 0.7], rel=1e-6)
    assert clipped[0].tolist() == [True, False, False, False]
    objective, clipped = grpo.clipped_objective(logp, old, -adv, 0.2, 0.28)
    # A < 0: min(-rho, -clip(rho)) = -1.5, -0.8, -1.1, -0.8
    assert objective[0].tolist() == pytest.approx([-1.5, -0.8, -1.1, -0.8], rel=1e-6)
    assert clipped[0].tolist() == [False, True, False, True]


def test_mu_one_makes_the_ratio_exactly_one_and_keeps_the_policy_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[:, 0]
    objective, clipped = grpo.clipped_objective(logp, logp.detach(), torch.tensor(2.0), 0.2, 0.2)
    assert torch.equal(torch.exp(logp - logp.detach()), torch.ones(3))
    assert not clipped.any()
    objective.sum().backward()
    reference_logits = logits.detach().clone().requires_grad_()
    (2.0 * torch.log_softmax(reference_logits, -1)[:, 0]).sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad)   # d/dtheta rho*A = A * dlogp


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    expected = [0.0, math.exp(1) - 1 - 1, math.exp(-1.5) + 1.5 - 1]
    assert grpo.k3_kl(logp, ref).tolist() == pytest.approx(expected, rel=1e-6)
    assert (grpo.k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_loss_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert grpo.aggregate_loss(per_token, mask, "grpo", 2, 4, 10).item() == pytest.approx((2.0 + 4.0) / 2)
    assert grpo.aggregate_loss(per_token, mask, "dapo", 2, 4, 10).item() == pytest.approx(10.0 / 4)
    assert grpo.aggregate_loss(per_token, mask, "dr_grpo", 2, 4, 10).item() == pytest.approx(10.0 / 20)


def test_token_logprobs_match_log_softmax_at_temperature():
    from mathrl import models, sequences

    model, _ = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    ids, cm = sequences.pack([[5, 6, 7]], [[8, 9]], 0, "cpu")
    logp, entropy = grpo.token_logprobs(model, ids, cm, 0.7, 1024, with_entropy=True)
    logits = model(ids).logits[0] / 0.7
    expected = torch.log_softmax(logits, -1)
    assert logp[0, 2].item() == pytest.approx(expected[2, 8].item(), abs=1e-5)
    assert logp[0, 3].item() == pytest.approx(expected[3, 9].item(), abs=1e-5)
    assert logp[0, :2].abs().sum().item() == 0.0           # prompt positions carry nothing
    assert entropy[0, 3].item() == pytest.approx(-(expected[3].exp() * expected[3]).sum().item(), abs=1e-5)


class VocabWideTensors(TorchDispatchMode):
    """Records every [n, V] tensor an op makes (V the vocabulary), weakly: live() counts those whose
    storage something (autograd's saved tensors, a checkpoint frame) still holds."""

    def __init__(self, vocab: int, parameters):
        super().__init__()
        self.vocab, self.storages = vocab, []
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}  # lm_head.t() is [H, V]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in self.parameter_storages):
                self.storages.append(weakref.ref(t.untyped_storage()))
        return out

    def live(self) -> int:
        return len({id(s()) for s in self.storages if s() is not None})


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_no_vocabulary_wide_tensor_outlives_backward_while_the_entropy_is_held(trainer):
    """The policy updates keep the entropy (for the metrics) while backward() runs, and read it after. Under
    the non-reentrant checkpoint of next_token_scores, the recompute stores every tensor a chunk saves, and
    frees each only when backward unpacks it: an entropy with gradient, never reached by backward, kept
    two fp32 [chunk, V] tensors per chunk alive (18.5 GiB at the default grpo's full length)."""
    import ppo
    from mathrl import models, sequences

    module = {"grpo": grpo, "ppo": ppo}[trainer]
    model, _ = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=2)
    ids, completion_mask = sequences.pack([[5, 6, 7]] * 2, [list(range(8, 28))] * 2, 0, "cpu")
    counter = VocabWideTensors(model.config.vocab_size, model.parameters())
    with counter:
        logp, entropy = module.token_logprobs(model, ids, completion_mask, 0.7, 8, with_entropy=True)
        assert len(counter.storages) >= 6  # the count sees each of the 6 chunks' logits being made
        logp.sum().backward()
    gc.collect()
    assert counter.live() == 0, "[n, V] tensors of the log-prob chunks are still alive after backward"
    assert entropy.isfinite().all() and not entropy.requires_grad  # reported, not optimised


def test_token_logprobs_of_a_row_do_not_depend_on_the_padding_beside_it():
    """pack() right-pads without an attention mask: a short row batched with a long one must get the
    log-probs it gets alone, and the pads must carry nothing."""
    from mathrl import models, sequences

    model, _ = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2)
    rows = [([5, 6, 7], [8, 9]), ([11, 12], [13, 14, 15, 16, 17, 18, 19, 20])]
    ids, cm = sequences.pack([p for p, _ in rows], [c for _, c in rows], 0, "cpu")
    batched = grpo.token_logprobs(model, ids, cm, 1.0, 1024)[0]
    for row, (prompt, completion) in enumerate(rows):
        alone_ids, alone_cm = sequences.pack([prompt], [completion], 0, "cpu")
        alone = grpo.token_logprobs(model, alone_ids, alone_cm, 1.0, 1024)[0][0]
        width = len(alone)
        torch.testing.assert_close(batched[row, :width], alone, atol=1e-6, rtol=0)
        assert batched[row, width:].abs().sum().item() == 0.0
    assert cm.sum().item() == 2 + 8


# (K mini-batches, a token budget for the two ranks' micro-batches): with a budget of 24 tokens the 2 ranks cut
# their rows into different numbers of micro-batches, so one of them runs empty ones; the one process keeps
# count-based micro-batches, and the step must still be the same. LoRA rank 4: the adapters alone are trained
# and the reference is the policy with its adapters off.
@pytest.mark.parametrize("mini_batches, max_tokens, lora_rank", [(1, 0, 0), (2, 0, 0), (1, 24, 0), (1, 0, 4)])
def test_two_rank_update_on_fixed_rollouts_equals_one_process(tmp_path, mini_batches, max_tokens, lora_rank):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = str(ROOT / "tests" / "grpo_update_worker.py")
    subprocess.run([sys.executable, worker, str(tmp_path / "one"), str(mini_batches), "0", str(lora_rank)],
                   cwd=ROOT, env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                    str(tmp_path / "two"), str(mini_batches), str(max_tokens), str(lora_rank)], cwd=ROOT, env=env,
                   check=True)
    one, two = torch.load(tmp_path / "one" / "result.pt"), torch.load(tmp_path / "two" / "result.pt")
    start = one["start"]
    assert max((one["weights"][k] - start[k]).abs().max().item() for k in start) > 1e-4   # it moved
    # Adam scales each step to ~lr (1e-2) whatever the gradient's size, so rounding noise (1 vs 2 ranks
    # sum in different orders) in gradients that are zero or near zero moves weights by a few 1e-6:
    # measured up to 6e-6, in k_proj.bias (zero in exact arithmetic) and in layer 0's MLP weights.
    # 2e-5 is 0.2% of a step. A wrong normaliser shows in loss and grad_norm below, which Adam does not hide.
    for k in start:
        torch.testing.assert_close(one["weights"][k], two["weights"][k], atol=2e-5, rtol=0, msg=k)
    for key in ("loss", "clip_frac", "kl", "entropy", "grad_norm"):
        assert one["stats"][key] == pytest.approx(two["stats"][key], rel=1e-4, abs=1e-7), key
    assert two["gathered"] == []  # the frozen reference resharded its root after its forwards


def test_killed_grpo_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from mathrl import models

    start = tmp_path / "start"
    model, tokenizer = models.build_tiny_model(hidden_size=64, num_layers=2, num_heads=2, seed=1)
    model.save_pretrained(start)
    tokenizer.save_pretrained(start)
    args = ["grpo.py", "--model", str(start), "--data", "linear", "--template", "plain", "--engine", "hf",
            "--rewards", "cosine:1", "--max-steps", "4", "--save-steps", "2", "--prompts-per-step", "4",
            "--num-generations", "4", "--micro-batch-size", "8", "--temperature", "1.0", "--max-prompt-length", "64",
            "--max-completion-length", "32", "--lr", "3e-3", "--beta", "0.04", "--num-iterations", "2",
            "--no-bf16", "--no-gradient-checkpointing", "--grader-workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *args, "--output-dir", str(tmp_path / "straight")], cwd=ROOT, env=env,
                   check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    kill_after_first_checkpoint([sys.executable, *args, "--output-dir", str(interrupted)], interrupted)
    resumed = subprocess.run([sys.executable, *args, "--output-dir", str(interrupted)], cwd=ROOT, env=env,
                             check=True, capture_output=True, text=True)
    assert "resumed from" in resumed.stdout

    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert max((a[k] - model.state_dict()[k]).abs().max().item() for k in a) > 1e-3   # and it did train
    for name in ("metrics.jsonl", "trajectories.jsonl"):
        straight = (tmp_path / "straight" / name).read_text().splitlines()
        again = (interrupted / name).read_text().splitlines()
        drop_time = lambda lines: [{k: v for k, v in json.loads(l).items() if not k.startswith("time") and
                                    k not in ("tokens_per_s",)} for l in lines]
        assert drop_time(straight) == drop_time(again), name


def sgd_update(rollouts, **flags) -> dict:
    """One policy_update in one process, plain SGD (no Adam to blow rounding noise up), from fixed weights."""
    from mathrl import distributed, fsdp, models

    policy, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    cfg = grpo.Config(micro_batch_size=2, beta=0.0, lr=0.5, bf16=False, gradient_checkpointing=False,
                      logprob_chunk_size=16, **flags)
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.lr)
    scheduler = fsdp.cosine_schedule(optimizer, 1, 0.0, 1.0)
    dist = distributed.Dist(0, 1, 0, torch.device("cpu"))
    grpo.policy_update(policy, None, optimizer, scheduler, rollouts, cfg, dist, tokenizer.pad_token_id)
    return {k: v.clone() for k, v in policy.state_dict().items()}


def test_mask_truncated_trains_as_if_the_cut_off_completions_were_not_there():
    """With the token-mean loss, masked completions add no gradient and no tokens to the normaliser: the step
    equals the one on the other completions alone (their advantages unchanged: computed with the cut-off ones)."""
    import dataclasses

    from grpo_update_worker import fixed_rollouts

    rows = fixed_rollouts()
    cut = {1, 4, 5, 9}
    masked = [dataclasses.replace(r, masked=i in cut) for i, r in enumerate(rows)]
    kept = [r for i, r in enumerate(rows) if i not in cut]
    with_mask, without = sgd_update(masked, loss_type="dapo"), sgd_update(kept, loss_type="dapo")
    start = sgd_update(rows[:0] + [dataclasses.replace(rows[0], advantage=0.0)], loss_type="dapo")  # no move
    assert max((with_mask[k] - start[k]).abs().max().item() for k in start) > 1e-3  # it moved
    for k in start:
        torch.testing.assert_close(with_mask[k], without[k], atol=1e-6, rtol=0, msg=k)
    everything = sgd_update(rows, loss_type="dapo")  # the cut-off completions do move the step when trained
    assert max((everything[k] - with_mask[k]).abs().max().item() for k in start) > 1e-3


def test_rollout_marks_only_cut_off_completions_when_asked():
    from test_rollout import run_ranks

    (rollouts, _, _), = run_ranks(1)
    assert not any(r.masked for r in rollouts)  # the scripted completions all stopped ("stop")


def test_mini_batches_step_on_each_slice_with_pi_old_from_before_the_first():
    """K = 2, mu = 1, by hand: an SGD step on the first slice of groups (its own token count), then one on the
    second, whose ratio is pi / pi_old with pi_old the policy before the first step."""
    from grpo_update_worker import G, fixed_rollouts
    from mathrl import models, sequences

    rows = fixed_rollouts()  # 4 groups of G: slices of 2 groups each
    flags = dict(loss_type="dapo", epsilon_low=0.9, epsilon_high=10.0,  # wide enough that nothing clips
                 temperature=1.0, grad_clip=0.0)
    stepped = sgd_update(rows, mini_batches=2, **flags)

    policy, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    second = rows[2 * G:]
    ids, mask = sequences.pack([r.prompt_ids for r in second], [r.completion_ids for r in second],
                               tokenizer.pad_token_id, "cpu")
    logp = lambda model: grpo.token_logprobs(model, ids, mask, 1.0, 16)[0]
    with torch.no_grad():
        old = logp(policy)                                           # pi_old: before any step
    first = sgd_update(rows[:2 * G], **flags)                        # step 1: the first slice alone
    policy.load_state_dict(first)
    advantages = torch.tensor([[r.advantage] for r in second])
    ratio = torch.exp(logp(policy) - old)
    loss = -(ratio * advantages * mask[:, 1:]).sum() / mask[:, 1:].sum()  # token mean over the slice
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.5 * p.grad                                        # sgd_update's lr
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(stepped[name], value, atol=1e-6, rtol=0, msg=name)


def test_token_budget_micro_batches_fit_the_budget_and_cover_every_row_once():
    from mathrl import distributed, sequences

    dist = distributed.Dist(0, 1, 0, torch.device("cpu"))
    lengths = [12, 3, 7, 30, 5, 5, 18, 9, 2, 25]
    batches = sequences.token_budget_micro_batches(lengths, 30, dist)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 30 for b in batches)       # padded tokens
    order = [i for b in batches for i in b]
    assert [lengths[i] for i in order] == sorted(lengths)                          # by length
    # greedy: each micro-batch could not take the next row as well
    for b, nxt in zip(batches, batches[1:]):
        assert (len(b) + 1) * lengths[nxt[0]] > 30
    with pytest.raises(ValueError, match="--max-tokens-per-micro-batch"):
        sequences.token_budget_micro_batches(lengths, 29, dist)


def test_token_budget_update_equals_the_count_based_one():
    from grpo_update_worker import fixed_rollouts

    rows = fixed_rollouts()
    counted = sgd_update(rows, loss_type="grpo", grad_clip=0.0)
    budgeted = sgd_update(rows, loss_type="grpo", grad_clip=0.0, max_tokens_per_micro_batch=30)
    for k in counted:
        torch.testing.assert_close(budgeted[k], counted[k], atol=1e-6, rtol=0, msg=k)
