"""Pictures of runs: training curves from metrics.jsonl, and LIM's trajectories.

    python tools/plot.py curves runs/grpo runs/ppo --out docs/curves.png            # runs overlaid, panel by panel
    python tools/plot.py curves runs/grpo --panels reward accuracy kl --smooth 20 --out docs/grpo.png
    python tools/plot.py lim --trajectories runs/full/trajectories.jsonl --out docs/lim.png
    python tools/plot.py lim --scores runs/lim-demo/lim-scores.jsonl --out docs/lim.png     # as lim.py scored it

`curves` reads the metrics.jsonl that grpo.py, ppo.py and sft.py write (one JSON object a step) and
draws one panel per metric group, every run in its own colour: the raw values thin and faint, a
trailing moving average over --smooth steps solid. A panel is drawn only when some run logged one
of its metrics (sft.py logs no rewards, grpo.py no critic).

`lim` draws what lim.py ranks by: the average learning curve rbar^k, the curves of the samples it
keeps (a seeded draw of at most --max-curves of them, and their mean), and the histogram of the LIM
scores with the threshold. It takes lim.py's --scores file (trajectories, scores and kept flags as
lim.py scored them), or a trajectories.jsonl that it scores with lim.py's own functions (--gaps and
--threshold as in lim.py).

Figures are drawn with matplotlib's Agg backend (no display needed) and written as PNG.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless machine
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data.py and lim.py, run as `python tools/plot.py`
import data  # noqa: E402
import lim  # noqa: E402

# panel name -> (title, the metrics.jsonl keys it draws). "reward/" stands for every reward
# function's mean (reward/<name>, not its _std).
PANELS = {
    "reward": ("reward per function", ["reward/"]),
    "accuracy": ("accuracy (fraction of completions right)", ["accuracy"]),
    "length": ("response length (tokens)", ["response_length_mean", "response_length_max"]),
    "truncation": ("truncated fraction (hit max tokens)", ["truncated_frac"]),
    "kl": ("KL to the reference", ["kl"]),
    "entropy": ("entropy (nats per token)", ["entropy"]),
    "clip": ("clip fraction", ["clip_frac", "value_clip_frac"]),
    "grad_norm": ("gradient norm (before clipping)", ["grad_norm", "actor_grad_norm", "critic_grad_norm"]),
    "logprob_gap": ("|logprob engine - trainer|", ["logprob_gap_mean", "logprob_gap_max"]),
    "tokens_per_s": ("tokens per second", ["tokens_per_s"]),
    "loss": ("loss", ["loss", "policy_loss", "value_loss"]),
}


# ----------------------------------------------------------------------------------------------
# Training curves

def read_metrics(run) -> list[dict]:
    """The rows of RUN/metrics.jsonl (or of the file itself), in step order."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise data.DataError(f"{path} does not exist (give a run's output dir or its metrics.jsonl)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise data.DataError(f"{path} line {number}: malformed JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise data.DataError(f"{path} line {number}: expected an object with an integer step")
            rows.append(row)
    if not rows:
        raise data.DataError(f"{path}: no metrics")
    # a resumed run appends steps it already logged once: the later line is the one that counts
    return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, over the steps that logged a finite number for it."""
    points = [(row["step"], row[key]) for row in rows
              if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)
              and np.isfinite(row[key])]
    return np.array([s for s, _ in points]), np.array([v for _, v in points], dtype=float)


def keys_of(panel: str, rows: list[dict]) -> list[str]:
    """The metrics of `panel` this run logged."""
    logged = list(dict.fromkeys(key for row in rows for key in row))
    keys = []
    for wanted in PANELS[panel][1]:
        if wanted.endswith("/"):
            keys += [k for k in logged if k.startswith(wanted) and not k.endswith("_std")]
        elif wanted in logged:
            keys.append(wanted)
    return [k for k in keys if len(series(rows, k)[0])]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` values (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_curves(runs: list, out, panels: list[str] | None = None, smooth: int = 10,
                labels: list[str] | None = None, columns: int = 3) -> Figure:
    """One panel per metric group that some run logged; every run overlaid in its own colour."""
    labels = labels or [Path(run).name if Path(run).is_dir() else Path(run).parent.name for run in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    metrics = [read_metrics(run) for run in runs]
    asked = panels or list(PANELS)
    drawn = [panel for panel in asked if any(keys_of(panel, rows) for rows in metrics)]
    if not drawn:
        raise data.DataError(f"none of the panels {', '.join(asked)} has a metric in {', '.join(map(str, runs))}")
    columns = min(columns, len(drawn))
    rows_of_panels = -(-len(drawn) // columns)  # ceiling division
    figure = Figure(figsize=(5.2 * columns, 3.4 * rows_of_panels), layout="constrained")
    colours = matplotlib.colormaps["tab10"].colors
    line_styles = ["-", "--", ":", "-."]
    for n, panel in enumerate(drawn):
        axes = figure.add_subplot(rows_of_panels, columns, n + 1)
        axes.set_title(PANELS[panel][0])
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        for run, (rows, label) in enumerate(zip(metrics, labels)):
            keys = keys_of(panel, rows)
            for k, key in enumerate(keys):
                steps, values = series(rows, key)
                style = dict(color=colours[run % len(colours)], linestyle=line_styles[k % len(line_styles)])
                # a panel of one metric names the run only; one of several names the metric too
                name = label if PANELS[panel][1] == [key] else f"{label}: {key.removeprefix('reward/')}"
                if smooth > 1:
                    axes.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
                axes.plot(steps, moving_average(values, smooth), linewidth=1.6, label=name, **style)
        if panel in ("grad_norm", "tokens_per_s", "logprob_gap") and _spans_decades(axes):
            axes.set_yscale("log")
        axes.legend(fontsize=7)
    smoothing = f"thin: raw, thick: mean of the last {smooth} steps" if smooth > 1 else "raw"
    figure.suptitle(f"training curves ({smoothing})")
    _save(figure, out)
    return figure


def _spans_decades(axes) -> bool:
    """Whether the panel's values are all positive and span more than two decades (then: log scale)."""
    values = np.concatenate([line.get_ydata() for line in axes.get_lines()])
    positive = values[values > 0]
    return len(positive) == len(values) and positive.max() > 100 * positive.min()


# ----------------------------------------------------------------------------------------------
# LIM's trajectories

def plot_lim(out, trajectories=None, scores_path=None, gaps: str = "limr", threshold: float = 0.6,
             max_curves: int = 60, seed: int = 0) -> Figure:
    """The average learning curve, the kept samples' curves, and the score histogram: from a
    trajectories.jsonl scored here, or from lim.py's --scores file exactly as lim.py scored it."""
    if scores_path:
        rows = lim_scores_rows(scores_path)
        r = np.array([[np.nan if x is None else x for x in row["trajectory"]] for row in rows], dtype=float)
        scores, kept = np.array([row["score"] for row in rows]), np.array([row["kept"] for row in rows])
        rule = f"as kept in {Path(scores_path).name}"
    else:
        r = lim.read_trajectories(trajectories)[1]
        if gaps == "limr":
            r, keep = lim.fill_gaps_like_limr(r)
            if not keep.any():
                raise data.DataError(f"{trajectories}: every sample has a gap LIMR's rule cannot fill; try --gaps seen")
            r = r[keep]
        scores = lim.lim_scores(r)
        kept = scores >= threshold
        rule = f"score >= {threshold}, gaps: {gaps}"
    rbar, epochs = lim.average_curve(r), np.arange(r.shape[1])

    figure = Figure(figsize=(12, 4.2), layout="constrained")
    curves, histogram = figure.subplots(1, 2)
    chosen = np.flatnonzero(kept)
    shown = np.random.default_rng(seed).permutation(chosen)[:max_curves]
    for i in shown:  # small vertical jitter: r is a multiple of 1/G and the curves would coincide
        jitter = np.random.default_rng([seed, int(i)]).uniform(-0.01, 0.01)
        curves.plot(epochs, r[i] + jitter, color="tab:green", alpha=0.25, linewidth=0.8)
    if len(chosen):
        curves.plot(epochs, np.nanmean(r[chosen], axis=0), color="tab:green", linewidth=2, linestyle="--",
                    label=f"mean of the {len(chosen)} kept")
    curves.plot(epochs, rbar, color="black", linewidth=2.5, label=f"average curve rbar (all {len(r)})")
    curves.set_title(f"learning curves: {len(shown)} of the {len(chosen)} kept ({rule})")
    curves.set(xlabel="epoch", ylabel="fraction of samples correct", ylim=(-0.05, 1.05), xticks=epochs)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)

    histogram.hist(scores, bins=40, color="tab:blue", alpha=0.8)
    if not scores_path:  # a scores file may come from any method and threshold: its kept flags say
        histogram.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
        histogram.legend(fontsize=8)
    histogram.set_title(f"LIM scores of {len(scores)} samples ({int(kept.sum())} kept)")
    histogram.set(xlabel="LIM score (1 = on the average curve)", ylabel="samples")
    histogram.grid(alpha=0.3)
    _save(figure, out)
    return figure


