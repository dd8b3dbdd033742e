"""The worked ablations of docs/ablations/ keep applying to the current code, and keep doing what
docs/ablations/README.md says: each patch is applied to a copy of the tree and runs two tiny GRPO
steps with the flag it adds, next to one unpatched run from the same start (same seed: the first
step samples the same completions, so every difference is the patch's)."""
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

ABLATIONS = ROOT / "docs" / "ablations"
PATCHES = sorted(path.name for path in ABLATIONS.glob("*.patch"))
# Tiny on purpose: ~6 s of CPU per run. cosine:1 (lengths in characters) gives every group distinct
# rewards, so every step has a gradient; beta > 0 loads the reference, which the KL ablation needs.
# No warm-up: the default's ceil(0.1 x 2 steps) = 1 step at lr 0 would leave step 1 without an update.
GRPO_FLAGS = {"--data": "linear", "--template": "plain", "--engine": "hf", "--rewards": "cosine:1",
              "--max-steps": "2", "--save-steps": "100", "--prompts-per-step": "4", "--num-generations": "4",
              "--micro-batch-size": "16", "--temperature": "1.0", "--max-prompt-length": "64",
              "--max-completion-length": "16", "--lr": "3e-3", "--warmup-ratio": "0", "--beta": "0.04",
              "--grader-workers": "1"}


START_SIZES = dict(hidden_size=32, num_layers=1, num_heads=2, seed=1)


