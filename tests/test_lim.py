"""LIM scores against the formula computed by hand, the baselines, and the script end to end."""
import json
import math

import numpy as np
import pytest
import torch

import data
import lim
from conftest import shared_file
from mathrl import distributed, sequences
from mathrl.engine import Completion

nan = float("nan")


def lim_by_loops(r):
    """s_i = 1 - sum_k (r_i^k - rbar^k)^2 / sum_k (1 - rbar^k)^2, literally, over observed epochs."""
    samples, epochs = len(r), len(r[0])
    rbar = []
    for k in range(epochs):
        column = [r[i][k] for i in range(samples) if not math.isnan(r[i][k])]
        rbar.append(sum(column) / len(column) if column else nan)
    scores = []
    for i in range(samples):
        seen = [k for k in range(epochs) if not math.isnan(r[i][k])]
        distance = sum((r[i][k] - rbar[k]) ** 2 for k in seen)
        scale = sum((1 - rbar[k]) ** 2 for k in seen)
        scores.append(1 - distance / scale)
    return scores


def test_lim_scores_match_the_formula_on_random_trajectories():
    rng = np.random.default_rng(0)
    for samples, epochs, missing in [(50, 8, 0.0), (200, 21, 0.0), (100, 6, 0.3)]:
        r = rng.integers(0, 9, size=(samples, epochs)) / 8  # G = 8 samples per prompt
        r[rng.random(r.shape) < missing] = nan
        r[:, 0] = rng.integers(0, 8, size=samples) / 8  # every sample seen once, no epoch at 1
        got = lim.lim_scores(r)
        assert got.shape == (samples,)
        np.testing.assert_allclose(got, lim_by_loops(r.tolist()), rtol=1e-12, atol=1e-12)


def test_lim_scores_hand_checked():
    # rbar = (0.3, 0.6): the third sample is the average curve itself
    assert lim.lim_scores([[0.2, 0.5], [0.4, 0.7], [0.3, 0.6]])[2] == pytest.approx(1.0)
    # a sample solved in every epoch is exactly as far from the curve as the normaliser: 0
    r = [[0.0, 0.25, 0.5], [0.5, 0.5, 0.75], [1.0, 1.0, 1.0]]
    assert lim.lim_scores(r)[2] == pytest.approx(0.0, abs=1e-12)
    # rbar = (0.25, 0.75), sum (1 - rbar)^2 = 0.625; each sample is 0.125 away: 1 - 0.125/0.625
    np.testing.assert_allclose(lim.lim_scores([[0.0, 0.5], [0.5, 1.0]]), [0.8, 0.8])
    # never solved while the rest of the pool is: far below 0; rbar = 0.75, 1 - 0.5625/0.0625
    np.testing.assert_allclose(lim.lim_scores([[0.0], [1.0], [1.0], [1.0]]), [-8.0, 0.0, 0.0, 0.0])


