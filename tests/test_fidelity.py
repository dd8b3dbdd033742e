"""Named things against their sources: the Open-RS, LIMR and LIMO rewards and presets.

Each reward is checked against a re-implementation written here step by step from reading the
upstream code (cited file:line), on many generated inputs; each preset value against its source line.
"""

import io
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch

import data
import grpo
import ppo
import rewards
import sft
from mathrl import flags, fsdp, models
from mathrl.grader import extract_answer, is_equiv
from rewards import CosineShape, compute_rewards, cosine_reward, format_reward, limr_reward


# ----- Open-RS cosine reward (knoveleng/open-rs src/open_r1/rewards.py:267-340, grpo.py:76-95) ----------

def open_rs_cosine(is_correct: bool, content: str, max_len=1000, min_value_wrong=0.0, max_value_wrong=-0.5,
                   min_value_correct=0.5, max_value_correct=1.0) -> float:
    """Their four values under their names; for a wrong answer the pair is swapped, so a short wrong
    completion earns min_value_wrong and a long one max_value_wrong. Length: characters, no clamp."""
    if is_correct:
        low, high = min_value_correct, max_value_correct
    else:
        low, high = max_value_wrong, min_value_wrong
    weight_of_high = (1.0 + math.cos(math.pi * len(content) / max_len)) / 2
    return low + (high - low) * weight_of_high


def test_cosine_reward_matches_open_rs_on_generated_completions():
    rng = random.Random(0)
    completions = [rng.choice("ab \n$") * rng.randrange(0, 4000) + rf" \boxed{{{rng.choice('45')}}}"
                   for _ in range(300)]
    columns = compute_rewards(completions, ["4"] * len(completions), [7] * len(completions),
                              [False] * len(completions), {"cosine": 1.0})
    expected = [open_rs_cosine(extract_answer(c) == "4", c) for c in completions]
    assert columns["cosine"] == pytest.approx(expected, abs=1e-12)
    assert any(len(c) > 2000 for c in completions)  # past max_len, where a clamp would differ
    for max_len in (1000, 3584):  # Exp. 3's value (open-rs README.md:98)
        shape = CosineShape(max_len=max_len)
        for c in completions[:50]:
            assert cosine_reward(True, len(c), shape) == pytest.approx(open_rs_cosine(True, c, max_len))
            assert cosine_reward(False, len(c), shape) == pytest.approx(open_rs_cosine(False, c, max_len))


# ----- format reward with DeepSeek-R1-Distill's real chat template --------------------------------------

# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B tokenizer_config.json "chat_template" (tool-call branches
# included as published); its generation prompt ends in "<｜Assistant｜><think>\n".
R1_DISTILL_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n'"
    " + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n'"
    " + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def r1_distill_tokenizer():
    """Rendering a chat template needs no vocabulary: the tiny tokenizer with R1-Distill's template."""
    tokenizer = models.build_tiny_tokenizer()
    tokenizer.chat_template = R1_DISTILL_CHAT_TEMPLATE
    return tokenizer


def test_open_rs_prompt_ends_in_think_and_gets_open_rs_format_rule(r1_distill_tokenizer):
    prompt = data.format_prompt("What is 1+1?", r1_distill_tokenizer, "r1")
    assert prompt == f"{data.R1_SYSTEM_PROMPT}<｜User｜>What is 1+1?<｜Assistant｜><think>\n"
    assert rewards.prompt_opens_think(prompt)
    # knoveleng/open-rs src/open_r1/rewards.py:70-81: 1 when "\n</think>\n" occurs exactly once
    rng = random.Random(1)
    pieces = ["\n</think>\n", "</think>", "<think>\n", "\n", "so 1+1=2", " \\boxed{2}", "</think>\n", "\n</think>"]
    completions = ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 6))) for _ in range(500)]
    columns = compute_rewards(completions, ["2"] * 500, [1] * 500, [False] * 500, {"format": 1.0},
                              prompts=[prompt] * 500)
    assert columns["format"] == [float(c.count("\n</think>\n") == 1) for c in completions]
    assert 50 < sum(columns["format"]) < 450  # both outcomes are exercised
    # a prompt that does not open the block (Qwen-style, or R1's plain-text form) asks for both tags
    for other in (data.format_prompt("What is 1+1?", None, "r1"), "<|im_start|>assistant\n"):
        assert not rewards.prompt_opens_think(other)
        assert format_reward("so\n</think>\n \\boxed{2}", other) == 0.0
        assert format_reward("<think>so</think> \\boxed{2}", other) == 1.0


