"""Learning Impact Measurement (LIM): score RL training samples by how they learn, keep the best.

    python grpo.py --data math-8k=math.8k.json --output-dir runs/full          # writes trajectories.jsonl
    python lim.py --trajectories runs/full/trajectories.jsonl --data math-8k=math.8k.json \
        --method lim --threshold 0.6 --out selected.jsonl --scores scores.json
    python grpo.py --data selected.jsonl --output-dir runs/lim                 # retrain on the subset
    python lim.py --scores-file limr_scores.json --data math-8k=math.8k.json --out limr.jsonl

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

Edge cases (LIMR's code fills a one-epoch gap from the next epoch and drops samples with longer
gaps; we keep every sample that was seen at all):
  - missing epochs: a sample is scored over the epochs it was seen in, and rbar^k averages the
    samples seen in epoch k. A run that stops inside an epoch gives the samples that epoch reached
    one more term; --epochs N leaves it out.
  - sum_k (1 - rbar^k)^2 = 0: rbar^k = 1 in every epoch the sample was seen, so every sample seen
    then, this one included, was solved every time. It matches the curve exactly: s_i = 1.

The paper's baselines, for comparison:
  - RAND: as many samples as LIM keeps at the threshold, drawn uniformly at random (seeded).
  - LINEAR: samples whose reward rises steadily over the epochs (paper threshold 0.7; the paper
    does not define the score). Ours is the R^2 of the least-squares line through (k, r_i^k) over
    the epochs observed, signed by the line's slope: +1 for a rise along a straight line, -1 for a
    straight fall, near 0 for no linear trend, and exactly 0 when there is no trend to fit (a flat
    trajectory, or fewer than two epochs). It measures steadiness, not size: a straight rise from
    0.1 to 0.3 scores like one from 0 to 1.

Input: OUTPUT_DIR/trajectories.jsonl of grpo.py, one line per (training step, prompt):
{"step", "id", "epoch" (0-based), "correct" (of its G samples), "n" (= G)}. A prompt drawn twice in
an epoch (a batch that wraps) counts once: r_i^k = sum(correct) / sum(n) over its lines.
Output: the kept problems in data.py's schema (a file grpo.py, ppo.py and sft.py take as --data),
and with --scores, every scored sample's id, score, trajectory and whether it was kept.
"""
import argparse
import json
from pathlib import Path

import numpy as np

import data

METHODS = ("lim", "linear", "rand")
PAPER_THRESHOLDS = {"lim": 0.6, "rand": 0.6, "linear": 0.7}


# ----------------------------------------------------------------------------------------------
# Trajectories: r_i^k as a (samples, epochs) array, NaN where sample i was not seen in epoch k.