def run_grpo(tree, start, output_dir, **flags):
    args = [sys.executable, "grpo.py", "--model", str(start), "--output-dir", str(output_dir),
            "--no-bf16", "--no-gradient-checkpointing"]
    for flag, value in (GRPO_FLAGS | flags).items():
        args += [flag, value]
    done = subprocess.run(args, cwd=tree, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    return metrics, load_file(str(output_dir / "model.safetensors"))


def max_weight_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def load_module(path, name):
    """A patched file as a module of its own name; its imports resolve to the project's modules."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def changed_lines(patch_text: str) -> tuple[int, int]:
    lines = patch_text.splitlines()
    added = sum(1 for l in lines if l.startswith("+") and not l.startswith("+++ "))
    removed = sum(1 for l in lines if l.startswith("-") and not l.startswith("--- "))
    return added, removed


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("start"), **START_SIZES)


@pytest.fixture(scope="module")
def baseline(start, tmp_path_factory):
    return run_grpo(ROOT, start, tmp_path_factory.mktemp("baseline") / "run")


def patched_tree(patch: str, dest):
    """The working tree's files (tracked and new, not ignored ones: no .venv) with the patch applied."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for check in (["--check"], []):
        done = subprocess.run(["git", "apply", *check, str(ABLATIONS / patch)], cwd=dest,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{patch} no longer applies to the current code: {done.stderr}"
    return dest


def test_readme_lists_every_patch_with_its_lines_changed_count():
    readme = (ABLATIONS / "README.md").read_text()
    assert len(PATCHES) >= 5
    for patch in PATCHES:
        added, removed = changed_lines((ABLATIONS / patch).read_text())
        assert f"`git apply docs/ablations/{patch}`" in readme, patch
        link = re.escape(f"[{patch}]({patch})")
        assert re.search(rf"{link}[^\n]*\+{added} -{removed}\b", readme), \
            f"README.md's line for {patch} must say +{added} -{removed}"


def check_rloo(tree, metrics, weights, baseline):
    grpo = load_module(tree / "grpo.py", "grpo_rloo")
    r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    leave_one_out = grpo.group_advantages(r, 4, "none", baseline="rloo")  # r_i - mean of the other 3
    assert torch.allclose(leave_one_out, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))
    unpatched = load_module(ROOT / "grpo.py", "grpo_head")
    assert torch.equal(grpo.group_advantages(r, 4), unpatched.group_advantages(r, 4))  # the default is GRPO's
    # the README's point: at any fixed scale, leave-one-out is the group-mean advantage times G / (G - 1)
    rloo_scaled = grpo.group_advantages(r, 4, "group", baseline="rloo")
    assert torch.allclose(rloo_scaled, 4 / 3 * grpo.group_advantages(r, 4))
    assert metrics[0]["reward/total"] == baseline[0][0]["reward/total"]    # same samples at step 1
    assert max_weight_change(weights, baseline[1]) > 1e-4                 # other advantages, other update


def mean_entropy(weights) -> float:
    """The mean next-token entropy, at temperature 1, of the start model's architecture holding these
    weights, over fixed random token sequences."""
    import grpo
    from mathrl import models

    model, tokenizer = models.build_tiny_model(**START_SIZES)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embeddings
    tokens = torch.randint(len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        entropy = grpo.token_logprobs(model, tokens, torch.ones_like(tokens), 1.0, 1024, with_entropy=True)[1]
    return entropy.mean().item()


def check_entropy_bonus(tree, metrics, weights, baseline):
    assert metrics[0]["entropy"] == pytest.approx(baseline[0][0]["entropy"], abs=1e-6)  # same first policy
    # the bonus changes the update (one left out of the loss, or detached, would leave the weights as C = 0 does)
    assert max_weight_change(weights, baseline[1]) > 1e-4
    # in the direction the sign says (loss -= C x H): on the same text, the patched policy's entropy is higher
    assert mean_entropy(weights) > mean_entropy(baseline[1])


def check_kl_estimator(tree, metrics, weights, baseline):
    grpo = load_module(tree / "grpo.py", "grpo_kl")
    # The README's claims about each estimator's gradient, exactly, on one categorical distribution:
    # E_{o ~ pi}[grad k(o)] with pi's probabilities held fixed as the expectation's weights.
    torch.manual_seed(0)
    theta, ref_logp = torch.randn(7, requires_grad=True), torch.log_softmax(torch.randn(7), -1)
    logp = torch.log_softmax(theta, -1)
    pi, ref = logp.exp(), ref_logp.exp()

    def expected_gradient(estimator):
        return torch.autograd.grad((pi.detach() * grpo.kl_estimate(logp, ref_logp, estimator)).sum(), theta,
                                   retain_graph=True)[0]
    reverse_kl = torch.autograd.grad((pi * (logp - ref_logp)).sum(), theta, retain_graph=True)[0]
    forward_kl = torch.autograd.grad((ref * (ref_logp - logp)).sum(), theta, retain_graph=True)[0]
    assert torch.allclose(expected_gradient("k1"), torch.zeros(7), atol=1e-6)
    assert torch.allclose(expected_gradient("k2"), reverse_kl, atol=1e-6)
    assert torch.allclose(expected_gradient("k3"), forward_kl, atol=1e-6)
    assert not torch.allclose(reverse_kl, forward_kl, atol=1e-3)
    # in the run: at step 1 pi = pi_ref, so k3's gradient is 0 but k1's is beta grad log pi
    assert metrics[0]["kl"] == baseline[0][0]["kl"] == 0.0
    assert max_weight_change(weights, baseline[1]) > 1e-4
    assert metrics[1]["kl"] != baseline[0][1]["kl"]


def check_linear_length(tree, metrics, weights, baseline):
    rewards = load_module(tree / "rewards.py", "rewards_linear")
    shape = rewards.CosineShape(max_len=100, correct=(1.0, 0.5), wrong=(0.0, -0.5), shape="linear")
    assert [rewards.cosine_reward(True, n, shape) for n in (0, 50, 100, 200)] == [1.0, 0.75, 0.5, 0.0]
    assert [rewards.cosine_reward(False, n, shape) for n in (0, 50, 100)] == [0.0, -0.25, -0.5]
    with pytest.raises(ValueError, match="--cosine-shape"):
        rewards.CosineShape(shape="quadratic")
    # the same completions (wrong, a few dozen characters) lose reward faster on the line than on the
    # cosine, which is flat near length 0
    assert metrics[0]["response_length_mean"] == baseline[0][0]["response_length_mean"]
    assert metrics[0]["reward/cosine"] < baseline[0][0]["reward/cosine"] < 0


def check_repetition_reward(tree, metrics, weights, baseline):
    rewards = load_module(tree / "rewards.py", "rewards_repetition")
    # 7 word trigrams, 3 distinct: 4/7 of them repeat an earlier one
    assert rewards.repetition_reward("a b c a b c a b c") == pytest.approx(-4 / 7)
    assert rewards.repetition_reward("One two three four") == 0.0 == rewards.repetition_reward("one two")
    assert rewards.parse_weights("cosine:1,repetition:0.5") == {"cosine": 1.0, "repetition": 0.5}
    for step in metrics:
        assert -1.0 <= step["reward/repetition"] <= 0.0
        total = step["reward/cosine"] + step["reward/repetition"]
        assert step["reward/total"] == pytest.approx(total, abs=1e-6)


ABLATION_RUNS = {
    "01-rloo.patch": ({"--baseline": "rloo", "--scale-rewards": "none"}, check_rloo),
    "02-entropy-bonus.patch": ({"--entropy-coef": "0.1"}, check_entropy_bonus),
    "03-kl-estimator.patch": ({"--kl-estimator": "k1"}, check_kl_estimator),
    "04-linear-length.patch": ({"--cosine-shape": "linear"}, check_linear_length),
    "05-repetition-reward.patch": ({"--rewards": "cosine:1,repetition:1"}, check_repetition_reward),
}


def test_every_patch_has_a_run():
    assert sorted(ABLATION_RUNS) == PATCHES


@pytest.mark.parametrize("patch", sorted(ABLATION_RUNS))
def test_ablation_applies_and_runs_two_steps(patch, start, baseline, tmp_path):
    flags, check = ABLATION_RUNS[patch]
    tree = patched_tree(patch, tmp_path / "tree")
    metrics, weights = run_grpo(tree, start, tmp_path / "run", **flags)
    assert all(math.isfinite(v) for step in metrics for v in step.values() if isinstance(v, float))
    check(tree, metrics, weights, baseline)