# ----- LIMR's rule reward (GAIR-NLP/LIMR openrlhf/cli/serve_rm.py) -----------------------------------------

LIMR_BOX = re.compile(r"\\boxed\{((?:[^{}]|\\{|\\}|(?:\{(?:[^{}]|\\{|\\}|"  # :133, as one string there
                      r"(?:\{(?:[^{}]|\\{|\\}|(?:\{[^{}]*\}))*\}))*\}))*\})")
LIMR_VALID = re.compile(r'[a-zA-Z0-9\s\.,!?"\'\(\)\{\}\[\]_\-+=<>/@#$%^&*\\|:;~`\u2200-\u22FF]')  # :134
LIMR_REPEAT = re.compile(r'(.{5,}?)\1{4,}')  # :135


def limr_reference(completion: str, gold: str, cut_off: bool) -> float:
    """serve_rm.py, in the order it runs, on the query it receives (Qwen template, special tokens kept)."""
    query = ("<|im_start|>system\nPlease reason step by step.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
             "<|im_start|>assistant\n" + completion + ("" if cut_off else "<|im_end|>"))
    response = query.split("<|im_end|>\n<|im_start|>assistant\n")[-1]           # :168
    if "<|im_end|>" not in response and "<|endoftext|>" not in response:         # :169-170 no EOS
        return -1.0
    response = response.split("<|im_end|>")[0].split("<|endoftext|>")[0].strip()  # :171
    if "\\boxed" not in response or response.count("\\boxed") >= 5:              # :177-178
        return -1.0
    if response and len(LIMR_VALID.sub("", response)) / len(response) > 0.3:    # :142-147, :183
        return -1.0
    if LIMR_REPEAT.search(response):                                             # :149-150, :186
        return -1.0
    found = LIMR_BOX.findall(response)                                           # :153-155
    if not found:
        return -1.0
    predicted = found[-1][:-1]                                                   # :157 the last, minus "}"
    # :161 grades with math_verify; the project grades with grader.py (a documented difference)
    return 1.0 if is_equiv(extract_answer("\\boxed{" + predicted + "}"), gold) else -0.5


def generated_completions(count: int, seed: int):
    rng = random.Random(seed)
    fragments = ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{0.4}", "\\boxed{{{{1/2}}}}", "\\boxed{{{{{2}}}}}",
                 "\\boxed 7", "\\boxed{\\{1,2\\}}", "\\boxed{", "}", "{", "\\{", "\\}", "\\boxed", "so ", "x = ",
                 "$", " ", "\n", "\t", "\u00a0", "答案", "∑≤", "😀", "é", "the answer is ", "Step 1: ", "3.14"]
    completions = []
    for _ in range(count):
        parts = [rng.choice(fragments) for _ in range(rng.randrange(0, 10))]
        if rng.random() < 0.3:  # a run of a short piece: 5+ copies of 5+ characters trip the rule
            piece = "".join(rng.choice("ab \n") for _ in range(rng.randrange(1, 9)))
            parts.insert(rng.randrange(len(parts) + 1), piece * rng.randrange(2, 8))
        completions.append("".join(parts))
    return completions, [rng.random() < 0.15 for _ in range(count)]


