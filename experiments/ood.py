"""Out of domain, in miniature: after SFT or GRPO on one task, what is left of another?

    .venv/bin/python experiments/ood.py --seeds 0,1,2     # about 30 min on an idle 2-core VM (estimated, not measured)

The GRPO-vs-SFT study trained Qwen2.5-1.5B-Instruct on linear equations: in domain SFT and GRPO both
rose (4.2 -> 71.6 and 74.0), but on GSM8K SFT fell from 55.19 to 0.73 while GRPO rose to 64.44. Here:

1. the start, the stand-in for the instruct model: sft.py --preset tiny on a mixture of all 4,000
   `linear` and all 4,000 `arith` train problems (data.py: task B, arithmetic word problems), so it
   solves some of both. One start, shared by every seed.
2. per seed, from that start, on `linear` only:
   - GRPO: grpo.py --preset tiny (80 steps of 32 prompts x 8 completions, accuracy reward) on the
     RL pool of experiments/demo.py (512 one-unknown problems: groups of two-unknown ones are almost always all
     wrong and carry no advantage);
   - SFT: sft.py on the worked solutions of all 4,000 `linear` train problems, for as many sequences
     through forward and backward as GRPO's (80 x 32 x 8 = 20,480 = 640 steps of 32; GRPO's
     generation comes on top); both runs' trained response tokens and wall times are in the table.
3. evaluate.py on the 200 held-out problems of each task: greedy pass@1 and sampled pass@1 (4
   samples per problem at temperature 1), before (the start) and after.
4. tools/plot.py: the first seed's two training runs, written to --figure (docs/figures/ood-demo.png).

The claim holds here if SFT loses more on `arith` than GRPO does. The script prints a table of
means +- standard errors over seeds, and writes every number to OUT_DIR/results.json. Every step is
an ordinary command, printed before it runs; rerunning skips finished steps (their measured times
are kept in OUT_DIR/timings.json), and the trainers resume from their last checkpoint.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import cell, metrics, peak_rss_gb, run, timed, write_rl_pool  # first: it puts the repository root on sys.path

TASKS = ("linear", "arith")  # in domain, out of domain
SFT_BATCH = 32  # sft.py's tiny preset


def evaluate(model: Path, out: Path, limit: int | None, max_tokens: int, samples: int) -> dict:
    """{task: {"greedy": pass@1, "sampled": pass@1}} on both tasks' test splits."""
    figures = {task: {} for task in TASKS}
    for name, extra in (("greedy", []), ("sampled", ["--n", str(samples), "--temperature", "1.0"])):
        result = model / f"eval-{name}.json"
        if not result.exists():
            timed(f"eval {model.relative_to(out)} {name}", out,
                  [sys.executable, "evaluate.py", "--engine", "hf", "--model", str(model), "--bench", *TASKS,
                   "--template", "plain", "--max-tokens", str(max_tokens), "--out", str(result), *extra,
                   *(["--limit", str(limit)] if limit else [])])
        for task, summary in zip(TASKS, json.loads(result.read_text())):
            figures[task][name] = summary["pass@1"]
    return figures


