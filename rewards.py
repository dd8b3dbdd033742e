"""Rewards for reinforcement learning on math problems.

Each reward scores one completion; compute_rewards combines them with the weights of a spec such
as "format:1,cosine:2". Whether an answer is correct is decided by grader.py (extraction,
normalisation, equivalence under a time limit, and the Grader process pool).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from mathrl.grader import Grader, extract_answer, is_equiv


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is equivalent to the gold answer, else 0.0."""
    return 1.0 if is_equiv(extract_answer(completion), answer) else 0.0


# ---- format: which rule depends on the prompt -------------------------------------------------

def prompt_opens_think(prompt: str) -> bool:
    """Does the prompt itself open the reasoning block? DeepSeek-R1-Distill's chat template ends
    every generation prompt with "<｜Assistant｜><think>\\n", so its completions never contain <think>."""
    return prompt.rstrip().endswith("<think>")


def format_reward(completion: str, prompt: str = "") -> float:
    """1.0 when the completion has the R1 layout, else 0.0; the rule follows the prompt.

    Prompt ending in `<think>` (R1-Distill's template, the open-rs preset): Open-RS's rule, the
    completion contains "\\n</think>\\n" exactly once (knoveleng/open-rs src/open_r1/rewards.py:70-81).
    Otherwise the full layout "<think> reasoning </think> answer": after stripping surrounding
    whitespace the completion starts with `<think>`, contains one `<think>` and one `</think>`, the
    reasoning between them is not blank, and the text after `</think>` carries a final answer that
    extract_answer finds (a \\boxed{}, an <answer>...</answer> tag, "The answer is X" or "#### X").
    """
    if prompt_opens_think(prompt):
        return 1.0 if completion.count("\n</think>\n") == 1 else 0.0  # open-rs rewards.py:76
    text = completion.strip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return 0.0
    reasoning, answer = text[len("<think>"):].split("</think>")
    if not reasoning.strip() or extract_answer(answer) is None:
        return 0.0
    return 1.0


# ---- cosine-scaled accuracy (Open-RS, from open-r1) -------------------------------------------

@dataclass(frozen=True)
class CosineShape:
    """How Open-RS's cosine reward maps (correct, length) to a reward; defaults are Open-RS's run.

    The reward moves along half a cosine from its value at length 0 to its value at max_len.
    Open-RS measures length in characters of the decoded completion and never clamps, so past
    max_len the cosine turns back up (a 2 * max_len completion scores like an empty one).
    `unit="tokens"` and `clamp=True` are this project's options, not Open-RS's.
    """
    max_len: int = 1000       # open-rs src/open_r1/grpo.py:92-95 cosine_max_len (Exp. 3 passed 3584: README.md:98)
    unit: str = "chars"       # open-rs src/open_r1/rewards.py:321 gen_len = len(content)
    clamp: bool = False       # open-rs src/open_r1/rewards.py:324 progress = gen_len / max_len, unclamped
    correct: tuple = (1.0, 0.5)   # (at length 0, at max_len): grpo.py:88-91 max 1.0, grpo.py:84-87 min 0.5
    wrong: tuple = (0.0, -0.5)    # grpo.py:76-79 cosine_min_value_wrong 0.0, grpo.py:80-83 max_value_wrong -0.5

    def __post_init__(self):
        if self.max_len <= 0:
            raise ValueError(f"--cosine-max-len must be positive, got {self.max_len}")
        if self.unit not in ("chars", "tokens"):
            raise ValueError(f"--cosine-unit must be chars or tokens, got {self.unit!r}")
        for name, pair in (("correct", self.correct), ("wrong", self.wrong)):
            if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
                raise ValueError(f"--cosine-{name} needs two finite numbers START:END, got {pair}")

    @classmethod
    def from_flags(cls, max_len: int, unit: str, clamp: bool, correct: str, wrong: str) -> CosineShape:
        """From the trainers' --cosine-* flags; a bad value raises ValueError naming the flag."""
        def pair(flag: str, text: str) -> tuple:
            try:
                start, end = (float(v) for v in text.split(":"))
            except ValueError:
                raise ValueError(f"--cosine-{flag} wants START:END (reward at length 0 and at "
                                 f"--cosine-max-len), got {text!r}") from None
            return start, end
        return cls(max_len, unit, clamp, pair("correct", correct), pair("wrong", wrong))


def cosine_reward(correct: bool, length: int, shape: CosineShape = CosineShape()) -> float:
    """start + (end - start) * (1 - cos(pi * length / max_len)) / 2, with (start, end) from
    shape.correct or shape.wrong: Open-RS's formula (open-rs src/open_r1/rewards.py:323-335)."""
    if length < 0:
        raise ValueError(f"cosine_reward: length must be non-negative, got {length}")
    start, end = shape.correct if correct else shape.wrong
    progress = (min(length, shape.max_len) if shape.clamp else length) / shape.max_len
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