def test_missing_epochs_score_over_the_epochs_seen():
    # rbar = (0.5, 0.75): epoch 0 over all three samples, epoch 1 over the two seen in it
    scores = lim.lim_scores([[0.0, nan], [1.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(scores, [1 - 0.25 / 0.25, 1 - 0.3125 / 0.3125, 1 - 0.0625 / 0.3125])
    np.testing.assert_allclose(lim.average_curve([[0.0, nan], [1.0, 0.5], [0.5, 1.0]]), [0.5, 0.75])


def test_an_average_curve_at_one_gives_a_defined_score_never_nan():
    np.testing.assert_array_equal(lim.lim_scores(np.ones((3, 4))), [1.0, 1.0, 1.0])
    # sample 0 is seen only in epoch 0, where everyone is solved: it matches the curve
    np.testing.assert_array_equal(lim.lim_scores([[1.0, nan], [1.0, 0.0]]), [1.0, 1.0])
    # one epoch at 1, one not: the epoch at 1 adds nothing to either sum
    np.testing.assert_allclose(lim.lim_scores([[1.0, 0.0], [1.0, 1.0]]), [0.0, 0.0])


def test_bad_input_is_a_clear_value_error():
    for empty in ([], [[]], np.empty((0, 3)), np.empty((4, 0))):
        with pytest.raises(ValueError, match="at least one"):
            lim.lim_scores(empty)
    with pytest.raises(ValueError, match="no observed epoch"):
        lim.lim_scores([[0.5, 0.5], [nan, nan]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lim.linear_scores([[0.5, 1.5]])


def test_linear_scores_prefer_steady_rises():
    r = [[0.0, 0.25, 0.5, 0.75],    # a straight rise
         [0.75, 0.5, 0.25, 0.0],    # a straight fall
         [0.5, 0.5, 0.5, 0.5],      # flat: no trend
         [0.0, 0.5, 0.375, 0.875],  # rising, with a dip
         [0.0, 1.0, 0.0, 1.0],      # a zigzag
         [0.5, nan, nan, nan],      # one epoch: no trend
         [0.0, nan, nan, 1.0]]      # two epochs: a line through both
    scores = lim.linear_scores(r)
    k = np.arange(4)
    noisy = np.corrcoef(k, r[3])[0, 1] ** 2  # R^2 of a line fit is the squared correlation
    zigzag = np.corrcoef(k, r[4])[0, 1] ** 2
    np.testing.assert_allclose(scores, [1.0, -1.0, 0.0, noisy, zigzag, 0.0, 1.0], atol=1e-12)
    assert 0.7 < noisy < 1 and zigzag < 0.7
    assert list(scores >= 0.7) == [True, False, False, True, False, False, True]


def test_random_subset_has_the_size_and_depends_only_on_the_seed():
    a, b, c = (lim.random_subset(100, 17, seed) for seed in (0, 0, 1))
    assert a.sum() == 17 and c.sum() == 17 and a.dtype == bool
    assert (a == b).all() and (a != c).any()
    assert lim.random_subset(5, 5).all() and not lim.random_subset(5, 0).any()
    with pytest.raises(ValueError):
        lim.random_subset(5, 6)


# ---- the script, on a trajectories file written the way grpo.py writes it

CURVES = {  # id -> r^k over three epochs, G = 4
    "p0": [0.25, 0.5, 0.75],   # rbar = (0.25, 0.5, 0.75): on the curve
    "p1": [1.0, 1.0, 1.0],     # solved from the start: score 0
    "p2": [0.0, 0.0, 0.0],     # never solved
    "p3": [0.0, 0.5, 1.0],     # a steady rise, close to the curve
}


def write_run(tmp_path, curves=CURVES, extra_ids=("p4",)):
    problems = [{"id": i, "problem": f"What is {n} + {n}?", "answer": str(2 * n), "solution": f"\\boxed{{{2 * n}}}"}
                for n, i in enumerate(list(curves) + list(extra_ids))]
    data_file = tmp_path / "pool.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    loaded = {p["id"].split("/")[-1]: p["id"] for p in data.load_problems(str(data_file))}
    lines, step = [], 0
    for epoch in range(3):
        for name, curve in curves.items():
            step += 1
            correct = curve[epoch] * 4
            if name == "p3" and epoch == 1:  # drawn twice in this epoch: 0 of 2, 3 of 4 -> 3/6 (not mean(0, 0.75))
                lines.append({"step": step, "id": loaded[name], "epoch": epoch, "correct": 0, "n": 2})
                correct = 3.0
            lines.append({"step": step, "id": loaded[name], "epoch": epoch, "correct": correct, "n": 4})
    trajectories = tmp_path / "trajectories.jsonl"
    trajectories.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data_file, trajectories, loaded


def test_read_trajectories_aggregates_per_prompt_and_epoch(tmp_path):
    _, trajectories, loaded = write_run(tmp_path)
    ids, r = lim.read_trajectories(trajectories)
    assert ids == [loaded[name] for name in CURVES]
    np.testing.assert_array_equal(r, list(CURVES.values()))
    ids, r = lim.read_trajectories(trajectories, epochs=2)
    np.testing.assert_array_equal(r, [curve[:2] for curve in CURVES.values()])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no trajectories"):
        lim.read_trajectories(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "epoch": 0, "correct": 5, "n": 4}\n')
    with pytest.raises(data.DataError, match="line 1.*correct <= n"):
        lim.read_trajectories(tmp_path / "bad.jsonl")


def test_cli_selects_writes_loadable_data_and_scores(tmp_path, capsys):
    data_file, trajectories, loaded = write_run(tmp_path)
    out, scores_file = tmp_path / "selected.jsonl", tmp_path / "scores.json"
    kept = lim.main(["--trajectories", str(trajectories), "--data", str(data_file), "--method", "lim",
                     "--out", str(out), "--scores", str(scores_file)])
    printed = capsys.readouterr().out
    expected = lim.lim_scores(list(CURVES.values()))
    assert [p["id"] for p in kept] == [loaded[n] for n, s in zip(CURVES, expected) if s >= 0.6] == [loaded["p0"], loaded["p3"]]
    assert "1 of the 5 problems of --data have no score" in printed and "kept 2 of 4" in printed
    reloaded = data.load_problems(str(out))  # a file grpo.py / sft.py accept as --data
    assert [(p["prompt"], p["answer"], p["solution"]) for p in reloaded] == \
           [(p["prompt"], p["answer"], p["solution"]) for p in kept]
    assert set(json.loads(out.read_text().splitlines()[0])) == {"id", "prompt", "answer", "solution", "source"}
    rows = json.loads(scores_file.read_text())
    assert [row["id"] for row in rows] == [loaded[n] for n in CURVES]
    np.testing.assert_allclose([row["score"] for row in rows], expected)
    assert [row["trajectory"] for row in rows] == list(CURVES.values())
    assert [row["kept"] for row in rows] == [True, False, False, True]

    # LINEAR keeps the steady rises (0.7 by default); RAND as many as LIM, at random, seeded
    kept = lim.main(["--trajectories", str(trajectories), "--data", str(data_file), "--method", "linear",
                     "--out", str(tmp_path / "linear.json")])
    assert [p["id"] for p in kept] == [loaded["p0"], loaded["p3"]]
    assert len(data.load_problems(str(tmp_path / "linear.json"))) == 2
    draws = [[p["id"] for p in lim.main(["--trajectories", str(trajectories), "--data", str(data_file), "--method",
                                         "rand", "--seed", str(seed), "--out", str(tmp_path / "rand.jsonl")])]
             for seed in (0, 0, 1, 2, 3)]
    assert all(len(d) == 2 for d in draws) and draws[0] == draws[1] and len({tuple(d) for d in draws}) > 1

    # our own scores file reads back as --scores-file: the same selection
    kept = lim.main(["--scores-file", str(scores_file), "--data", str(data_file), "--out", str(tmp_path / "again.jsonl")])
    assert [p["id"] for p in kept] == [loaded["p0"], loaded["p3"]]


def test_cli_rejects_ids_the_data_does_not_have(tmp_path):
    data_file, trajectories, _ = write_run(tmp_path)
    with open(trajectories, "a") as f:
        f.write(json.dumps({"step": 99, "id": "elsewhere/7", "epoch": 2, "correct": 1, "n": 4}) + "\n")
    with pytest.raises(data.DataError, match="1 ids of .* are not in --data .*elsewhere/7"):
        lim.main(["--trajectories", str(trajectories), "--data", str(data_file), "--out", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(SystemExit):  # linear needs trajectories
        lim.main(["--scores-file", str(trajectories), "--data", str(data_file), "--method", "linear", "--out", "x"])


def test_limr_published_scores_select_exactly_the_limr_training_set(tmp_path, capsys):
    scores_file = shared_file("math_l3to5_8k/limr_scores.json")
    pool = shared_file("math_l3to5_8k/math.8k.json")
    out = tmp_path / "limr.jsonl"
    kept = lim.main(["--scores-file", str(scores_file), "--data", f"math-8k={pool}", "--threshold", "0.6", "--out", str(out)])
    assert len(kept) == 1389
    assert "7936 problems scored" in capsys.readouterr().out  # 7935 prompts; one appears twice in the pool (score 0.06)
    limr = data.load_problems(f"limr={shared_file('limr')}")
    assert len(limr) == 1389
    assert {p["prompt"] for p in kept} == {p["prompt"] for p in limr}  # all 1389 prompts are LIMR's
    assert {p["id"].split("/", 1)[1] for p in kept} == {p["id"].split("/", 1)[1] for p in limr}
    assert len(data.load_problems(str(out))) == 1389
    # at a threshold below every score, all are kept, LIMR's 2 rows with an empty answer among them
    lim.main(["--scores-file", str(scores_file), "--data", f"math-8k={pool}", "--threshold", "-5", "--out", str(out)])
    assert "2 kept problems have an empty answer" in capsys.readouterr().out
    with pytest.raises(data.DataError, match="no answer"):
        data.load_problems(str(out))
    assert len(data.load_problems(f"math-8k={out}")) == 7936  # as the note says


def test_the_rl_pool_of_the_demos_is_one_unknown_train_problems_that_grpo_can_load(tmp_path):
    """experiments/demo.py and experiments/lim_selection.py train RL on this pool: it must hold only one-unknown systems (integer
    answers), none of the held-out test problems, and load back unchanged through --data."""
    import common

    path = common.write_rl_pool(tmp_path / "pool.jsonl", size=64)
    pool = data.load_problems(str(path), split="train")
    assert len(pool) == 64
    assert all(int(p["answer"]) == float(p["answer"]) for p in pool)  # "-3", never "(3, -2)"
    first = [p for p in data.load_problems("linear", split="train") if "(" not in p["answer"]][:64]
    assert [(p["prompt"], p["answer"]) for p in pool] == [(p["prompt"], p["answer"]) for p in first]
    held_out = {p["prompt"] for p in data.load_problems("linear", split="test")}
    assert not held_out & {p["prompt"] for p in pool}


def test_demo_lim_prints_the_curves_of_what_each_selection_kept_and_paired_differences(tmp_path):
    """experiments/lim_selection.py's lines under its table come from lim.py's scores files (one row per problem with
    its score, whether kept, and its per-epoch accuracy) and from the arms' pass@1 per seed."""
    import lim_selection

    rng = np.random.default_rng(0)
    trajectories = rng.integers(0, 9, size=(12, 3)) / 8
    scores = lim.lim_scores(trajectories)
    for name, kept in (("lim", scores >= 0.6), ("lim-top", scores >= np.sort(scores)[-3]),
                       ("rand", np.arange(12) % 4 == 0), ("linear", np.zeros(12, bool))):  # LINEAR kept none
        lim.write_rows(tmp_path / f"{name}-scores.jsonl",
                       [{"id": str(i), "score": float(s), "kept": bool(k), "trajectory": row.tolist()}
                        for i, (s, k, row) in enumerate(zip(scores, kept, trajectories))])
    curves = lim_selection.selection_curves(tmp_path)
    assert np.allclose(curves["pool"], lim.average_curve(trajectories))
    assert np.allclose(curves["lim-top"], trajectories[scores >= np.sort(scores)[-3]].mean(axis=0))
    assert np.allclose(curves["rand"], trajectories[::4].mean(axis=0))
    assert len(curves["linear"]) == 3 and np.isnan(curves["linear"]).all()
    assert curves["lim_score_at_least_0.8"] == np.mean(scores >= 0.8)

    runs = [{"LIM": {"greedy": g}, "RAND": {"greedy": 0.15}} for g in (0.20, 0.14, 0.18)]  # 5, -1, 3 points
    assert lim_selection.paired(runs, "LIM", "RAND", "greedy") == "greedy 2.3 ± 1.8 (ahead in 2 of 3)"


# ---- LIMR's own rule (--gaps limr, the default), against a step-by-step re-implementation of
# GAIR-NLP/LIMR lim/lim_selection.py run on step files written as their OpenRLHF fork writes them

MISSING = None


def limr_selection_by_hand(step_dir, steps_per_epoch, epochs):
    """What LIMR's script computes, spelled out: prompt -> score for the prompts it keeps."""
    # 1. group the step files into epochs of steps_per_epoch; count reward == 1 per prompt and epoch
    counts = []  # one {prompt: [right, total]} per epoch
    for epoch in range(epochs):
        tally = {}
        for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1):
            for sample in json.loads((step_dir / f"step_{step}.json").read_text()):
                right_total = tally.setdefault(sample["prompt"].strip(), [0, 0])
                right_total[0] += 1 if sample["reward"] == 1 else 0
                right_total[1] += 1
        counts.append(tally)
    # 2. each prompt's accuracy per epoch, MISSING where the epoch never drew it
    every_prompt = sorted({prompt for tally in counts for prompt in tally})
    curves = {}
    for prompt in every_prompt:
        curves[prompt] = [tally[prompt][0] / tally[prompt][1] if prompt in tally else MISSING for tally in counts]
    as_drawn = {prompt: list(curve) for prompt, curve in curves.items()}
    # 3. walk each curve left to right: a MISSING epoch followed by a seen one copies it
    for curve in curves.values():
        for k in range(epochs - 1):
            if curve[k] is MISSING and curve[k + 1] is not MISSING:
                curve[k] = curve[k + 1]
    # 4. drop the curves that still have a hole; the average curve is over the survivors
    survivors = {prompt: curve for prompt, curve in curves.items() if MISSING not in curve}
    average = [sum(curve[k] for curve in survivors.values()) / len(survivors) for k in range(epochs)]
    # 5. the score: 1 - squared distance to the average / squared distance of an always-solved curve
    scores = {}
    for prompt, curve in survivors.items():
        distance = sum((curve[k] - average[k]) ** 2 for k in range(epochs))
        ceiling = sum((1 - average[k]) ** 2 for k in range(epochs))
        scores[prompt] = 1 - distance / ceiling
    return scores, curves, as_drawn


def simulate_limr_run(tmp_path, pool_size, prompts_per_step, steps_per_epoch, epochs, seed, group=4):
    """A run the way LIMR's trainer records it: every epoch a fresh shuffle of the pool, the first
    steps_per_epoch * prompts_per_step prompts drawn (the rest dropped with the last partial batch),
    `group` completions each with LIMR's rewards 1 / -0.5 / -1, one step_N.json per step. Also the
    same run as grpo.py's trajectories.jsonl. Returns the data file, the step dir, the trajectories."""
    rng = np.random.default_rng(seed)
    problems = [{"id": f"q{n}", "problem": f"Solve {n} x = {n * n}.", "answer": str(n),
                 "solution": f"\\boxed{{{n}}}"} for n in range(1, pool_size + 1)]
    data_file = tmp_path / "pool.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    loaded = data.load_problems(str(data_file))
    skill = rng.uniform(0.0, 0.6, size=pool_size)  # each prompt learns at its own pace
    step_dir, lines, step = tmp_path / "output" / "train", [], 0
    step_dir.mkdir(parents=True)
    for epoch in range(epochs):
        order = rng.permutation(pool_size)[:steps_per_epoch * prompts_per_step]
        for batch in order.reshape(steps_per_epoch, prompts_per_step):
            step += 1
            samples = []
            for i in batch:
                chance = min(1.0, skill[i] * (1 + epoch) / 2)
                rewards = [1.0 if rng.random() < chance else float(rng.choice([-0.5, -1.0])) for _ in range(group)]
                samples += [{"prompt": loaded[i]["prompt"], "response": "...", "reward": r, "response_length": 9}
                            for r in rewards]
                lines.append({"step": step, "id": loaded[i]["id"], "epoch": epoch,
                              "correct": rewards.count(1.0), "n": group})
            (step_dir / f"step_{step}.json").write_text(json.dumps(samples, indent=4))
    trajectories = tmp_path / "trajectories.jsonl"
    trajectories.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data_file, step_dir, trajectories, loaded


@pytest.mark.parametrize("pool_size, prompts_per_step, steps_per_epoch, epochs, seed",
                         [(30, 4, 6, 8, 0),      # 6 of 30 sit out each epoch: gaps of every length
                          (37, 4, 8, 6, 1),      # LIMR's shape in small: drop_last leaves out 5
                          (50, 5, 7, 10, 2)])
def test_limr_mode_matches_limr_selection_step_by_step(tmp_path, pool_size, prompts_per_step, steps_per_epoch,
                                                       epochs, seed):
    data_file, step_dir, trajectories, loaded = simulate_limr_run(tmp_path, pool_size, prompts_per_step,
                                                                 steps_per_epoch, epochs, seed)
    expected, curves, as_drawn = limr_selection_by_hand(step_dir, steps_per_epoch, epochs)
    id_of = {p["prompt"]: p["id"] for p in loaded}
    # the simulation must exercise the rule: some prompts dropped, some kept thanks to a filled gap
    assert 0 < len(curves) - len(expected) < len(curves)
    assert any(MISSING in as_drawn[p] for p in expected)
    kept_by_hand = sorted(id_of[p] for p, s in expected.items() if s >= 0.6)
    assert 0 < len(kept_by_hand) < len(expected)

    # the functions: read the step files, fill, drop, score
    prompts, r = lim.read_limr_steps(step_dir, steps_per_epoch)
    assert r.shape == (len(prompts), epochs)
    filled_r, keep = lim.fill_gaps_like_limr(r)
    got = dict(zip(np.array(prompts)[keep], lim.lim_scores(filled_r[keep])))
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[p] for p in expected], list(expected.values()), rtol=1e-12, atol=1e-12)
    assert [list(row) for row in filled_r[keep]] == [curves[p] for p in np.array(prompts)[keep]]

    # the script, from LIMR's step files and from the same run's trajectories.jsonl: the same selection
    for source in (["--limr-steps", str(step_dir), "--steps-per-epoch", str(steps_per_epoch)],
                   ["--trajectories", str(trajectories)]):
        scores_file = tmp_path / "scores.jsonl"
        kept = lim.main([*source, "--data", str(data_file), "--out", str(tmp_path / "kept.jsonl"),
                         "--scores", str(scores_file)])
        assert sorted(p["id"] for p in kept) == kept_by_hand
        rows = {row["id"]: row for row in map(json.loads, scores_file.read_text().splitlines())}
        assert set(rows) == {id_of[p] for p in expected}
        np.testing.assert_allclose([rows[id_of[p]]["score"] for p in expected], list(expected.values()),
                                   rtol=1e-12)
        assert all(rows[id_of[p]]["trajectory"] == curves[p] for p in expected)

    # the opt-in rule keeps every prompt seen at all
    kept_seen = lim.main(["--trajectories", str(trajectories), "--gaps", "seen", "--data", str(data_file),
                          "--out", str(tmp_path / "seen.jsonl"), "--scores", str(scores_file)])
    assert len(scores_file.read_text().splitlines()) == len(curves) > len(expected)
    nan_for_missing = [[nan if x is MISSING else x for x in as_drawn[p]] for p in as_drawn]
    seen_scores = lim_by_loops(nan_for_missing)
    kept_by_hand_seen = sorted(id_of[p] for p, s in zip(as_drawn, seen_scores) if s >= 0.6)
    assert sorted(p["id"] for p in kept_seen) == kept_by_hand_seen


def test_limr_gap_rule_by_hand():
    r = [[nan, 0.5, nan, 0.25],        # both gaps filled from the next epoch: kept
         [nan, 0.5, 0.75, nan],        # a gap in the last epoch stays: dropped
         [nan, nan, 0.5, 0.75],        # two gaps running: the first stays: dropped
         [0.25, 0.5, 0.75, 1.0]]       # no gap: kept, unchanged
    filled, keep = lim.fill_gaps_like_limr(r)
    assert keep.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(filled[0], [0.5, 0.5, 0.25, 0.25])
    np.testing.assert_array_equal(filled[1], [0.5, 0.5, 0.75, nan])
    np.testing.assert_array_equal(filled[2], [nan, 0.5, 0.5, 0.75])
    # the average curve is over the prompts kept: (0.375, 0.5, 0.5, 0.625)
    np.testing.assert_allclose(lim.average_curve(filled[keep]), [0.375, 0.5, 0.5, 0.625])


def test_read_limr_steps_whole_epochs_and_clear_errors(tmp_path):
    for step, rewards in enumerate([[1, -0.5], [1.0, 1], [-1, -1], [1, 0.5]], 1):  # 0.5 is not correct
        (tmp_path / f"step_{step}.json").write_text(json.dumps([{"prompt": f" p{step % 2} ", "reward": r}
                                                                for r in rewards]))
    (tmp_path / "step_5.json").write_text("[]")  # a third epoch begun, not finished: left out
    prompts, r = lim.read_limr_steps(tmp_path, steps_per_epoch=2)
    assert prompts == ["p1", "p0"]
    np.testing.assert_array_equal(r, [[0.5, 0.0], [1.0, 0.5]])
    with pytest.raises(data.DataError, match="step_6.json does not exist"):
        lim.read_limr_steps(tmp_path, steps_per_epoch=2, epochs=3)
    (tmp_path / "step_2.json").write_text('[{"prompt": "p0"}]')
    with pytest.raises(data.DataError, match="step_2.json entry 0: .*numeric reward"):
        lim.read_limr_steps(tmp_path, steps_per_epoch=2)
    with pytest.raises(data.DataError, match="fewer than one epoch"):
        lim.read_limr_steps(tmp_path, steps_per_epoch=6)


def test_a_run_stopped_inside_an_epoch_scores_its_whole_epochs_under_limr_gaps(tmp_path, capsys):
    """LIMR reads whole epochs only: a partial last epoch must not drop every prompt it did not reach."""
    data_file, trajectories, loaded = write_run(tmp_path)
    whole = lim.main(["--trajectories", str(trajectories), "--data", str(data_file), "--threshold", "-10",
                      "--out", str(tmp_path / "whole.jsonl"), "--scores", str(tmp_path / "whole.json")])
    partial = tmp_path / "partial.jsonl"   # a fourth epoch begun: only p0 reached
    partial.write_text(trajectories.read_text() + json.dumps({"step": 99, "id": loaded["p0"], "epoch": 3,
                                                              "correct": 4, "n": 4}) + "\n")
    kept = lim.main(["--trajectories", str(partial), "--data", str(data_file), "--threshold", "-10",
                     "--out", str(tmp_path / "kept.jsonl"), "--scores", str(tmp_path / "kept.json")])
    assert "left out, as LIMR's reader does" in capsys.readouterr().out
    assert [p["id"] for p in kept] == [p["id"] for p in whole] and len(kept) == len(CURVES)
    assert json.loads((tmp_path / "kept.json").read_text()) == json.loads((tmp_path / "whole.json").read_text())
    with pytest.raises(SystemExit):
        lim.main(["--trajectories", str(partial), "--data", str(data_file), "--threshold", "nan", "--out", "x"])


def test_trajectories_record_each_prompt_in_the_epoch_it_was_drawn_in_whatever_the_ranks(tmp_path):
    """lim.py reads per-epoch accuracy: a prompt logged under the wrong epoch has one epoch twice and
    one missing. grpo.rollout gives rank r's j-th group the position step * P + r + j * W; a step whose
    batch crosses an epoch boundary must log every prompt in the epoch batch_indices drew it in,
    whatever the number of ranks."""
    problems = [{"id": f"p{i}", "answer": "1"} for i in range(10)]
    prompts_per_step, group_size, step = 4, 2, 2   # batch positions 8-11: epoch 0 ends at position 10
    batch = sequences.batch_indices(step, prompts_per_step, len(problems), seed=0)

    def logged_epochs(world_size, out):
        out.mkdir()
        groups = [sequences.Group(i, step * prompts_per_step + rank + j * world_size,
                                  [Completion([1, 2], "x", [0.0, 0.0], "stop")] * group_size,
                                  {name: [1.0] * group_size for name in ("correct", "total", "accuracy")})
                  for rank in range(world_size) for j, i in enumerate(batch[rank::world_size])]
        groups.sort(key=lambda g: g.position)
        lim.write_trajectories(out, step, groups, problems, distributed.Dist(0, world_size, 0, torch.device("cpu")))
        lines = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
        assert len(lines) == prompts_per_step
        return {line["id"]: line["epoch"] for line in lines}

    expected = {f"p{i}": (step * prompts_per_step + k) // len(problems) for k, i in enumerate(batch)}
    assert sorted(set(expected.values())) == [0, 1]   # the batch does cross the boundary
    assert logged_epochs(1, tmp_path / "one") == expected
    assert logged_epochs(2, tmp_path / "two") == expected