def read_trajectories(path, epochs: int | None = None) -> tuple[list[str], np.ndarray]:
    """Sample ids in order of first appearance and their r_i^k; `epochs` keeps epochs 0..epochs-1."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path} does not exist")
    totals = {}  # (id, epoch) -> [correct, n]
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise data.DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
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


def _check(trajectories) -> np.ndarray:
    r = np.asarray(trajectories, dtype=float)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"need a (samples, epochs) array with at least one of each, got shape {r.shape}")
    if ((r < 0) | (r > 1) | np.isinf(r)).any():
        raise ValueError("trajectories are fractions of samples judged correct: values in [0, 1], NaN if unseen")
    unseen = np.flatnonzero(np.isnan(r).all(axis=1))
    if len(unseen):
        raise ValueError(f"{len(unseen)} samples have no observed epoch (first: row {unseen[0]}); leave them out")
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
    counts, edges = np.histogram(scores, bins=bins, range=(low, high) if high > low else (low - 0.5, high + 0.5))
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
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise data.DataError(f"{path}: neither a JSON list nor JSON lines ({error.msg})") from None
    if not isinstance(rows, list):
        raise data.DataError(f"{path}: expected a list of {{prompt or id, score}} objects")
    by_key = {"id": {}, "prompt": {}}
    for p in problems:
        by_key["id"][p["id"]] = [p["id"]]
        by_key["prompt"].setdefault(p["prompt"].strip(), []).append(p["id"])  # a prompt may repeat in the data
    scores, missing = {}, []
    for number, row in enumerate(rows):
        key = "id" if isinstance(row, dict) and "id" in row else "prompt"
        if not isinstance(row, dict) or not isinstance(row.get(key), str) \
                or not isinstance(row.get("score"), (int, float)) or not np.isfinite(row["score"]):
            raise data.DataError(f"{path} row {number}: expected an object with a prompt (or id) and a finite score")
        matches = by_key[key].get(row[key].strip() if key == "prompt" else row[key])
        if matches is None:
            missing.append(row[key])
        for i in matches or []:
            if scores.setdefault(i, float(row["score"])) != row["score"]:
                raise data.DataError(f"{path} row {number}: a second, different score for {i}")
    if missing:
        raise data.DataError(f"{len(missing)} of {len(rows)} entries of {path} are not in --data "
                             f"(first: {missing[0][:80]!r}); pass the data the scores were computed on")
    if not scores:
        raise data.DataError(f"{path}: no scores")
    return scores


# ----------------------------------------------------------------------------------------------
# An experiment in miniature (GRPO on the `linear` pool, score it, retrain on the LIM, LINEAR and
# RAND subsets and on everything, compare) will go here.


# ----------------------------------------------------------------------------------------------
# The script: score, select, write, summarise.

def write_rows(path, rows: list[dict]):
    """JSON lines, or a JSON list (one row a line) when the name ends in .json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if path.suffix == ".json" else "".join(line + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trajectories", help="trajectories.jsonl written by grpo.py (or ppo.py)")
    source.add_argument("--scores-file", help="precomputed scores instead: a JSON/JSONL list of {prompt or id, score}")
    p.add_argument("--data", required=True, help="the training data the run used (a data.load_problems spec)")
    p.add_argument("--data-seed", type=int, default=0, help="the run's --seed, for a mixture's sampling")
    p.add_argument("--method", choices=METHODS, default="lim", help="lim, linear (baseline) or rand (baseline)")
    p.add_argument("--threshold", type=float, default=None, help="keep scores >= this (default: the paper's, "
                   "0.6 for lim; rand keeps as many as lim does at it; 0.7 for linear)")
    p.add_argument("--epochs", type=int, default=None, help="score epochs 0..N-1 only (all by default)")
    p.add_argument("--out", required=True, help="the kept problems (.jsonl, or .json for a JSON list)")
    p.add_argument("--scores", default=None, help="every scored sample: id, score, trajectory, kept (.json or .jsonl)")
    p.add_argument("--seed", type=int, default=0, help="rand's draw")
    args = p.parse_args(argv)
    if args.scores_file and args.method == "linear":
        p.error("--method linear needs --trajectories (a published score is not a trajectory)")
    if args.epochs is not None and (args.epochs < 1 or args.scores_file):
        p.error("--epochs takes a number >= 1, and only with --trajectories")
    return args


def main(argv=None):
    args = parse_args(argv)
    threshold = PAPER_THRESHOLDS[args.method] if args.threshold is None else args.threshold
    problems = data.load_problems(args.data, split="train", seed=args.data_seed)
    known = {p["id"] for p in problems}

    if args.scores_file:
        given = read_scores_file(args.scores_file, problems)
        scored = [p for p in problems if p["id"] in given]
        scores, r = np.array([given[p["id"]] for p in scored]), None
        origin = args.scores_file
    else:
        ids, r = read_trajectories(args.trajectories, args.epochs)
        strangers = [i for i in ids if i not in known]
        if strangers:
            raise data.DataError(f"{len(strangers)} ids of {args.trajectories} are not in --data {args.data!r} "
                                 f"(first: {strangers[0]!r}); pass the --data (and --data-seed) the run trained on")
        row_of = {i: row for row, i in enumerate(ids)}
        scored = [p for p in problems if p["id"] in row_of]  # data order: rand's draw depends on nothing else
        r = r[[row_of[p["id"]] for p in scored]]
        scores = linear_scores(r) if args.method == "linear" else lim_scores(r)
        origin = f"{args.trajectories} ({r.shape[1]} epochs)"
        seen = (~np.isnan(r)).sum(axis=0)
        print("lim: average curve rbar^k: " + " ".join(f"{x:.2f}" for x in average_curve(r)))
        if seen[-1] < seen.max():
            print(f"lim: note: epoch {r.shape[1] - 1} saw only {seen[-1]} of the {seen.max()} samples other epochs "
                  f"saw (a run stopped inside it); those are scored with it, --epochs {r.shape[1] - 1} leaves it out")

    unscored = len(problems) - len(scored)
    print(f"lim: {len(scored)} problems scored from {origin}")
    if unscored:
        why = "not in the scores file" if args.scores_file else "never seen in training"
        print(f"lim: {unscored} of the {len(problems)} problems of --data have no score ({why}): left out")
    name = "linear" if args.method == "linear" else "lim"
    print(f"lim: {name} scores, mean {scores.mean():.3f}:\n{histogram(scores)}")
    keep = scores >= threshold
    if args.method == "rand":
        keep = random_subset(len(scored), int(keep.sum()), args.seed)
    kept = [p for p, k in zip(scored, keep) if k]
    write_rows(args.out, kept)
    if args.scores:
        curves = [None] * len(scored) if r is None else [[None if np.isnan(x) else float(x) for x in row] for row in r]
        write_rows(args.scores, [{"id": p["id"], "score": float(s), "kept": bool(k), "trajectory": curve}
                                 for p, s, k, curve in zip(scored, scores, keep, curves)])
    rule = f"with {name} score >= {threshold}"
    if args.method == "rand":
        rule = f"at random (seed {args.seed}), as many as lim >= {threshold} keeps"
    print(f"lim: kept {len(kept)} of {len(scored)} ({100 * len(kept) / len(scored):.1f}%) {rule} -> {args.out}")
    empty = sum(not p["answer"] for p in kept)
    if empty:
        print(f"lim: note: {empty} kept problems have an empty answer; a plain file rejects them, so load it as a "
              f"source that accepts them (e.g. math-8k={args.out})")
    return kept


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