def test_limr_reward_matches_limr_step_by_step_on_generated_completions():
    completions, cut_off = generated_completions(3000, seed=2)
    golds = ["\\frac{1}{2}", "0.4", "2", "7"]
    answers = [golds[i % 4] for i in range(len(completions))]
    expected = [limr_reference(c, g, t) for c, g, t in zip(completions, answers, cut_off)]
    assert [limr_reward(c, g, t) for c, g, t in zip(completions, answers, cut_off)] == expected
    columns = compute_rewards(completions, answers, [1] * len(completions), cut_off, {"limr": 1.0})
    assert columns["limr"] == expected
    for value in (1.0, -0.5, -1.0):  # every outcome is exercised, several ways for -1
        assert expected.count(value) > 100, value


def test_limr_repetition_test_agrees_with_limr_pattern():
    rng = random.Random(3)
    for _ in range(4000):
        text = "".join(rng.choice("aab \n") for _ in range(rng.randrange(0, 80)))
        if rng.random() < 0.5:
            piece = "".join(rng.choice("ab \n") for _ in range(rng.randrange(1, 12)))
            copies = piece * rng.randrange(3, 7)
            cut = rng.randrange(len(text) + 1)
            text = text[:cut] + copies[rng.randrange(3):] + text[cut:]
        assert rewards._limr_repeats(text) == bool(LIMR_REPEAT.search(text)), repr(text)


def test_limr_allowed_characters_are_limr_character_class_for_every_code_point():
    disagree = [c for c in map(chr, range(0x110000))
                if rewards._limr_garbled(c) != (LIMR_VALID.fullmatch(c) is None)]
    assert disagree == []


def test_limr_box_pattern_is_limr_pattern():
    assert rewards._LIMR_BOX.pattern == LIMR_BOX.pattern


# ----- PPO value head (LIMR's OpenRLHF openrlhf/models/model.py:152-154, :241) ---------------------------

def test_new_value_head_is_limr_initialisation_and_a_saved_one_is_kept(tmp_path):
    model, tokenizer = models.build_tiny_model(hidden_size=64, num_layers=2, num_heads=2)
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    critic = ppo.load_critic(str(tmp_path / "lm"), seed=7)
    assert critic.score.bias is None and critic.score.weight.shape == (1, 64)
    expected = torch.empty(1, 64).normal_(0.0, 1.0 / 65, generator=torch.Generator().manual_seed(7))
    assert torch.equal(critic.score.weight.detach(), expected)
    assert torch.equal(ppo.load_critic(str(tmp_path / "lm"), seed=7).score.weight, critic.score.weight)
    assert not torch.equal(ppo.load_critic(str(tmp_path / "lm"), seed=8).score.weight, critic.score.weight)
    with torch.no_grad():
        critic.score.weight.fill_(0.25)  # "trained"
    critic.save_pretrained(tmp_path / "critic")
    reloaded = ppo.load_critic(str(tmp_path / "critic"), seed=7)
    assert reloaded.score.bias is None and torch.equal(reloaded.score.weight, torch.full((1, 64), 0.25))


# ----- presets, value by value, each with its source ------------------------------------------------------

