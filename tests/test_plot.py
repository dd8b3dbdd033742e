"""tools/plot.py: the panels asked for, only those with data, a real PNG; LIM's figure from lim.py's files."""
import json

import numpy as np
import pytest

import data
import lim
import plot
from test_lim import simulate_limr_run


def write_metrics(path, steps, keys, seed=0):
    """metrics.jsonl as grpo.py / ppo.py write it: {"step", "time", metric: value, ...} per step."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "time": 1.0e9 + step}
            row |= {key: float(np.clip(step / steps + rng.normal(0, 0.1), 0, None)) for key in keys}
            f.write(json.dumps(row) + "\n")
    return path


GRPO_KEYS = ["reward/accuracy", "reward/accuracy_std", "reward/format", "reward/total", "accuracy",
             "response_length_mean", "response_length_max", "truncated_frac", "kl", "entropy", "clip_frac",
             "grad_norm", "logprob_gap_mean", "logprob_gap_max", "tokens_per_s", "loss", "lr"]
PPO_KEYS = ["reward/limr", "reward/total", "accuracy", "kl", "clip_frac", "value_clip_frac", "actor_grad_norm",
            "critic_grad_norm", "policy_loss", "value_loss"]


def titles(figure):
    return [axes.get_title() for axes in figure.axes]


def test_curves_draw_the_panels_asked_for_and_write_a_png(tmp_path):
    run = write_metrics(tmp_path / "grpo", 30, GRPO_KEYS)
    out = tmp_path / "figs" / "three.png"
    figure = plot.main(["curves", str(run), "--panels", "accuracy", "kl", "reward", "--out", str(out)])
    assert titles(figure) == [plot.PANELS[p][0] for p in ("accuracy", "kl", "reward")]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    # the reward panel: one smoothed line per reward function (not the _std columns), each with its raw line
    reward = figure.axes[2]
    legend = [t.get_text() for t in reward.get_legend().get_texts()]
    assert legend == ["grpo: accuracy", "grpo: format", "grpo: total"]
    assert len(reward.get_lines()) == 6
    # the smoothed line is the trailing mean of the raw one
    raw, smoothed = (line.get_ydata() for line in figure.axes[0].get_lines())
    np.testing.assert_allclose(smoothed[9:], [raw[i - 9:i + 1].mean() for i in range(9, 30)])
    np.testing.assert_allclose(smoothed[:3], [raw[0], raw[:2].mean(), raw[:3].mean()])


def test_curves_of_all_panels_skip_those_without_metrics_and_overlay_runs(tmp_path):
    grpo = write_metrics(tmp_path / "grpo", 40, GRPO_KEYS)
    ppo = write_metrics(tmp_path / "ppo", 25, PPO_KEYS, seed=1)
    out = tmp_path / "both.png"
    figure = plot.main(["curves", str(grpo), str(ppo / "metrics.jsonl"), "--labels", "GRPO", "PPO",
                        "--smooth", "1", "--out", str(out)])
    assert titles(figure) == [title for title, _ in plot.PANELS.values()]  # grpo has every panel
    assert out.stat().st_size > 50_000
    clip = figure.axes[list(plot.PANELS).index("clip")]
    legend = [t.get_text() for t in clip.get_legend().get_texts()]
    assert legend == ["GRPO: clip_frac", "PPO: clip_frac", "PPO: value_clip_frac"]
    assert len(clip.get_lines()) == 3  # --smooth 1: raw only, one line per metric
    # a run without rewards or lengths (sft.py's) gets only its panels
    sft = write_metrics(tmp_path / "sft", 10, ["loss", "grad_norm", "lr", "tokens_per_s"])
    figure = plot.main(["curves", str(sft), "--out", str(tmp_path / "sft.png")])
    assert titles(figure) == [plot.PANELS[p][0] for p in ("grad_norm", "tokens_per_s", "loss")]
    with pytest.raises(data.DataError, match="none of the panels kl, entropy"):
        plot.main(["curves", str(sft), "--panels", "kl", "entropy", "--out", str(tmp_path / "x.png")])


def test_a_resumed_run_counts_each_step_once(tmp_path):
    run = write_metrics(tmp_path / "run", 5, ["kl"])
    with open(run / "metrics.jsonl", "a") as f:  # resumed from step 3: steps 4 and 5 logged again
        f.write(json.dumps({"step": 4, "kl": 40.0}) + "\n" + json.dumps({"step": 5, "kl": 50.0}) + "\n")
    steps, values = plot.series(plot.read_metrics(run), "kl")
    assert steps.tolist() == [1, 2, 3, 4, 5] and values[3:].tolist() == [40.0, 50.0]


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="nowhere does not exist"):
        plot.main(["curves", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(data.DataError, match="line 2: malformed JSON"):
        plot.main(["curves", str(tmp_path / "bad"), "--out", str(tmp_path / "x.png")])
    for argv in (["curves", "r", "--out", "x.pdf"], ["curves", "a", "b", "--labels", "one", "--out", "x.png"],
                 ["curves", "r", "--smooth", "0", "--out", "x.png"], ["lim", "--out", "x.png"]):
        with pytest.raises(SystemExit):
            plot.main(argv)
    assert not list(tmp_path.glob("*.png"))


def test_lim_figure_from_trajectories_and_from_lims_scores_file(tmp_path):
    data_file, _, trajectories, _ = simulate_limr_run(tmp_path, 50, 5, 7, 10, seed=2)
    out = tmp_path / "lim.png"
    figure = plot.main(["lim", "--trajectories", str(trajectories), "--out", str(out)])
    curves, histogram = figure.axes
    r, keep = lim.fill_gaps_like_limr(lim.read_trajectories(trajectories)[1])
    scores = lim.lim_scores(r[keep])
    kept = int((scores >= 0.6).sum())
    assert curves.get_title().startswith(f"learning curves: {kept} of the {kept} kept")
    assert histogram.get_title() == f"LIM scores of {keep.sum()} samples ({kept} kept)"
    assert sum(patch.get_height() for patch in histogram.patches) == keep.sum()
    average = [line for line in curves.get_lines() if line.get_label().startswith("average curve")]
    np.testing.assert_allclose(average[0].get_ydata(), lim.average_curve(r[keep]))
    assert out.stat().st_size > 20_000

    # from lim.py's --scores file: the same samples, scores and kept flags
    scores_file = tmp_path / "scores.jsonl"
    lim.main(["--trajectories", str(trajectories), "--data", str(data_file), "--out", str(tmp_path / "kept.jsonl"),
              "--scores", str(scores_file)])
    figure = plot.main(["lim", "--scores", str(scores_file), "--max-curves", "3", "--out", str(out)])
    curves, histogram = figure.axes
    assert curves.get_title().startswith(f"learning curves: 3 of the {kept} kept")
    assert histogram.get_title() == f"LIM scores of {keep.sum()} samples ({kept} kept)"
    lim.main(["--scores-file", str(scores_file), "--data", str(data_file), "--out", str(tmp_path / "again.jsonl"),
              "--scores", str(tmp_path / "no-curves.jsonl")])
    with pytest.raises(data.DataError, match="no trajectories"):
        plot.main(["lim", "--scores", str(tmp_path / "no-curves.jsonl"), "--out", str(out)])
