"""Learning Impact Measurement (LIM): score RL training samples by how they learn, keep the best.

    python grpo.py --data math-8k=math.8k.json --output-dir runs/full          # writes trajectories.jsonl
    python lim.py --trajectories runs/full/trajectories.jsonl --data math-8k=math.8k.json \
        --method lim --threshold 0.6 --out selected.jsonl --scores scores.json
    python grpo.py --data selected.jsonl --output-dir runs/lim                 # retrain on the subset
    python lim.py --scores-file limr_scores.json --data math-8k=math.8k.json --out limr.jsonl
    python lim.py --limr-steps data/output/math.8k/train --epochs 21 --data math-8k=math.8k.json \
        --out limr.jsonl          # LIMR's own run's step files, scored as lim.sh does

LIMR (Li et al., 2025, "LIMR: Less is More for RL Scaling") trains once on the whole pool and
records, for every prompt i and epoch k, the fraction r_i^k of its sampled completions judged
correct. The model's average learning curve is

    rbar^k = mean_i r_i^k

and a sample is worth keeping when its own curve follows that average: it is learned as the model
learns. Its LIM score is its squared distance from the curve, measured against the distance of a
sample solved in every epoch (r = 1):

    s_i = 1 - sum_k (r_i^k - rbar^k)^2 / sum_k (1 - rbar^k)^2

s_i = 1 on the curve, 0 as far from it as an always-solved sample, negative farther still (mostly
samples the model never learns to solve). Keeping s_i >= 0.6 took 1,389 of the 8,523 MATH level
3-5 problems, and RL on those matched RL on all of them.

Gaps: a prompt may sit out an epoch. --gaps picks the rule; the default is LIMR's, because a
selection named after LIMR must select what LIMR's released code selects (an improvement is opt-in).
  - limr (default; GAIR-NLP/LIMR lim/lim_selection.py): an epoch is a fixed number of steps (8 steps
    of 1,024 prompts in LIMR's run: lim/lim.sh:5, scripts/train_math.8k.sh:50; the loader drops the
    last partial batch, openrlhf/utils/deepspeed/deepspeed.py:150, so 331 of the 8,523 prompts sit
    out each epoch); an unseen epoch takes the next epoch's value, once (lim_selection.py:37-40: a gap
    of two epochs, or one in the last epoch, stays open); a prompt with a gap left is dropped (:43-45);
    rbar^k averages the prompts kept (:52). That is why LIMR's published scores.json holds 7,935
    prompts, not 8,523. The rule applies before any --method, so RAND and LINEAR draw from the same
    prompts LIM scores.
  - seen (ours, opt-in): every prompt seen at all is kept and scored over the epochs it was seen in;
    rbar^k averages the prompts seen in epoch k. A run stopped inside an epoch gives the prompts that
    epoch reached one more term (under limr it drops the rest); --epochs N leaves that epoch out.
The case sum_k (1 - rbar^k)^2 = 0 (rbar^k = 1 wherever the prompt is scored, so it was solved there
too) scores 1, on the curve; LIMR's code would divide by zero, which never happens on a real pool.

The paper's baselines, for comparison:
  - RAND: as many samples as LIM keeps at the threshold, drawn uniformly at random (seeded).
  - LINEAR: samples whose reward rises steadily over the epochs (paper threshold 0.7; the paper
    does not define the score). Ours is the R^2 of the least-squares line through (k, r_i^k) over
    the epochs observed, signed by the line's slope: +1 for a rise along a straight line, -1 for a
    straight fall, near 0 for no linear trend, and exactly 0 when there is no trend to fit (a flat
    trajectory, or fewer than two epochs). It measures steadiness, not size: a straight rise from
    0.1 to 0.3 scores like one from 0 to 1.

Input, one of:
  - --trajectories: OUTPUT_DIR/trajectories.jsonl of grpo.py, one line per (training step, prompt):
    {"step", "id", "epoch" (0-based), "correct" (of its G samples), "n" (= G)}. A prompt drawn twice in
    an epoch (a batch that wraps) counts once: r_i^k = sum(correct) / sum(n) over its lines.
  - --limr-steps: the directory LIMR's OpenRLHF fork writes every step to, SAMPLES_SAVE_PATH/train/
    step_1.json, step_2.json, ...: a JSON list of {"prompt", "response", "reward", "response_length"},
    one per sampled completion. A completion is correct when its reward is exactly 1 (LIMR's reward
    gives 1, -0.5 or -1), and step s belongs to epoch (s - 1) // --steps-per-epoch.
  - --scores-file: published scores (LIMR's data/scores.json) or our own --scores output.
Output: the kept problems in data.py's schema (a file grpo.py, ppo.py and sft.py take as --data),
and with --scores, every scored sample's id, score, trajectory and whether it was kept.
"""
import argparse
import json
from pathlib import Path