def lim_scores_rows(path) -> list[dict]:
    """lim.py's --scores file (a JSON list or JSON lines of {id, score, kept, trajectory})."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()
                                                                if line.strip()]
    except json.JSONDecodeError as error:
        raise data.DataError(f"{path}: malformed JSON ({error.msg})") from None
    if not rows or not all(isinstance(row, dict) and {"score", "kept", "trajectory"} <= row.keys()
                           for row in rows):
        raise data.DataError(f"{path}: expected lim.py --scores rows with score, kept and trajectory")
    if any(not isinstance(row["trajectory"], list) for row in rows):
        raise data.DataError(f"{path}: no trajectories (scored from a --scores-file); plot its run's trajectories")
    if len({len(row["trajectory"]) for row in rows}) > 1:
        raise data.DataError(f"{path}: trajectories of different lengths")
    return rows


def _save(figure: Figure, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)


# ----------------------------------------------------------------------------------------------
# The script

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("curves", help="training curves from metrics.jsonl")
    c.add_argument("runs", nargs="+", help="run output dirs (or their metrics.jsonl files), drawn overlaid")
    c.add_argument("--out", required=True, help="the PNG to write")
    c.add_argument("--panels", nargs="+", choices=list(PANELS), default=None, metavar="PANEL",
                   help=f"panels to draw, in this order, of: {', '.join(PANELS)} (default: every one some run "
                   "has metrics for)")
    c.add_argument("--smooth", type=int, default=10,
                   help="moving-average window in steps; 1: raw only (default: %(default)s)")
    c.add_argument("--labels", nargs="+", default=None, help="a legend name per run (default: the dir names)")
    c.add_argument("--columns", type=int, default=3, help="panels per row (default: %(default)s)")
    m = commands.add_parser("lim", help="LIM's average curve, the kept samples' curves and the score histogram")
    source = m.add_mutually_exclusive_group(required=True)
    source.add_argument("--trajectories", help="trajectories.jsonl written by grpo.py or ppo.py: scored here "
                        "with lim.py's functions")
    source.add_argument("--scores", help="or lim.py's --scores file (from --trajectories or --limr-steps): its "
                        "trajectories, scores and kept flags, exactly as lim.py scored them")
    m.add_argument("--gaps", choices=lim.GAP_RULES, default="limr",
                   help="as lim.py's --gaps, with --trajectories (default: %(default)s)")
    m.add_argument("--threshold", type=float, default=lim.PAPER_THRESHOLDS["lim"],
                   help="keep scores >= this, with --trajectories (default: %(default)s)")
    m.add_argument("--max-curves", type=int, default=60, help="at most this many kept curves are drawn "
                   "(default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="which kept curves are drawn (default: %(default)s)")
    m.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out must name a .png file, not {args.out!r}")
    if args.command == "curves":
        if args.smooth < 1 or args.columns < 1:
            parser.error("--smooth and --columns take a number >= 1")
        if args.labels and len(args.labels) != len(args.runs):
            parser.error(f"--labels got {len(args.labels)} names for {len(args.runs)} runs")
    elif args.max_curves < 0:
        parser.error("--max-curves takes a number >= 0")
    return args


def main(argv=None) -> Figure:
    args = parse_args(argv)
    if args.command == "curves":
        figure = plot_curves(args.runs, args.out, args.panels, args.smooth, args.labels, args.columns)
    else:
        figure = plot_lim(args.out, args.trajectories, args.scores, args.gaps, args.threshold, args.max_curves,
                          args.seed)
    print(f"plot: wrote {args.out}")
    return figure


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad input is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