OPEN_RS = {  # knoveleng/open-rs recipes/grpo.yaml ("yaml:N"), README.md:82-88 (3 training GPUs)
    "model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",  # yaml:2
    "data": "open-rs",  # yaml:8
    "template": "r1",  # yaml:9 system prompt (data.R1_SYSTEM_PROMPT)
    "prompts_per_step": 12,  # 6 per device (yaml:42) x 4 accumulation (yaml:19) x 3 GPUs / 6 per group
    "num_generations": 6,  # yaml:37
    "micro_batch_size": 6,  # yaml:42
    "max_steps": 500, "save_steps": 50, "seed": 42,  # yaml:36, 53, 54
    "temperature": 0.7, "top_p": 1.0,  # yaml:55; trl@69ad852 grpo_trainer.py SamplingParams has no top_p
    "max_prompt_length": 512, "max_completion_length": 3584,  # yaml:34, 35
    "rewards": "format:1,cosine:2",  # yaml:46-51
    "cosine_max_len": 1000, "cosine_unit": "chars", "cosine_clamp": False,  # src/open_r1/grpo.py:92-95, rewards.py:321-324
    "cosine_correct": "1.0:0.5", "cosine_wrong": "0.0:-0.5",  # src/open_r1/grpo.py:76-91
    "lr": 1e-6, "warmup_ratio": 0.1, "min_lr_ratio": 0.1,  # yaml:25, 56, 31-33
    "lr_schedule": "transformers",  # TRL's GRPOTrainer is a transformers Trainer (setup.py:69-70)
    "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.2, "num_iterations": 1,  # trl@69ad852 grpo_config.py:234-246
    "scale_rewards": "group", "loss_type": "dapo",  # trl@69ad852 grpo_trainer.py: group std; token mean
    "weight_decay": 0.0, "grad_clip": 1.0, "adam_beta2": 0.999,  # transformers TrainingArguments defaults
    "bf16": True, "gradient_checkpointing": True,  # yaml:12, 20
}
QWEN_BASELINES_LIMO = {  # rqzhangberkeley/efficient-reasoning README.md:64, grpo_limo.sh:85, config_simple_rl.yaml
    "model": "Qwen/Qwen2.5-Math-1.5B", "data": "limo",  # grpo_limo.sh:54-55
    "template": "question",  # RL/grpo.py:262-266: user turn "Question: ..." (the chat template adds its system prompt)
    "prompts_per_step": 64, "num_generations": 7,  # README.md:64
    "max_steps": 36, "save_steps": 12,  # README.md:64: 3 epochs of 12 steps; yaml:59 save each epoch
    "micro_batch_size": 8, "seed": 1001,  # grpo_limo.sh:85
    "lr": 5e-6, "warmup_ratio": 0.1, "min_lr_ratio": 0.0,  # README.md:64, yaml:61, yaml:36
    "lr_schedule": "transformers",  # RL/grpo_trainer.py:151 CustomGRPOTrainer(Trainer)
    "weight_decay": 0.1, "grad_clip": 1.0, "beta": 0.005,  # README.md:64
    "adam_beta2": 0.999,  # their TRL's TrainingArguments default
    "epsilon_low": 0.2, "epsilon_high": 0.2, "num_iterations": 1,  # their TRL's defaults
    "temperature": 0.6, "top_p": 1.0,  # yaml:49; RL/grpo_trainer.py SamplingParams has no top_p
    "rewards": "accuracy:1",  # RL/grpo.py:332-333
    "scale_rewards": "group", "loss_type": "dapo",  # RL/grpo_trainer.py:998 token mean
    "max_prompt_length": 1024, "max_completion_length": 3072,  # OURS (yaml:34, 38 exceed the 4,096 positions)
    "bf16": True, "gradient_checkpointing": True,  # yaml:16, 25
}
LIMR_PPO = {  # GAIR-NLP/LIMR scripts/train_limr.sh ("sh:N"), openrlhf/cli/train_ppo_ray.py ("ray:N")
    "model": "Qwen/Qwen2.5-Math-7B", "data": "limr", "template": "qwen-math",  # sh:41, sh:66, sh:68-69
    "prompts_per_step": 1024, "num_generations": 8, "train_batch_size": 256,  # sh:50, 51, 48
    "ppo_epochs": 1, "micro_batch_size": 4,  # sh:52, 46
    "temperature": 1.2, "top_p": 1.0,  # sh:77, ray:282
    "max_prompt_length": 1024, "max_completion_length": 3072, "rewards": "limr:1",  # sh:54, 55, 4-10
    "kl_coef": 0.01, "gamma": 1.0, "lam": 0.95, "clip_eps": 0.2, "value_clip": 0.2,  # sh:59, ray:278, sh:62, 60, 61
    "actor_lr": 5e-7, "critic_lr": 9e-6, "critic_warmup_steps": 0,  # sh:57, 58
    "lr_schedule": "transformers", "min_lr_ratio": 0.1,  # ppo_actor.py:250-256 get_scheduler, min_lr 0.1 x lr
    "warmup_steps": 10, "warmup_ratio": 0.03,  # sh:65 --lr_warmup_steps; ray:292 (unused then)
    "schedule_steps": 430_000,  # ppo_actor.py:240-243: ceil(10000 (sh:53) x (1389 x 8 // 256 x 1)) updates
    "weight_decay": 0.0, "grad_clip": 1.0,  # ray:273, 272
    "bf16": True, "gradient_checkpointing": True,  # sh:64, 76
}
LIMO_SFT = {  # GAIR-NLP/LIMO train/examples/train_limo.yaml ("yaml:N")
    "model": "Qwen/Qwen2.5-7B-Instruct",  # OURS: LIMO's Qwen2.5-32B-Instruct (yaml:2) family at 7B
    "data": "limo", "template": "qwen-math",  # yaml:16 qwen template, README.md:95-98 system prompt
    "lr": 5e-6, "warmup_ratio": 0.0, "min_lr_ratio": 0.0,  # yaml:28, 31, 30
    "max_length": 16384, "bf16": True,  # yaml:13, 32
    "batch_size": 64, "max_steps": 192,  # the paper's batch; 15 epochs (yaml:29) of 817 in 64s
    "adam_beta2": 0.999,  # LLaMA-Factory = the transformers Trainer: its AdamW default
    "lr_schedule": "transformers",  # and its scheduler (train/src/llamafactory/train/sft/trainer.py:78-82)
}