import numpy as np

import data

METHODS = ("lim", "linear", "rand")
PAPER_THRESHOLDS = {"lim": 0.6, "rand": 0.6, "linear": 0.7}  # LIMR lim/lim.sh:8; linear: the LIMR paper
GAP_RULES = ("limr", "seen")
LIMR_STEPS_PER_EPOCH = 8  # LIMR lim/lim.sh:5 (8 x 1,024 prompts, scripts/train_math.8k.sh:50, drop_last)
LIMR_CORRECT_REWARD = 1   # LIMR lim/lim_selection.py:29: a completion counts as correct iff reward == 1


# ----------------------------------------------------------------------------------------------
# Trajectories: r_i^k as a (samples, epochs) array, NaN where sample i was not seen in epoch k.

def write_trajectories(output_dir, step: int, groups, problems: list[dict], dist):
    """What an RL trainer records for LIM, on rank 0: one line per prompt of step `step` (0-based) in
    output_dir/trajectories.jsonl, with the epoch its batch position falls in and how many of its group's
    completions were right. read_trajectories turns the lines into r_i^k. `groups` are the step's batch
    in order (sequences.Group, every rank's), `problems` the trainer's problem list."""
    if not dist.is_main:
        return
    with open(Path(output_dir) / "trajectories.jsonl", "a") as f:
        for g in groups:
            f.write(json.dumps({"step": step + 1, "id": problems[g.problem]["id"],
                                "epoch": g.position // len(problems),
                                "correct": sum(g.rewards["correct"]), "n": len(g.completions)}) + "\n")