def trained_tokens(run_dir: Path, sequences_per_step: int | None) -> float:
    """Response tokens that went through forward and backward, from the run's metrics.jsonl."""
    rows = metrics(run_dir)
    if sequences_per_step is None:  # sft.py: tokens per second x seconds of each step
        return sum(row["tokens_per_s"] * row["step_s"] for row in rows)
    return sum(row["response_length_mean"] for row in rows) * sequences_per_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the runs on `linear`")
    parser.add_argument("--out-dir", default="runs/ood-demo", help="where models, metrics and results go")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--sft-lr", type=float, default=1e-3,
                        help="peak learning rate of SFT on `linear` (the start: the tiny preset's 3e-3)")
    parser.add_argument("--figure", default="docs/figures/ood-demo.png",
                        help="the first seed's SFT and GRPO runs on `linear` (tools/plot.py curves), as a PNG")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps of everything, 4 test problems per task: checks the pipeline, "
                             "its numbers mean nothing")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.threads < 1 or args.sft_lr <= 0:
        parser.error(f"--threads must be at least 1 and --sft-lr positive, "
                     f"got {args.threads} and {args.sft_lr}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # The sizes of every run; --smoke shrinks them to seconds.
    grpo = dict(steps=80, prompts=32, generations=8, max_tokens=192)
    start_steps, limit, samples, eval_tokens = 1200, None, 4, 192
    if args.smoke:
        grpo = dict(steps=1, prompts=2, generations=2, max_tokens=12)
        start_steps, limit, samples, eval_tokens = 2, 4, 2, 12
    grpo_flags = ["--max-steps", str(grpo["steps"]), "--save-steps", str(grpo["steps"]),
                  "--prompts-per-step", str(grpo["prompts"]), "--num-generations", str(grpo["generations"]),
                  "--micro-batch-size", str(grpo["prompts"] * grpo["generations"]),
                  "--max-completion-length", str(grpo["max_tokens"])]
    grpo_sequences = grpo["steps"] * grpo["prompts"] * grpo["generations"]
    sft_steps = max(1, grpo_sequences // SFT_BATCH)  # as many sequences through forward and backward

    start = out / "start"
    if not (start / "model.safetensors").exists():
        timed("start", out, [sys.executable, "sft.py", "--preset", "tiny", "--data", ",".join(TASKS),
                             "--max-steps", str(start_steps), "--output-dir", str(start)])
    pool = write_rl_pool(out / "rl-pool.jsonl")
    results = {"start": evaluate(start, out, limit, eval_tokens, samples), "seeds": {}}
    for seed in seeds:
        sft_dir, grpo_dir = out / f"seed{seed}" / "sft-linear", out / f"seed{seed}" / "grpo-linear"
        if not (grpo_dir / "model.safetensors").exists():
            timed(f"seed{seed} grpo", out,
                  [sys.executable, "grpo.py", "--preset", "tiny", "--model", str(start), "--data", str(pool),
                   "--seed", str(seed), *grpo_flags, "--output-dir", str(grpo_dir)])
        if not (sft_dir / "model.safetensors").exists():
            timed(f"seed{seed} sft", out,
                  [sys.executable, "sft.py", "--preset", "tiny", "--model", str(start), "--data", "linear",
                   "--lr", str(args.sft_lr), "--max-steps", str(sft_steps), "--seed", str(seed),
                   "--save-steps", str(max(1, sft_steps // 4)), "--output-dir", str(sft_dir)])
        results["seeds"][seed] = {
            "sft": {**evaluate(sft_dir, out, limit, eval_tokens, samples), "steps": sft_steps,
                    "sequences": sft_steps * SFT_BATCH, "response_tokens": trained_tokens(sft_dir, None)},
            "grpo": {**evaluate(grpo_dir, out, limit, eval_tokens, samples), "steps": grpo["steps"],
                     "sequences": grpo_sequences,
                     "response_tokens": trained_tokens(grpo_dir, grpo["prompts"] * grpo["generations"])}}

    first = out / f"seed{seeds[0]}"
    run([sys.executable, "tools/plot.py", "curves", str(first / "sft-linear"), str(first / "grpo-linear"), "--labels",
         "SFT on linear", "GRPO on linear", "--panels", "loss", "grad_norm", "accuracy", "reward", "length",
         "--out", args.figure])
    timings = json.loads((out / "timings.json").read_text())
    wall = sum(timings.values())
    peak = peak_rss_gb(out)
    results |= {"timings_s": timings, "wall_s_all_steps": wall, "wall_s_this_call": time.time() - started,
                "peak_rss_gb": peak, "sft_lr": args.sft_lr, "smoke": args.smoke}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    runs = results["seeds"].values()
    before = results["start"]
    rows = [f"| start (SFT on linear + arith) | - | {cell([before['linear']['greedy']])} | "
            f"{cell([before['linear']['sampled']])} | {cell([before['arith']['greedy']])} | "
            f"{cell([before['arith']['sampled']])} | - | - |"]
    for arm, label in (("sft", "SFT on linear"), ("grpo", "GRPO on linear")):
        figures = [r[arm] for r in runs]
        drop = [f["arith"]["greedy"] - before["arith"]["greedy"] for f in figures]
        minutes = [timings[f"seed{seed} {arm}"] / 60 for seed in seeds if f"seed{seed} {arm}" in timings]
        tokens = cell([f["response_tokens"] for f in figures], 1e-3)
        accuracies = [cell([f[task][kind] for f in figures])
                      for task in TASKS for kind in ("greedy", "sampled")]
        rows.append(f"| {label} | {figures[0]['sequences']} seq., {tokens}k tok. | {' | '.join(accuracies)} | "
                    f"{cell(drop)} | {cell(minutes, 1.0) if minutes else '-'} |")
    print(f"\nseeds {args.seeds}; held-out test sets ({limit or 200} problems each); pass@1 in %, mean ± "
          f"standard error over seeds; sampled = {samples} samples at temperature 1; trained: sequences "
          f"through forward and backward, response tokens in them\n")
    print("| model | trained | linear greedy | linear sampled | arith greedy | arith sampled | "
          "arith greedy change | training min |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nwall time of all steps {wall / 60:.1f} min (this call {(time.time() - started) / 60:.1f} min); "
          f"peak RSS of the largest step {peak:.2f} GB; every number in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