@pytest.mark.parametrize("presets, name, expected", [
    (grpo.PRESETS, "open-rs", OPEN_RS), (grpo.PRESETS, "limo", QWEN_BASELINES_LIMO),
    (ppo.PRESETS, "limr", LIMR_PPO), (sft.PRESETS, "limo", LIMO_SFT),
])
def test_preset_values_are_their_sources(presets, name, expected):
    assert {key: presets[name].get(key) for key in expected} == expected


def test_open_rs_batch_is_twelve_prompts_of_six_and_limo_epochs_are_twelve_steps():
    assert OPEN_RS["prompts_per_step"] * OPEN_RS["num_generations"] == 6 * 4 * 3  # 72 completions per step
    assert 817 // QWEN_BASELINES_LIMO["prompts_per_step"] == QWEN_BASELINES_LIMO["save_steps"] == 12
    assert LIMO_SFT["max_steps"] == math.ceil(15 * 817 / 64)  # 15 epochs of examples


def test_cosine_flags_reach_the_reward_from_the_command_line():
    cfg = flags.parse_args(grpo.Config, grpo.PRESETS, ["--preset", "open-rs"])
    shape = CosineShape.from_flags(cfg.cosine_max_len, cfg.cosine_unit, cfg.cosine_clamp, cfg.cosine_correct,
                                   cfg.cosine_wrong)
    assert shape == CosineShape()  # the defaults are Open-RS's values
    argv = ["--preset", "limr", "--cosine-max-len", "3584", "--cosine-unit", "tokens", "--cosine-clamp",
            "--cosine-correct", "2:1", "--cosine-wrong=-1:-0.5"]
    cfg = flags.parse_args(ppo.Config, ppo.PRESETS, argv)
    shape = CosineShape.from_flags(cfg.cosine_max_len, cfg.cosine_unit, cfg.cosine_clamp, cfg.cosine_correct,
                                   cfg.cosine_wrong)
    assert shape == CosineShape(max_len=3584, unit="tokens", clamp=True, correct=(2.0, 1.0), wrong=(-1.0, -0.5))