def read_trajectories(path, epochs: int | None = None) -> tuple[list[str], np.ndarray]:
    """Sample ids in order of first appearance and their r_i^k; `epochs` keeps epochs 0..epochs-1."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path} does not exist")
    totals = {}  # (id, epoch) -> [correct, n]
    for where, row in data.jsonl_rows(path):
        if not isinstance(row, dict) or any(key not in row for key in ("id", "epoch", "correct", "n")):
            raise data.DataError(f"{where}: expected an object with id, epoch, correct, n")
        epoch, correct, n = row["epoch"], row["correct"], row["n"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(n, int) and n > 0
                and isinstance(correct, (int, float)) and 0 <= correct <= n):
            raise data.DataError(f"{where}: need an integer epoch >= 0, an integer n > 0 and "
                                 f"0 <= correct <= n (got epoch={epoch!r}, correct={correct!r}, n={n!r})")
        if epochs is None or epoch < epochs:
            total = totals.setdefault((str(row["id"]), epoch), [0, 0])
            total[0], total[1] = total[0] + correct, total[1] + n
    if not totals:
        raise data.DataError(f"{path}: no trajectories" + (f" in epochs 0-{epochs - 1}" if epochs else ""))
    ids = list(dict.fromkeys(i for i, _ in totals))
    row_of = {i: row for row, i in enumerate(ids)}
    r = np.full((len(ids), 1 + max(k for _, k in totals)), np.nan)
    for (i, k), (correct, n) in totals.items():
        r[row_of[i], k] = correct / n
    return ids, r


def read_limr_steps(directory, steps_per_epoch: int = LIMR_STEPS_PER_EPOCH,
                    epochs: int | None = None) -> tuple[list[str], np.ndarray]:
    """LIMR's per-step sample files (DIR/step_1.json, ...; their OpenRLHF fork's
    openrlhf/trainer/ppo_trainer.py:285-288): prompts in order of first appearance and their r_i^k,
    NaN where a prompt was not drawn in epoch k. Reads whole epochs only, as lim_selection.py:11-19
    does: `epochs` of them, or as many as the files present complete."""
    directory = Path(directory)
    if not directory.is_dir():
        raise data.DataError(f"--limr-steps {directory} is not a directory")
    if epochs is None:
        present = 0
        while (directory / f"step_{present + 1}.json").is_file():
            present += 1
        epochs = present // steps_per_epoch
        if epochs == 0:
            raise data.DataError(f"{directory} holds {present} consecutive step_N.json files from step_1, "
                                 f"fewer than one epoch of {steps_per_epoch} steps")
    totals = {}  # (prompt, epoch) -> [correct, n]
    for step in range(1, steps_per_epoch * epochs + 1):
        path = directory / f"step_{step}.json"
        if not path.is_file():
            raise data.DataError(f"{path} does not exist ({epochs} epochs of {steps_per_epoch} steps need "
                                 f"step_1 to step_{steps_per_epoch * epochs})")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise data.DataError(f"{path}: malformed JSON ({error.msg} at line {error.lineno})") from None
        for number, row in enumerate(rows if isinstance(rows, list) else [None]):
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                    and isinstance(row.get("reward"), (int, float))):
                raise data.DataError(f"{path} entry {number}: expected an object with a prompt and a "
                                     f"numeric reward")
            # the prompt is keyed stripped (lim_selection.py:27)
            total = totals.setdefault((row["prompt"].strip(), (step - 1) // steps_per_epoch), [0, 0])
            total[0] += row["reward"] == LIMR_CORRECT_REWARD
            total[1] += 1
    prompts = list(dict.fromkeys(prompt for prompt, _ in totals))
    row_of = {prompt: row for row, prompt in enumerate(prompts)}
    r = np.full((len(prompts), epochs), np.nan)
    for (prompt, k), (correct, n) in totals.items():
        r[row_of[prompt], k] = correct / n
    return prompts, r


def _check(trajectories) -> np.ndarray:
    r = np.asarray(trajectories, dtype=float)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"need a (samples, epochs) array with at least one of each, got shape {r.shape}")
    if ((r < 0) | (r > 1) | np.isinf(r)).any():
        raise ValueError("trajectories are fractions of samples judged correct: values in [0, 1], "
                         "NaN if unseen")
    unseen = np.flatnonzero(np.isnan(r).all(axis=1))
    if len(unseen):
        raise ValueError(f"{len(unseen)} samples have no observed epoch (first: row {unseen[0]}); "
                         f"leave them out")
    return r


# ----------------------------------------------------------------------------------------------
# The scores: LIM, and LINEAR for the baseline.

def average_curve(trajectories) -> np.ndarray:
    """rbar^k = mean of r_i^k over the samples seen in epoch k (NaN for an epoch nobody was seen in)."""
    r = _check(trajectories)
    seen = ~np.isnan(r)
    counts = seen.sum(axis=0)
    return np.where(counts > 0, np.where(seen, r, 0).sum(axis=0) / np.maximum(counts, 1), np.nan)


def lim_scores(trajectories) -> np.ndarray:
    """s_i = 1 - sum_k (r_i^k - rbar^k)^2 / sum_k (1 - rbar^k)^2, over the epochs sample i was seen in."""
    r = _check(trajectories)
    seen, rbar = ~np.isnan(r), average_curve(r)
    distance = np.where(seen, (r - rbar) ** 2, 0).sum(axis=1)
    scale = np.where(seen, (1 - rbar) ** 2, 0).sum(axis=1)
    # scale = 0 only when rbar^k = 1 wherever sample i was seen, which forces r_i^k = 1 there too
    return np.where(scale > 0, 1 - distance / np.where(scale > 0, scale, 1), 1.0)


def fill_gaps_like_limr(trajectories) -> tuple[np.ndarray, np.ndarray]:
    """LIMR's gap rule (lim_selection.py:37-45): an unseen epoch takes the value the next epoch had
    before any filling, so a gap is filled once and a run of gaps only at its end; prompts with a gap
    left are dropped. Returns the filled trajectories and the mask of the prompts kept."""
    r = _check(trajectories).copy()
    gap = np.isnan(r)
    fillable = gap[:, :-1] & ~gap[:, 1:]
    r[:, :-1][fillable] = r[:, 1:][fillable]
    return r, ~np.isnan(r).any(axis=1)


def linear_scores(trajectories) -> np.ndarray:
    """sign(slope) * R^2 of the least-squares line r_i^k ~ a + b k over the epochs sample i was seen in."""
    r = _check(trajectories)
    scores = np.zeros(len(r))
    for i, row in enumerate(r):
        k = np.flatnonzero(~np.isnan(row)).astype(float)
        y = row[~np.isnan(row)]
        if len(y) < 2 or y.min() == y.max():
            continue  # no trend to fit: 0
        slope, intercept = np.polyfit(k, y, 1)
        r_squared = 1 - ((y - intercept - slope * k) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        scores[i] = np.sign(slope) * r_squared
    return scores


def random_subset(num_samples: int, size: int, seed: int = 0) -> np.ndarray:
    """RAND: a boolean mask keeping `size` of `num_samples` samples, uniformly at random."""
    if not 0 <= size <= num_samples:
        raise ValueError(f"cannot draw {size} of {num_samples} samples")
    keep = np.zeros(num_samples, dtype=bool)
    keep[np.random.default_rng(seed).choice(num_samples, size=size, replace=False)] = True
    return keep


def histogram(scores, bins: int = 10, width: int = 40) -> str:
    """A text histogram of the scores, one line per bin."""
    scores = np.asarray(scores, dtype=float)
    low, high = float(scores.min()), float(scores.max())
    span = (low, high) if high > low else (low - 0.5, high + 0.5)
    counts, edges = np.histogram(scores, bins=bins, range=span)
    return "\n".join(f"  [{edges[b]:7.2f}, {edges[b + 1]:7.2f}{']' if b == bins - 1 else ')'} {count:7d}  "
                     + "#" * round(width * count / counts.max()) for b, count in enumerate(counts))


# ----------------------------------------------------------------------------------------------
# Published scores: LIMR's data/scores.json is a list of {"prompt", "score"}; our own --scores
# files ({"id", "score", ...}) are read back the same way, matched by id.

def read_scores_file(path, problems: list[dict]) -> dict[str, float]:
    """problem id -> score, for the problems of `problems` the file scores (matched by id or prompt)."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path} does not exist")
    rows = data.jsonl_rows(path) if path.suffix == ".jsonl" else data.json_rows(path)  # a list, or JSON lines
    by_key = {"id": {}, "prompt": {}}  # -> the ids of the problems: a prompt may repeat in the data
    for p in problems:
        by_key["id"][p["id"]] = [p["id"]]
        by_key["prompt"].setdefault(p["prompt"].strip(), []).append(p["id"])
    scores, missing = {}, []
    for where, row in rows:
        key = "id" if isinstance(row, dict) and "id" in row else "prompt"
        if not isinstance(row, dict) or not isinstance(row.get(key), str) \
                or not isinstance(row.get("score"), (int, float)) or not np.isfinite(row["score"]):
            raise data.DataError(f"{where}: expected an object with a prompt (or id) and a finite score")
        matches = by_key[key].get(row[key].strip() if key == "prompt" else row[key])
        if matches is None:
            missing.append(row[key])
        for i in matches or []:
            if scores.setdefault(i, float(row["score"])) != row["score"]:
                raise data.DataError(f"{where}: a second, different score for {i}")
    if missing:
        raise data.DataError(f"{len(missing)} of {len(rows)} entries of {path} are not in --data "
                             f"(first: {missing[0][:80]!r}); pass the data the scores were computed on")
    if not scores:
        raise data.DataError(f"{path}: no scores")
    return scores