# ---- DAPO's soft overlong punishment --------------------------------------------------------------

@dataclass(frozen=True)
class OverlongShape:
    """DAPO's length-aware penalty for completions near the limit (DAPO paper sec. 3.4, eq. 13; verl
    verl/workers/reward_manager/dapo.py, DAPORewardManager.__call__, the overlong_buffer_cfg block, with
    its penalty_factor 1.0). DAPO trained with L_max = 20,480 and a 4,096-token buffer (sec. 4.1)."""
    max_len: int      # L_max: the trainers' --max-completion-length
    buffer: int       # L_cache: --overlong-buffer

    @classmethod
    def from_flags(cls, max_len: int, buffer: int, used: bool) -> OverlongShape:
        """A bad --overlong-buffer raises ValueError naming the flag, only when `overlong` is a reward."""
        if used and not 0 < buffer <= max_len:
            raise ValueError(f"--rewards overlong needs 0 < --overlong-buffer <= --max-completion-length "
                             f"({max_len}), got {buffer}")
        return cls(max_len, buffer)


def overlong_reward(num_tokens: int, shape: OverlongShape) -> float:
    """0 up to L_max - L_cache tokens, then (L_max - L_cache - |y|) / L_cache, down to -1 at L_max (eq. 13).
    The engine never returns more than L_max tokens; verl's min(..., 0) is the same expression."""
    expected = shape.max_len - shape.buffer
    return max(-1.0, min(0.0, (expected - num_tokens) / shape.buffer))


# ---- LIMR's rule reward (GAIR-NLP/LIMR openrlhf/cli/serve_rm.py, RuleBasedRMProxy) -------------

LIMR_MAX_BOXES = 5           # serve_rm.py:177: 5 or more "\boxed" score -1
LIMR_MAX_GARBLED = 0.3       # serve_rm.py:147: more than 30% of characters outside the allowed set
LIMR_REPEAT = (5, 5)         # serve_rm.py:135 (.{5,}?)\1{4,}: a 5+ character piece, 5+ times in a row
# serve_rm.py:134: the allowed characters (ASCII letters, digits, whitespace, this punctuation, U+2200-22FF)
_LIMR_ALLOWED_PUNCTUATION = frozenset(".,!?\"'(){}[]_-+=<>/@#$%^&*\\|:;~`")
# serve_rm.py:133: a box whose braces nest at most three deep inside it (\{ and \} count as characters);
# the last one that matches is graded, without its closing brace (serve_rm.py:153-157)
_LIMR_BOX = re.compile(r"\\boxed\{((?:[^{}]|\\{|\\}|(?:\{(?:[^{}]|\\{|\\}|(?:\{(?:[^{}]|\\{|\\}|"
                       r"(?:\{[^{}]*\}))*\}))*\}))*\})")


def _limr_garbled(text: str) -> bool:
    """More than LIMR_MAX_GARBLED of the characters outside LIMR's allowed set."""
    allowed = sum(1 for ch in text if (ch.isascii() and ch.isalnum()) or ch.isspace()
                  or ch in _LIMR_ALLOWED_PUNCTUATION or "\u2200" <= ch <= "\u22ff")
    return bool(text) and (len(text) - allowed) / len(text) > LIMR_MAX_GARBLED