def test_the_limr_schedule_spans_the_steps_openrlhf_computes():
    # ppo_actor.py:240-243: len(prompts) x n_samples_per_prompt // train_batch_size x max_epochs x num_episodes
    assert math.ceil(10000 * (1389 * 8 // 256 * 1)) == LIMR_PPO["schedule_steps"]


# ----- learning-rate schedules, step by step against transformers' schedulers built as upstream builds them --

def lrs_of(build, lr: float, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimizer steps under the scheduler build(optimizer) returns."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, lrs = build(optimizer), []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: a no-op that keeps torch's order-of-calls check quiet
        scheduler.step()
    return lrs


def hf_trainer_scheduler(optimizer, num_training_steps: int, **training_args):
    """What the transformers Trainer builds (TRL's GRPOTrainer, the Qwen-baselines' CustomGRPOTrainer and
    LLaMA-Factory's trainer inherit it): Trainer.create_scheduler on TrainingArguments. transformers 5 folds
    the yamls' warmup_ratio into warmup_steps (< 1: a ratio, get_warmup_steps = ceil(ratio x steps))."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to="none", **training_args)
    trainer = SimpleNamespace(args=args, lr_scheduler=None)  # the two attributes create_scheduler reads
    return Trainer.create_scheduler(trainer, num_training_steps, optimizer)


def openrlhf_scheduler(optimizer, lr: float):
    """GAIR-NLP/LIMR openrlhf/trainer/ray/ppo_actor.py:239-256 (ppo_critic.py:101-112 the same with the
    critic's lr and the actor's max_steps), with train_limr.sh's arguments."""
    from transformers.trainer import get_scheduler

    max_steps = math.ceil(10000 * (1389 * 8 // 256 * 1))  # --num_episodes (sh:53) x updates per episode
    lr_warmup_steps = 10  # sh:65
    num_warmup_steps = lr_warmup_steps if lr_warmup_steps else math.ceil(max_steps * 0.03)
    return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=num_warmup_steps,
                         num_training_steps=max_steps, scheduler_specific_kwargs={"min_lr": lr * 0.1})


@pytest.mark.parametrize("trainer, preset, lr_flag, reference", [
    # knoveleng/open-rs recipes/grpo.yaml:25, 31-33, 36, 56
    (grpo, "open-rs", "lr", lambda opt, n: hf_trainer_scheduler(
        opt, n, learning_rate=1e-6, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0.1, max_steps=500)),
    # efficient-reasoning grpo_limo.sh:65 (cosine), config_simple_rl.yaml:61 (warm-up 0.1); 36 steps
    (grpo, "limo", "lr", lambda opt, n: hf_trainer_scheduler(
        opt, n, learning_rate=5e-6, lr_scheduler_type="cosine", warmup_steps=0.1)),
    # GAIR-NLP/LIMO train/examples/train_limo.yaml:28, 30, 31
    (sft, "limo", "lr", lambda opt, n: hf_trainer_scheduler(
        opt, n, learning_rate=5e-6, lr_scheduler_type="cosine", warmup_steps=0.0)),
    (ppo, "limr", "actor_lr", lambda opt, n: openrlhf_scheduler(opt, 5e-7)),   # sh:57
    (ppo, "limr", "critic_lr", lambda opt, n: openrlhf_scheduler(opt, 9e-6)),  # sh:58
])
def test_named_presets_schedule_the_lr_of_every_step_as_their_trainers(trainer, preset, lr_flag, reference):
    cfg = flags.parse_args(trainer.Config, trainer.PRESETS, ["--preset", preset])
    lr = getattr(cfg, lr_flag)
    if trainer is ppo:  # the run's updates: rollout / train batch x epochs per step; both models alike
        run_steps = cfg.max_steps * cfg.prompts_per_step * cfg.num_generations // cfg.train_batch_size
        ours = lambda opt: fsdp.lr_schedule(opt, cfg.lr_schedule, cfg.schedule_steps or run_steps,
                                            cfg.warmup_ratio, cfg.min_lr_ratio, cfg.warmup_steps)
    else:  # grpo.py: max_steps x num_iterations optimizer steps; sft.py: max_steps
        run_steps = cfg.max_steps * getattr(cfg, "num_iterations", 1)
        ours = lambda opt: fsdp.lr_schedule(opt, cfg.lr_schedule, run_steps, cfg.warmup_ratio,
                                            cfg.min_lr_ratio)
    expected = lrs_of(lambda opt: reference(opt, run_steps), lr, run_steps)
    assert lrs_of(ours, lr, run_steps) == expected  # every step, to the last bit
    warmup = {"open-rs": 50, "limo": 4 if trainer is grpo else 0, "limr": 10}[preset]  # ceil(ratio x steps)
    assert expected[0] == (0.0 if warmup else lr) and expected[warmup] == pytest.approx(lr, rel=1e-3)
    assert expected[:warmup] == pytest.approx([lr * k / warmup for k in range(warmup)], rel=1e-12)


def test_tiny_presets_keep_the_schedule_their_results_were_measured_with():
    """The tiny presets count warm-up as before (lr / warmup at the first step, round(ratio x steps)),
    so the CPU experiments' weights do not move; sft's tiny warm-up is where the two counts differ."""
    for module in (grpo, ppo, sft):
        assert module.PRESETS["tiny"]["lr_schedule"] == "mathrl"
    cfg = flags.parse_args(sft.Config, sft.PRESETS, ["--preset", "tiny"])
    build = lambda schedule: lambda opt: fsdp.lr_schedule(opt, schedule, cfg.max_steps, cfg.warmup_ratio,
                                                          cfg.min_lr_ratio)
    mathrl, transformers = lrs_of(build("mathrl"), cfg.lr, 61), lrs_of(build("transformers"), cfg.lr, 61)
    assert mathrl[:2] == pytest.approx([cfg.lr / 60, 2 * cfg.lr / 60]) and mathrl[59] == pytest.approx(cfg.lr)
    assert transformers[:2] == pytest.approx([0.0, cfg.lr / 60]) and transformers[60] == pytest.approx(cfg.lr)


def test_a_transformers_schedule_resumes_from_its_state_dict_exactly():
    """checkpoints.save_checkpoint keeps scheduler.state_dict() (torch.save) and the optimizer's state;
    a fresh scheduler loading both continues the same learning rates."""
    build = lambda opt: fsdp.lr_schedule(opt, "transformers", 40, 0.1, 0.1)
    straight = lrs_of(build, 1e-3, 40)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build(optimizer)
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    saved = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build(optimizer)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    resumed = []
    for _ in range(13, 40):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == straight[13:]


# ----- the defaults are one named recipe per script --------------------------------------------------------

@pytest.mark.parametrize("trainer, preset", [(grpo, "limo"), (ppo, "limr"), (sft, "limo")])
def test_defaults_are_the_recipe_of_one_preset_and_help_names_it(trainer, preset, capsys):
    defaults = trainer.Config()
    assert {k: getattr(defaults, k) for k in trainer.PRESETS[preset]} == trainer.PRESETS[preset]
    by_data = flags.parse_args(trainer.Config, trainer.PRESETS, ["--data", preset])
    by_preset = flags.parse_args(trainer.Config, trainer.PRESETS, ["--preset", preset])
    assert vars(by_data) | {"preset": preset} == vars(by_preset)  # --data NAME is --preset NAME here
    assert capsys.readouterr().err == ""  # so nothing to say about it
    with pytest.raises(SystemExit):
        flags.parse_args(trainer.Config, trainer.PRESETS, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"Without one, the defaults are the {preset} preset's values." in help_text


def test_data_named_like_another_preset_says_what_that_preset_would_add(capsys):
    cfg = flags.parse_args(grpo.Config, grpo.PRESETS, ["--data", "open-rs"])
    assert (cfg.data, cfg.model, cfg.rewards) == ("open-rs", "Qwen/Qwen2.5-Math-1.5B", "accuracy:1")
    note = capsys.readouterr().err
    assert note.startswith("note: --data open-rs gives the open-rs problems only; --preset open-rs would also "
                           "set model=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, template=r1,")
    assert "rewards=format:1,cosine:2" in note and "lr_schedule" not in note  # only the values that differ
    flags.parse_args(grpo.Config, grpo.PRESETS, ["--model", "some/model"])  # --data not given: no note
    assert capsys.readouterr().err == ""