# ----------------------------------------------------------------------------------------------
# The script: score, select, write, summarise.

def write_rows(path, rows: list[dict]):
    """JSON lines, or a JSON list (one row a line) when the name ends in .json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if path.suffix == ".json" else \
        "".join(line + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trajectories", help="trajectories.jsonl written by grpo.py (or ppo.py)")
    source.add_argument("--limr-steps", help="LIMR's per-step sample files instead: their directory of "
                        "step_N.json (SAMPLES_SAVE_PATH/train); a completion is correct iff its reward == 1")
    source.add_argument("--scores-file",
                        help="precomputed scores instead: a JSON/JSONL list of {prompt or id, score}")
    p.add_argument("--data", required=True, help="the training data the run used (a data.load_problems spec)")
    p.add_argument("--data-seed", type=int, default=0, help="the run's --seed, for a mixture's sampling")
    p.add_argument("--method", choices=METHODS, default="lim", help="lim, or a baseline: linear or rand")
    p.add_argument("--gaps", choices=GAP_RULES, default="limr", help="epochs a prompt sat out (with "
                   "--trajectories or --limr-steps). limr (LIMR's lim/lim_selection.py): fill a gap once "
                   "from the next epoch, drop prompts with a gap left, average rbar over the rest. seen "
                   "(ours, opt-in): keep every prompt, score it over the epochs it was seen in")
    p.add_argument("--threshold", type=float, default=None, help="keep scores >= this (default: the paper's, "
                   "0.6 for lim; rand keeps as many as lim does at it; 0.7 for linear)")
    p.add_argument("--epochs", type=int, default=None, help="score epochs 0..N-1 only (default: all; under "
                   "--gaps limr all complete ones, as LIMR reads; LIMR's lim.sh used 21)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help=f"with --limr-steps: steps per epoch (default {LIMR_STEPS_PER_EPOCH}, LIMR's lim.sh)")
    p.add_argument("--out", required=True, help="the kept problems (.jsonl, or .json for a JSON list)")
    p.add_argument("--scores", default=None,
                   help="every scored sample: id, score, trajectory as scored, kept (.json or .jsonl)")
    p.add_argument("--seed", type=int, default=0, help="rand's draw")
    args = p.parse_args(argv)
    if args.scores_file and args.method == "linear":
        p.error("--method linear needs --trajectories or --limr-steps "
                "(a published score is not a trajectory)")
    if args.epochs is not None and (args.epochs < 1 or args.scores_file):
        p.error("--epochs takes a number >= 1, and only with --trajectories or --limr-steps")
    if args.steps_per_epoch is not None and (args.steps_per_epoch < 1 or not args.limr_steps):
        p.error("--steps-per-epoch takes a number >= 1, and only with --limr-steps")
    if args.threshold is not None and not np.isfinite(args.threshold):
        p.error(f"--threshold must be a finite number, not {args.threshold}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, not {args.seed}")
    if args.steps_per_epoch is None:
        args.steps_per_epoch = LIMR_STEPS_PER_EPOCH
    return args


def trajectories_of_problems(args, problems: list[dict]) -> tuple[list[dict], np.ndarray]:
    """The problems of --data seen in the run, in data order (rand's draw depends on nothing else),
    and their r_i^k, from --trajectories (matched by id) or --limr-steps (matched by prompt)."""
    if args.trajectories:
        keys, r = read_trajectories(args.trajectories, args.epochs)
        key_of, source = (lambda p: p["id"]), args.trajectories
    else:
        keys, r = read_limr_steps(args.limr_steps, args.steps_per_epoch, args.epochs)
        key_of, source = (lambda p: p["prompt"].strip()), args.limr_steps
    known = {key_of(p) for p in problems}
    strangers = [k for k in keys if k not in known]
    if strangers:
        what = "ids" if args.trajectories else "prompts"
        raise data.DataError(f"{len(strangers)} {what} of {source} are not in --data {args.data!r} "
                             f"(first: {strangers[0][:80]!r}); pass the --data (and --data-seed) the run "
                             f"trained on")
    row_of = {k: row for row, k in enumerate(keys)}
    scored = [p for p in problems if key_of(p) in row_of]  # a prompt that repeats in the data: each copy
    return scored, r[[row_of[key_of(p)] for p in scored]]


def main(argv=None):
    args = parse_args(argv)
    threshold = PAPER_THRESHOLDS[args.method] if args.threshold is None else args.threshold
    problems = data.load_problems(args.data, split="train", seed=args.data_seed)

    if args.scores_file:
        given = read_scores_file(args.scores_file, problems)
        scored = [p for p in problems if p["id"] in given]
        scores, r = np.array([given[p["id"]] for p in scored]), None
        origin = args.scores_file
    else:
        scored, r = trajectories_of_problems(args, problems)
        origin = f"{args.trajectories or args.limr_steps} ({r.shape[1]} epochs, gaps: {args.gaps})"
        seen = (~np.isnan(r)).sum(axis=0)
        if seen[-1] < seen.max() and r.shape[1] > 1:
            last = r.shape[1] - 1
            print(f"lim: note: epoch {last} saw only {seen[-1]} of the {seen.max()} samples other epochs saw "
                  f"(a run stopped inside it?)", end="; ")
            if args.gaps == "limr" and args.epochs is None:  # LIMR: whole epochs only, lim_selection.py:11-19
                print(f"left out, as LIMR's reader does (--epochs {last + 1} keeps it)")
                r = r[:, :-1]
            else:
                missed = "dropped (--gaps limr)" if args.gaps == "limr" else "scored without it"
                print(f"the samples it missed are {missed}; --epochs {last} leaves it out")
        if args.gaps == "limr":
            r, keep = fill_gaps_like_limr(r)
            if not keep.all():
                print(f"lim: dropped {int((~keep).sum())} of {len(scored)} problems with a gap LIMR's rule "
                      f"cannot fill (two epochs running, or the last)")
            if not keep.any():
                raise data.DataError(f"{origin}: every problem has a gap LIMR's rule cannot fill; "
                                     f"try --gaps seen")
            scored, r = [p for p, k in zip(scored, keep) if k], r[keep]
        scores = linear_scores(r) if args.method == "linear" else lim_scores(r)
        print("lim: average curve rbar^k: " + " ".join(f"{x:.2f}" for x in average_curve(r)))

    unscored = len(problems) - len(scored)
    print(f"lim: {len(scored)} problems scored from {origin}")
    if unscored:
        why = "not in the scores file" if args.scores_file else \
            "never seen in training" + (", or dropped by LIMR's gap rule" if args.gaps == "limr" else "")
        print(f"lim: {unscored} of the {len(problems)} problems of --data have no score ({why}): left out")
    name = "linear" if args.method == "linear" else "lim"
    print(f"lim: {name} scores, mean {scores.mean():.3f}:\n{histogram(scores)}")
    keep = scores >= threshold
    if args.method == "rand":
        keep = random_subset(len(scored), int(keep.sum()), args.seed)
    kept = [p for p, k in zip(scored, keep) if k]
    write_rows(args.out, kept)
    if args.scores:
        curves = [None] * len(scored) if r is None else \
            [[None if np.isnan(x) else float(x) for x in row] for row in r]
        write_rows(args.scores, [{"id": p["id"], "score": float(s), "kept": bool(k), "trajectory": curve}
                                 for p, s, k, curve in zip(scored, scores, keep, curves)])
    rule = f"with {name} score >= {threshold}"
    if args.method == "rand":
        rule = f"at random (seed {args.seed}), as many as lim >= {threshold} keeps"
    print(f"lim: kept {len(kept)} of {len(scored)} ({100 * len(kept) / len(scored):.1f}%) {rule} "
          f"-> {args.out}")
    empty = sum(not p["answer"] for p in kept)
    if empty:
        print(f"lim: note: {empty} kept problems have an empty answer; a plain file rejects them, so load "
              f"it as a source that accepts them (e.g. math-8k={args.out})")
    return kept


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