def _limr_repeats(text: str) -> bool:
    """Is there a piece u of at least 5 characters, no newline in it, written 5 times in a row?

    The answer LIMR's regular expression gives (serve_rm.py:135), which takes seconds on one long
    line (it retries every length at every start). Here: the text contains u^5 with |u| = L iff
    some 4L consecutive positions k have text[k] == text[k + L] and no newline at k (a newline
    anywhere in the run repeats in its first L characters). One vectorised pass per L.
    """
    min_piece, times = LIMR_REPEAT
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    line_ends = np.flatnonzero(codes == ord("\n"))
    longest_line = np.diff(np.concatenate(([-1], line_ends, [len(codes)]))).max() - 1
    not_newline = codes != ord("\n")
    for piece in range(min_piece, longest_line // times + 1):
        run = (times - 1) * piece
        same = (codes[:-piece] == codes[piece:]) & not_newline[:-piece]
        counts = np.concatenate(([0], np.cumsum(same)))
        if (counts[run:] - counts[:-run] == run).any():
            return True
    return False


def limr_answer(completion: str, truncated: bool) -> str | None:
    """What LIMR grades: the content of the last box its pattern matches, or None when its rule
    gives -1 before grading. Checked in LIMR's order on the stripped response (serve_rm.py:163-189):
    cut off before EOS; no "\\boxed" or 5 or more; garbled; repeating; no box the pattern parses."""
    if truncated:
        return None
    response = completion.strip()
    if not 0 < response.count("\\boxed") < LIMR_MAX_BOXES:
        return None
    if _limr_garbled(response) or _limr_repeats(response):
        return None
    boxes = _LIMR_BOX.findall(response)
    return boxes[-1][:-1] if boxes else None


def limr_reward(completion: str, answer: str, truncated: bool) -> float:
    """LIMR's rule reward: -1 when limr_answer is None, else 1 right, -0.5 wrong (serve_rm.py:161).

    Known differences: the box is graded by grader.py, not math_verify; LIMR's 2-second limit on the
    whole rule (serve_rm.py:128, -1 when it fires) is not reproduced: its quadratic repetition regex
    is computed here in a fraction of that time, and a grading time-out counts as wrong (-0.5)."""
    predicted = limr_answer(completion, truncated)
    if predicted is None:
        return -1.0
    return 1.0 if is_equiv(extract_answer(f"\\boxed{{{predicted}}}"), answer) else -0.5


REWARD_NAMES = ("accuracy", "format", "cosine", "limr", "overlong")


def _grade(texts: list[str], answers: list[str], grader: Grader | None) -> list[bool]:
    if grader is not None:
        return grader.correct(texts, answers)
    return [is_equiv(extract_answer(t), a) for t, a in zip(texts, answers)]


def compute_rewards(completions: list[str], answers: list[str], num_tokens: list[int],
                    truncated: list[bool], weights: dict[str, float], grader: Grader | None = None,
                    prompts: list[str] | None = None,
                    cosine: CosineShape = CosineShape(),
                    overlong: OverlongShape | None = None) -> dict[str, list[float]]:
    """One column per reward named in weights, plus "correct" (0/1) and "total" (weighted sum).

    Correctness is decided once per completion (in the grader's workers when one is given) and
    shared by accuracy and cosine. `prompts` (one per completion) choose the format rule. LIMR
    grades the last box its own pattern matches; only where that differs from extract_answer's
    answer is it graded a second time.
    """
    unknown = set(weights) - set(REWARD_NAMES)
    if unknown:
        raise ValueError(f"compute_rewards: unknown rewards {sorted(unknown)}; known: {REWARD_NAMES}")
    n = len(completions)
    prompts = [""] * n if prompts is None else prompts
    if not (len(answers) == len(num_tokens) == len(truncated) == len(prompts) == n):
        raise ValueError(f"compute_rewards: lengths differ: {n} completions, {len(answers)} answers, "
                         f"{len(num_tokens)} num_tokens, {len(truncated)} truncated, {len(prompts)} prompts")
    correct = _grade(completions, answers, grader)
    columns = {"correct": [float(c) for c in correct]}
    for name in weights:
        if name == "accuracy":
            columns[name] = [float(c) for c in correct]
        elif name == "format":
            columns[name] = [format_reward(c, p) for c, p in zip(completions, prompts)]
        elif name == "cosine":
            lengths = [len(c) for c in completions] if cosine.unit == "chars" else num_tokens
            columns[name] = [cosine_reward(ok, length, cosine) for ok, length in zip(correct, lengths)]
        elif name == "limr":
            boxed = [None if p is None else f"\\boxed{{{p}}}" for p in map(limr_answer, completions, truncated)]
            again = [i for i, b in enumerate(boxed) if b is not None
                     and extract_answer(b) != extract_answer(completions[i])]
            regraded = dict(zip(again, _grade([boxed[i] for i in again], [answers[i] for i in again], grader)))
            columns[name] = [-1.0 if b is None else 1.0 if regraded.get(i, correct[i]) else -0.5
                             for i, b in enumerate(boxed)]
        elif name == "overlong":
            if overlong is None:
                raise ValueError("compute_rewards: the overlong reward needs an OverlongShape")
            columns[name] = [overlong_reward(length, overlong) for length in num_tokens]
    columns["total"] = [sum(weights[name] * columns[name][i] for name in weights) for i in range(n)]
    return columns


def parse_weights(spec: str) -> dict[str, float]:
    """"format:1,cosine:2" -> {"format": 1.0, "cosine": 2.0} (a bare name weighs 1)."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = (text.strip() for text in part.partition(":"))
        if name not in REWARD_NAMES:
            raise ValueError(f"unknown reward {name!r} in --rewards {spec!r}; "
                             f"choose from {', '.join(REWARD_NAMES)}")
        if name in weights:  # "accuracy:1,accuracy:2" must not quietly mean accuracy:2
            raise ValueError(f"reward {name!r} appears twice in --rewards {spec!r}")
        try:
            weights[name] = float(weight or 1.0)
        except ValueError:
            raise ValueError(f"weight {weight!r} of {name!r} in --rewards {spec!r} is not a number") from None
        if not math.isfinite(weights[name]):  # a NaN weight makes every advantage NaN
            raise ValueError(f"weight {weight!r} of {name!r} in --rewards {spec!r} is not finite")
    return weights
