"""DAPO's dynamic sampling in miniature: does it rescue GRPO on all 4,000 `linear` problems?

    .venv/bin/python experiments/dynamic_sampling.py --seeds 0,1,2 --threads 1 # 3 GRPO runs + 8 evaluations a seed, untimed

GRPO from the tiny SFT model over all 4,000 `linear` train problems stayed flat (experiments/demo.py: training
accuracy 0.11 for 80 steps): the model solves 1-2% of the two-unknown systems, so most groups are
all wrong, every advantage in them is 0, and a step learns from a handful of groups. experiments/demo.py moved
to a hand-picked pool instead. DAPO (Yu et al., 2025) keeps the data and drops the groups whose
rewards are all equal, sampling more prompts until the batch holds prompts_per_step groups with
signal (here at most --max-rounds rounds of prompts_per_step prompts a step). Per seed, all from
the same tiny SFT model (grpo.py --preset tiny: 32 prompts x 8 completions, constant lr 5e-5):

1. the tiny SFT model of experiments/demo.py (sft.py --preset tiny, trained here if absent)
2. pool: GRPO on experiments/demo.py's RL pool (common.write_rl_pool: 512 one-unknown problems), --steps steps
3. all: GRPO on all 4,000 `linear` train problems, --steps steps
4. all + dynamic: as 3 with --dynamic-sampling --max-sampling-rounds R, a checkpoint every
   --save-every steps. It generates more per step, so it is also compared at a matched budget:
   its checkpoint whose cumulative generated tokens (metrics.jsonl generated_tokens) come
   closest to arm 3's total without exceeding it (the closest above, if none is below). The lr is
   constant, so a run stopped at step k is the same as a k-step run.
5. evaluate.py on the 200 held-out `linear` problems (--max-tokens 192): greedy pass@1 and
   sampled pass@1 (4 samples per problem at temperature 1), for every final model and the match
6. tools/plot.py curves of the first seed's three runs (docs/figures/dynamic-demo.png)

The claim holds here if arm 4 beats arm 3 at the matched budget, and the table shows how close it
comes to the hand-picked pool. Means ± standard errors over seeds are printed; every number goes
to OUT_DIR/results.json. Every step is an ordinary command, printed before it runs; rerunning skips
finished steps (their times are kept in OUT_DIR/timings.json).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import cell, metrics, pass_at_1, peak_rss_gb, run, timed, write_rl_pool  # first: it puts the repository root on sys.path

ARMS = {"pool": "pool (512 one-unknown)", "all": "all 4,000", "dynamic": "all 4,000 + dynamic sampling"}


def summary(run_dir: Path, steps: int) -> dict:
    """Training figures of a run's first `steps` steps: generated tokens (per step and in all),
    mean groups with signal and sampling rounds per step, training accuracy of the last 10 steps."""
    rows = [r for r in metrics(run_dir) if r["step"] <= steps]
    tokens = [r["generated_tokens"] for r in rows]
    signal = [r["groups_with_signal"] for r in rows]
    return {"steps": len(rows), "generated_tokens": sum(tokens), "tokens_per_step": tokens,
            "groups_with_signal": sum(signal) / len(rows),
            "sampling_rounds": sum(r.get("sampling_rounds", 1) for r in rows) / len(rows),
            "train_accuracy_last10": sum(r["accuracy"] for r in rows[-10:]) / len(rows[-10:])}


def matched_step(dynamic_dir: Path, budget: float, steps: int, save_every: int) -> int:
    """The saved step (a checkpoint or the final one) whose cumulative generated tokens are closest
    to `budget` without exceeding it, or the closest above when every one exceeds it."""
    saved = [k for k in range(save_every, steps, save_every)] + [steps]
    cumulative = {k: summary(dynamic_dir, k)["generated_tokens"] for k in saved}
    below = [k for k in saved if cumulative[k] <= budget]
    return max(below) if below else min(saved, key=lambda k: cumulative[k] - budget)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data order, sampling)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--out-dir", default="runs/dynamic-demo", help="where runs and results go")
    parser.add_argument("--sft", default="runs/demo/sft",
                        help="the tiny SFT model (trained by sft.py --preset tiny if absent)")
    parser.add_argument("--steps", type=int, default=80, help="GRPO steps of every arm")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint interval of the dynamic arm")
    parser.add_argument("--max-rounds", type=int, default=4, help="--max-sampling-rounds of the dynamic arm")
    parser.add_argument("--arms", default="pool,all,dynamic", help=f"comma-separated, of {','.join(ARMS)}")
    parser.add_argument("--figure", default="docs/figures/dynamic-demo.png",
                        help="the first seed's curves (tools/plot.py curves), as a PNG")
    parser.add_argument("--smoke", action="store_true",
                        help="a few tiny steps of everything, 4 test problems: checks the pipeline only")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds takes comma-separated integers, not {args.seeds!r}")
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS) or len(set(arms)) != len(arms):
        raise SystemExit(f"error: --arms takes distinct names of {', '.join(ARMS)}, not {args.arms!r}")
    if args.threads < 1 or args.steps < 1 or not 1 <= args.save_every <= args.steps or args.max_rounds < 1:
        raise SystemExit("error: need --threads >= 1, --steps >= 1, 1 <= --save-every <= --steps and "
                         "--max-rounds >= 1")
    import grpo  # after the flags: it imports torch
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out, sft = Path(args.out_dir), Path(args.sft)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    tiny = grpo.PRESETS["tiny"]
    size = dict(prompts=tiny["prompts_per_step"], generations=tiny["num_generations"], max_tokens=192)
    pool_size, limit, samples, steps, save_every = 512, None, 4, args.steps, args.save_every
    if args.smoke:
        size = dict(prompts=2, generations=2, max_tokens=12)
        pool_size, limit, samples, steps, save_every = 8, 4, 2, 4, 2
    per_step = size["prompts"] * size["generations"]
    common = ["--max-steps", str(steps)]  # everything else is the tiny preset's, but in a smoke run
    if args.smoke:
        common += ["--prompts-per-step", str(size["prompts"]), "--num-generations", str(size["generations"]),
                   "--micro-batch-size", str(per_step), "--max-completion-length", str(size["max_tokens"])]
    if not (sft / "model.safetensors").exists():
        timed("sft", out, [sys.executable, "sft.py", "--preset", "tiny", "--output-dir", str(sft)])
    pool = write_rl_pool(out / "pool.jsonl", pool_size)
    flags = {"pool": ["--data", str(pool), "--save-steps", str(steps)],
             "all": ["--data", "linear", "--save-steps", str(steps)],
             "dynamic": ["--data", "linear", "--dynamic-sampling", "--max-sampling-rounds",
                         str(args.max_rounds), "--save-steps", str(save_every)]}
    evaluate = lambda model, where: pass_at_1(model, where, out, size["max_tokens"], limit, samples)
    results = {"sft": evaluate(sft, out / "sft"), "seeds": {}}
    for seed in seeds:
        seed_dir, figures = out / f"seed{seed}", {}
        for arm in arms:
            run_dir = seed_dir / arm
            if not (run_dir / "model.safetensors").exists():
                timed(f"seed{seed}/{arm} grpo", out,
                      [sys.executable, "grpo.py", "--preset", "tiny", "--model", str(sft),
                       "--seed", str(seed), *common, *flags[arm], "--output-dir", str(run_dir)])
            figures[arm] = {**summary(run_dir, steps), **evaluate(run_dir, run_dir)}
        if {"all", "dynamic"} <= set(arms):
            budget = figures["all"]["generated_tokens"]
            k = matched_step(seed_dir / "dynamic", budget, steps, save_every)
            model = seed_dir / "dynamic" / f"checkpoint-{k}" if k < steps else seed_dir / "dynamic"
            where = seed_dir / f"dynamic-matched-{k}" if k < steps else model  # the final model: done
            figures["matched"] = {**summary(seed_dir / "dynamic", k), **evaluate(model, where)}
        results["seeds"][seed] = figures
    run([sys.executable, "tools/plot.py", "curves", *(str(out / f"seed{seeds[0]}" / arm) for arm in arms),
         "--labels", *(ARMS[arm] for arm in arms), "--panels", "accuracy", "length", "reward", "truncation",
         "--smooth", "5", "--columns", "2", "--out", args.figure])

    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    wall, peak = sum(timings.values()), peak_rss_gb(out)
    results |= {"steps": steps, "arms": arms, "max_rounds": args.max_rounds, "save_every": save_every,
                "timings_s": timings, "wall_s_all_steps": wall, "wall_s_this_call": time.time() - started,
                "peak_rss_gb": peak, "figure": args.figure, "smoke": args.smoke}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    runs = list(results["seeds"].values())
    print(f"\nseeds {args.seeds}; held-out: {limit or 200} `linear` test problems; pass@1, accuracy in %, "
          f"mean ± standard error over seeds; sampled = {samples} samples at temperature 1; "
          f"{size['prompts']} prompts x {size['generations']} completions a step\n")
    print("| GRPO on | steps | generated tokens (k) | groups with signal / step | greedy pass@1 | "
          "sampled pass@1 | train accuracy, last 10 steps |")
    print("|---|---|---|---|---|---|---|")
    print(f"| (SFT model, no RL) | - | - | - | {cell([results['sft']['greedy']])} | "
          f"{cell([results['sft']['sampled']])} | - |")
    labels = {**ARMS, "matched": "all 4,000 + dynamic, at the budget of `all`"}
    for arm in [a for a in (*arms, "matched") if a in runs[0]]:
        f = [r[arm] for r in runs]
        print(f"| {labels[arm]} | {cell([x['steps'] for x in f], 1.0)} | "
              f"{cell([x['generated_tokens'] for x in f], 1e-3)} | "
              f"{cell([x['groups_with_signal'] for x in f], 1.0)} | "
              f"{cell([x['greedy'] for x in f])} | {cell([x['sampled'] for x in f])} | "
              f"{cell([x['train_accuracy_last10'] for x in f])} |")
    print(f"\nwall time of all steps {wall / 60:.1f} min (this call {(time.time() - started) / 60:.1f} "
          f"min); "
          f"peak RSS of the largest step {peak:.2f} GB; figure {args.figure}; every number in "
          f"{out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
