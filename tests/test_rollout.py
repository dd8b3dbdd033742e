"""grpo.rollout (steps 1-3) and its invariants, with a scripted engine and ranks simulated by threads:
the same prompts and groups whatever the number of ranks, the same number of rollouts on every rank,
and DAPO's dynamic sampling (only groups with signal trained, the batch for LIM unchanged)."""
import threading

import pytest
import torch

import grpo
import rewards
from mathrl import distributed, sequences
from mathrl.engine import Completion

G = 4
PROBLEMS = [{"id": f"p{i}", "answer": "7"} for i in range(40)]
PROMPTS = [f"problem {i}" for i in range(40)]


def kind(problem: int) -> str:
    """Problems 0, 3, 6... are always solved, 1, 4, 7... never, the rest half the time: signal."""
    return ("solved", "never", "mixed")[problem % 3]


class ScriptedEngine:
    """Completions decided by the prompt alone, so every rank and every rerun sees the same ones. It keeps
    vLLM's state machine on a GPU (engine.VLLMEngine with sleep mode): sleep() releases the weights, so
    waking or generating before the next push_weights is refused."""

    def __init__(self):
        self.awake, self.weights_valid = True, True

    def wake_up(self):
        if not self.weights_valid:
            raise RuntimeError("woken after sleep() without push_weights: the weights were released")
        self.awake = True

    def sleep(self):
        self.awake, self.weights_valid = False, False

    def push_weights(self, model):
        self.weights_valid = True

    def generate(self, prompts, sampling):
        assert self.awake, "generate() on a sleeping engine"
        groups = []
        for prompt in prompts:
            problem = int(prompt.split()[1])
            right = {"solved": [1] * G, "never": [0] * G, "mixed": [1, 0, 1, 0]}[kind(problem)]
            groups.append([Completion([5] * (3 + k), f"\\boxed{{{7 if ok else 8}}}", [-0.5] * (3 + k), "stop")
                           for k, ok in enumerate(right)])
        return groups


def run_ranks(world_size: int, step: int = 0, **flags):
    """rollout on `world_size` simulated ranks (threads exchanging objects); per rank (rollouts, batch, counts)."""
    cfg = grpo.Config(prompts_per_step=6, num_generations=G, seed=3, **flags)
    barrier, slots, results = threading.Barrier(world_size), [None] * world_size, [None] * world_size

    def all_gather(obj, dist):
        slots[dist.rank] = obj
        barrier.wait()
        gathered = list(slots)
        barrier.wait()
        return gathered

    def rank(r):
        dist = distributed.Dist(r, world_size, 0, torch.device("cpu"))
        results[r] = grpo.rollout(step, ScriptedEngine(), PROBLEMS, PROMPTS, [[1, 2]] * len(PROBLEMS),
                                  {"accuracy": 1.0}, None, rewards.CosineShape(), cfg, dist)

    original = distributed.all_gather_objects
    distributed.all_gather_objects = all_gather
    try:
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        distributed.all_gather_objects = original
    assert all(r is not None for r in results), "a simulated rank failed"
    return results


def trained(results) -> list:
    """(prompt ids, completion ids, advantage) of every rank's rollouts, as a sorted list."""
    return sorted((tuple(r.prompt_ids), tuple(r.completion_ids), round(r.advantage, 6))
                  for rollouts, _, _ in results for r in rollouts)


def test_the_batch_is_the_steps_prompts_at_their_stream_positions_on_any_number_of_ranks():
    step = 7   # 6 prompts a step over 40 problems: positions 42-47 are in epoch 1
    for world_size in (1, 2, 3):
        results = run_ranks(world_size, step=step)
        expected = sequences.batch_indices(step, 6, len(PROBLEMS), seed=3)
        for _, batch, _ in results:   # every rank holds the whole batch, in order
            assert [g.problem for g in batch] == expected
            assert [g.position for g in batch] == list(range(42, 48))
        assert {len(rollouts) for rollouts, _, _ in results} == {6 // world_size * G}
    assert trained(run_ranks(1, step=step)) == trained(run_ranks(2, step=step)) == trained(run_ranks(3, step=step))


def test_without_dynamic_sampling_groups_without_signal_are_trained_with_zero_advantage():
    (rollouts, batch, counts), = run_ranks(1)
    with_signal = sum(kind(g.problem) == "mixed" for g in batch)
    assert counts["sampling_rounds"] == 1 and counts["groups_with_signal"] == with_signal
    assert sum(r.advantage == 0.0 for r in rollouts) == (6 - with_signal) * G
    assert counts["generated_tokens"] == 6 * sum(3 + k for k in range(G))


@pytest.mark.parametrize("world_size", [1, 2])
def test_dynamic_sampling_trains_only_groups_with_signal_and_keeps_the_batch_for_lim(world_size):
    plain = run_ranks(world_size)
    results = run_ranks(world_size, dynamic_sampling=True, max_sampling_rounds=8)
    for (rollouts, batch, counts), (_, plain_batch, _) in zip(results, plain):
        assert [g.problem for g in batch] == [g.problem for g in plain_batch]   # trajectories unchanged
        assert len(rollouts) == 6 // world_size * G                                # same count on every rank
        assert counts["groups_with_signal"] == 6 and counts["sampling_rounds"] > 1
        assert all(r.advantage != 0.0 for r in rollouts)                          # only groups with signal
    assert len({c["sampling_rounds"] for _, _, c in results}) == 1
    assert trained(results) == trained(run_ranks(world_size, dynamic_sampling=True, max_sampling_rounds=8))


def test_dynamic_sampling_fills_the_batch_with_groups_without_signal_when_the_rounds_run_out():
    (rollouts, batch, counts), = run_ranks(1, dynamic_sampling=True, max_sampling_rounds=1)
    with_signal = sum(kind(g.problem) == "mixed" for g in batch)
    assert counts["sampling_rounds"] == 1 and counts["groups_with_signal"] == with_signal < 6
    assert len(rollouts) == 6 * G   # the batch is always full: lim.py and the loss normalisers rely on it
    assert sum(r.advantage == 0.0 for r in rollouts) == (6 - with_signal) * G
