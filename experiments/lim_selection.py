"""LIMR's experiment in miniature: does training on LIM-selected samples match training on all?

    .venv/bin/python experiments/lim_selection.py --seeds 0,1,2,3,4 --threads 1   # ~13 min a seed on one core, +5 to train SFT
    .venv/bin/python experiments/lim_selection.py --seeds 0,1,2 --epochs 8 --out-dir runs/lim-demo-8ep \
        --figure docs/figures/lim-demo-8ep.png                    # a longer full run (docs/experiments.md)

1. start from the tiny SFT model of experiments/demo.py (trained here if it is not there yet)
2. the pool: 512 one-unknown `linear` training problems, which the tiny model solves anywhere from
   never to always. Two-unknown systems are left out on purpose: the model solves 1-2% of them, and
   with half the pool near 0 the average curve stays near 0.15, where a never-solved problem sits
   close to the curve and LIM keeps almost everything (an earlier run: 122 of 128). The pool is
   this large because on 128 problems 16 epochs of GRPO raised the training accuracy from 0.27 to
   0.55 and the held-out accuracy not at all: the tiny model memorised the pool's answers.
3. GRPO for 4 epochs over the whole pool, recording every problem's per-epoch accuracy
   (trajectories.jsonl). This run is also the "full pool" arm of the comparison.
4. lim.py selects: LIM >= 0.6 (LIMR's threshold); LIM at LIMR's keep ratio (1,389 of 8,523 = 16%:
   the top-scoring sixth); RAND, as many as that, at random; LINEAR >= 0.7 (the paper's baseline)
5. a fresh GRPO run from the SFT model on each subset, for the same number of steps as the full run
6. evaluate.py on the 200 held-out `linear` test problems: greedy pass@1 and sampled pass@1
   (4 samples per problem at temperature 1)

Every step is an ordinary command, printed before it runs; rerunning skips what is finished (and
keeps the measured times in OUT_DIR/timings.json). Differences of a few points are within run-to-run
noise, so the script prints means ± standard errors over seeds, writes every number to
OUT_DIR/results.json and the first seed's LIM trajectories to --figure (tools/plot.py lim).
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from common import cell, pass_at_1, peak_rss_gb, run, timed, write_rl_pool  # first: it puts the repository root on sys.path
import lim  # noqa: E402
from grpo import PRESETS  # noqa: E402

LIMR_KEEP_RATIO = 1389 / 8523
ARMS = {"lim": "LIM", "lim-top": "LIM, top 16%", "rand": "RAND", "linear": "LINEAR"}  # --arms name: label


def grpo_arm(model: Path, data_file: Path, run_dir: Path, steps: int, seed: int, out: Path):
    if not (run_dir / "model.safetensors").exists():
        timed(f"{run_dir.relative_to(out)} grpo", out,
              [sys.executable, "grpo.py", "--preset", "tiny", "--model", str(model), "--data", str(data_file),
               "--max-steps", str(steps), "--save-steps", str(steps), "--seed", str(seed),
               "--output-dir", str(run_dir)])


def select(seed_dir: Path, pool: Path, name: str, method: str, threshold: float, seed: int) -> Path:
    subset = seed_dir / f"{name}.jsonl"
    if not subset.exists():
        run([sys.executable, "lim.py", "--trajectories", str(seed_dir / "full" / "trajectories.jsonl"),
             "--data", str(pool), "--method", method, "--threshold", str(threshold), "--out", str(subset),
             "--scores", str(seed_dir / f"{name}-scores.jsonl"), "--seed", str(seed)])
    return subset


def linear_pass_at_1(model: Path, results: Path, out: Path) -> tuple[float, float]:
    """Greedy and sampled (4 at T=1) pass@1 on the 200 held-out `linear` problems, at 192 tokens."""
    figures = pass_at_1(model, results, out, max_tokens=192, limit=None, samples=4)
    return figures["greedy"], figures["sampled"]


def one_seed(out: Path, sft: Path, pool: Path, steps: int, threshold: float, seed: int, wanted) -> dict:
    """Every arm of one seed: {arm: {"problems", "greedy", "sampled", "rule"}}."""
    seed_dir = out / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    grpo_arm(sft, pool, seed_dir / "full", steps, seed, out)
    subsets = {"LIM": select(seed_dir, pool, "lim", "lim", threshold, seed)}
    scores = sorted((json.loads(line)["score"] for line in open(seed_dir / "lim-scores.jsonl")), reverse=True)
    top_sixth = scores[max(0, round(LIMR_KEEP_RATIO * len(scores)) - 1)]
    subsets["LIM, top 16%"] = select(seed_dir, pool, "lim-top", "lim", top_sixth, seed)
    subsets["RAND"] = select(seed_dir, pool, "rand", "rand", top_sixth, seed)  # as many as LIM's top 16%
    subsets["LINEAR"] = select(seed_dir, pool, "linear", "linear", lim.PAPER_THRESHOLDS["linear"], seed)
    arms = {}
    for name, subset in [("full pool", pool), *((n, s) for n, s in subsets.items() if s.stem in wanted)]:
        run_dir = seed_dir / ("full" if subset == pool else subset.stem)
        grpo_arm(sft, subset, run_dir, steps, seed, out)
        greedy, sampled = linear_pass_at_1(run_dir, run_dir, out)
        arms[name] = {"problems": sum(1 for _ in open(subset)), "greedy": greedy, "sampled": sampled,
                      "top_sixth_threshold": top_sixth}
    return arms


def selection_curves(seed_dir: Path) -> dict:
    """Mean per-epoch training accuracy of the whole pool (LIM's average curve) and of what each
    selection kept, from lim.py's scores files; and the share of the pool with a LIM score >= 0.8."""
    def rows(name):
        return [json.loads(line) for line in open(seed_dir / f"{name}-scores.jsonl")]

    def mean_curve(kept):  # lim.py's rbar^k over these rows; NaN per epoch for a selection that kept nothing
        if not kept:
            return [math.nan] * len(lim_rows[0]["trajectory"])
        return lim.average_curve([row["trajectory"] for row in kept]).tolist()

    lim_rows = rows("lim")
    curves = {"pool": mean_curve(lim_rows),
              "lim_score_at_least_0.8": sum(row["score"] >= 0.8 for row in lim_rows) / len(lim_rows)}
    for name in ("lim-top", "rand", "linear"):
        curves[name] = mean_curve([row for row in rows(name) if row["kept"]])
    return curves


def paired(runs: list[dict], arm: str, against: str, kind: str) -> str:
    """arm - against over seeds, both selected from the same seed's full-pool run: mean ± SE, seeds ahead."""
    differences = [r[arm][kind] - r[against][kind] for r in runs]
    return f"{kind} {cell(differences)} (ahead in {sum(d > 0 for d in differences)} of {len(runs)})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/lim-demo",
                        help="where runs and results go (a folder per seed)")
    parser.add_argument("--sft", default="runs/demo/sft",
                        help="the tiny SFT model (trained by sft.py if absent)")
    parser.add_argument("--pool", type=int, default=512,
                        help="one-unknown linear training problems in the pool")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs of the full-pool run (which records trajectories)")
    parser.add_argument("--threshold", type=float, default=0.6, help="LIM score threshold")
    parser.add_argument("--seeds", default="0,1,2,3,4",
                        help="comma-separated seeds; each sets every GRPO run's data order and sampling, "
                             "and RAND's draw")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated selections trained beside the full pool, of {', '.join(ARMS)}")
    parser.add_argument("--figure", default="docs/figures/lim-demo.png",
                        help="the first seed's LIM trajectories and score histogram (tools/plot.py lim), as a PNG")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds takes comma-separated integers, not {args.seeds!r}")
    wanted = args.arms.split(",")
    if set(wanted) - set(ARMS):
        raise SystemExit(f"error: --arms takes names from {', '.join(ARMS)}, not {args.arms!r}")
    if args.pool < 1 or args.epochs < 1 or not 0 <= args.threshold <= 1:
        raise SystemExit("error: need --pool >= 1, --epochs >= 1 and 0 <= --threshold <= 1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out, sft = Path(args.out_dir), Path(args.sft)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if not (sft / "model.safetensors").exists():
        timed("sft", out, [sys.executable, "sft.py", "--preset", "tiny", "--output-dir", str(sft)])
    pool = write_rl_pool(out / "pool.jsonl", args.pool)
    steps = math.ceil(args.epochs * args.pool / PRESETS["tiny"]["prompts_per_step"])
    start = linear_pass_at_1(sft, out / "sft", out)  # the SFT model under the same evaluation
    results = {"seeds": {seed: one_seed(out, sft, pool, steps, args.threshold, seed, wanted)
                         for seed in seeds},
               "curves": {seed: selection_curves(out / f"seed{seed}") for seed in seeds}}
    run([sys.executable, "tools/plot.py", "lim", "--scores", str(out / f"seed{seeds[0]}" / "lim-scores.jsonl"),
         "--threshold", str(args.threshold), "--out", args.figure])
    timings = json.loads((out / "timings.json").read_text())
    results |= {"start": {"greedy": start[0], "sampled": start[1]}, "steps": steps, "timings_s": timings,
                "wall_s_all_steps": sum(timings.values()), "peak_rss_gb": peak_rss_gb(out)}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    runs = list(results["seeds"].values())
    rules = {"LIM": f"score >= {args.threshold}", "RAND": "random, as many as LIM top 16%",
             "LINEAR": f"score >= {lim.PAPER_THRESHOLDS['linear']}", "LIM, top 16%": "top-scoring 16%"}
    print(f"\nseeds {args.seeds}; held-out: the 200 `linear` test problems; pass@1 in %, mean ± standard "
          f"error over seeds; sampled = 4 samples per problem at temperature 1; {steps} GRPO steps per run\n")
    print("| GRPO trained on | selection | problems (mean) | greedy pass@1 | sampled pass@1 | "
          "greedy - full pool |")
    print("|---|---|---|---|---|---|")
    print(f"| (SFT model, no RL) | - | - | {cell([start[0]])} | {cell([start[1]])} | - |")
    for name in runs[0]:
        arm = [r[name] for r in runs]
        versus_full = [a["greedy"] - r["full pool"]["greedy"] for a, r in zip(arm, runs)]
        print(f"| {name} | {rules.get(name, '-')} | {cell([a['problems'] for a in arm], 1.0)} | "
              f"{cell([a['greedy'] for a in arm])} | {cell([a['sampled'] for a in arm])} | "
              f"{cell(versus_full) if name != 'full pool' else '-'} |")
    if "LIM, top 16%" in runs[0] and "RAND" in runs[0]:  # the pair of the same size: LIMR's claim
        versus = [paired(runs, "LIM, top 16%", "RAND", kind) for kind in ("greedy", "sampled")]
        print(f"\nLIM top 16% - RAND, paired by seed, pass@1 in points: {', '.join(versus)}", end="")
    curves = list(results["curves"].values())
    print("\n\nmean training accuracy per epoch of the full-pool run, in %, mean over seeds:")
    for key, label in (("pool", "whole pool (LIM's average curve)"), ("lim-top", "LIM top 16%, kept"),
                       ("rand", "RAND, kept"), ("linear", "LINEAR >= 0.7, kept")):
        epochs = zip(*(c[key] for c in curves))
        print(f"  {label}: " + " ".join(f"{100 * sum(e) / len(e):.0f}" for e in epochs))
    high = [c["lim_score_at_least_0.8"] for c in curves]
    print(f"share of the pool with a LIM score >= 0.8: {cell(high)}%")
    print(f"\nwall time of all steps {results['wall_s_all_steps'] / 60:.1f} min (this call "
          f"{(time.time() - started) / 60:.1f} min); peak RSS of the largest step "
          f"{results['peak_rss_gb']:.2f} GB; "
          f"figure {args.figure}; every number in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
