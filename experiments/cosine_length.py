"""Open-RS's "cosine rewards stabilize completion lengths", in miniature, at a tight completion limit.

    .venv/bin/python experiments/cosine_length.py --seeds 0,1,2 --threads 1   # 2 GRPO runs + 4 evaluations a seed, untimed

Open-RS (Dang & Ngo, 2025) replaced the accuracy reward by a cosine of the completion's length:
a right answer earns 1.0 at length 0 down to 0.5 at --cosine-max-len, a wrong one 0.0 down to
-0.5 (rewards.CosineShape), so shorter is better either way, and said it kept lengths stable
under a tight limit. Here the limit is --max-len 64 tokens (the tokenizer is character-level).
Its basis, measured on 2026-12-02: the worked solutions of `linear` (data.py) have 15-26
characters for one unknown (all 1,723 train problems) and 34-98 for two (2,277; median 74, 75%
of them 64 or more); the tiny SFT model's greedy completions (step 2: the first 100 train problems
of each kind, at most 192 tokens) are 16-27 tokens (mean 24.1, none over 64, pass@1 23%) and 50-99
(mean 77.6, median 75, 76% over 64, pass@1 2%). So at 64 every one-unknown problem fits and three
quarters of the two-unknown solutions are cut off, about 43% of the 4,000: truncation matters.

1. the tiny SFT model of experiments/demo.py (sft.py --preset tiny, trained here if absent)
2. its greedy completions of the first 100 one- and 100 two-unknown train problems (evaluate.py,
   --max-tokens 192): mean length, and the fraction longer than --max-len
3. per seed, GRPO (grpo.py --preset tiny: 32 prompts x 8, constant lr 5e-5) on all 4,000 `linear`
   train problems for --steps steps at --max-completion-length --max-len, with
   - accuracy: --rewards accuracy:1
   - cosine: --rewards cosine:1 --cosine-max-len MAX_LEN --cosine-unit tokens, and Open-RS's
     START:END values (--cosine-correct 1.0:0.5, --cosine-wrong 0.0:-0.5)
4. evaluate.py on the 200 held-out `linear` problems at --max-tokens MAX_LEN: greedy pass@1 and
   sampled pass@1 (4 samples per problem at temperature 1)
5. tools/plot.py curves of every run: length, truncation, accuracy, reward (docs/figures/length-demo.png)

Under the accuracy reward a group of cut-off completions is all wrong and carries no signal; under
the cosine reward a shorter wrong answer still earns more than a longer one. The claim holds here
if the cosine arm's mean length and truncated fraction stay level (or fall) over training while
the accuracy arm's drift, at no loss of accuracy. Means ± standard errors over
seeds are printed; every number goes to OUT_DIR/results.json. Every step is an ordinary command,
printed before it runs; rerunning skips finished steps (their times are kept in OUT_DIR/timings.json).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import cell, metrics, pass_at_1, peak_rss_gb, run, timed  # first: it puts the repository root on sys.path

ARMS = ("accuracy", "cosine")


def write_kinds(out: Path, size: int) -> list[Path]:
    """The first `size` one-unknown and two-unknown `linear` train problems, a file each."""
    import data
    import lim

    files = [out / "one-unknown.jsonl", out / "two-unknown.jsonl"]
    if not all(f.exists() for f in files):
        train = data.load_problems("linear", split="train")
        for path, two in zip(files, (False, True)):
            lim.write_rows(path, [p for p in train if ("(" in p["answer"]) == two][:size])
    return files


def measure(sft: Path, out: Path, size: int, max_len: int, cap: int = 192) -> dict:
    """Step 2: {kind: {"mean_length", "longer_than_limit", "pass@1"}} of the SFT model's greedy answers."""
    files, result = write_kinds(out, size), out / "sft-lengths.json"
    if not result.exists():
        timed("measure sft lengths", out,
              [sys.executable, "evaluate.py", "--engine", "hf", "--model", str(sft), "--bench", *map(str, files),
               "--template", "plain", "--max-tokens", str(cap), "--out", str(result)])
    samples = [json.loads(line) for line in open(out / "sft-lengths.samples.jsonl")]
    figures = {}
    for kind, path, summary in zip(("one-unknown", "two-unknown"), files, json.loads(result.read_text())):
        lengths = [n for s in samples if s["bench"] == summary["bench"] for n in s["num_tokens"]]
        figures[kind] = {"mean_length": summary["mean_response_tokens"], "pass@1": summary["pass@1"],
                         "longer_than_limit": sum(n > max_len for n in lengths) / len(lengths)}
    return figures


def windows(run_dir: Path, size: int = 10) -> dict:
    """Mean length, truncated fraction and accuracy over the first and the last `size` steps."""
    rows = metrics(run_dir)
    mean = lambda part, key: sum(r[key] for r in part) / len(part)
    first, last = rows[:size], rows[-size:]
    return {"steps": len(rows),
            "length_first": mean(first, "response_length_mean"),
            "length_last": mean(last, "response_length_mean"),
            "truncated_first": mean(first, "truncated_frac"), "truncated_last": mean(last, "truncated_frac"),
            "accuracy_first": mean(first, "accuracy"), "accuracy_last": mean(last, "accuracy"),
            "groups_with_signal": mean(rows, "groups_with_signal")}  # of prompts_per_step groups


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data order, sampling)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--out-dir", default="runs/length-demo", help="where runs and results go")
    parser.add_argument("--sft", default="runs/demo/sft",
                        help="the tiny SFT model (trained by sft.py --preset tiny if absent)")
    parser.add_argument("--steps", type=int, default=80, help="GRPO steps of both arms")
    parser.add_argument("--max-len", type=int, default=64,
                        help="tokens: training's --max-completion-length and --cosine-max-len, "
                             "evaluation's --max-tokens")
    parser.add_argument("--cosine-correct", default="1.0:0.5", help="START:END, right answers (Open-RS's)")
    parser.add_argument("--cosine-wrong", default="0.0:-0.5", help="START:END, wrong answers (Open-RS's)")
    parser.add_argument("--figure", default="docs/figures/length-demo.png",
                        help="every run's curves (tools/plot.py curves), as a PNG")
    parser.add_argument("--smoke", action="store_true",
                        help="a few tiny steps of everything, 4 test problems: checks the pipeline only")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        [float(v) for pair in (args.cosine_correct, args.cosine_wrong) for v in pair.split(":", 1)]
    except ValueError:
        raise SystemExit(f"error: --seeds takes comma-separated integers ({args.seeds!r}), --cosine-correct "
                         f"and --cosine-wrong START:END ({args.cosine_correct!r}, {args.cosine_wrong!r})")
    if args.threads < 1 or args.steps < 1 or not 8 <= args.max_len <= 192:
        raise SystemExit("error: need --threads >= 1, --steps >= 1 and 8 <= --max-len <= 192")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out, sft = Path(args.out_dir), Path(args.sft)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    prompts, generations, max_len, steps = 32, 8, args.max_len, args.steps
    limit, samples, kinds, cap = None, 4, 100, 192
    if args.smoke:
        prompts, generations, max_len, steps, limit, samples, kinds, cap = 2, 2, 8, 3, 4, 2, 4, 16
    common = ["--data", "linear", "--max-completion-length", str(max_len), "--max-steps", str(steps),
              "--save-steps", str(steps)]  # everything else is the tiny preset's, but in a smoke run
    if args.smoke:
        common += ["--prompts-per-step", str(prompts), "--num-generations", str(generations),
                   "--micro-batch-size", str(prompts * generations)]
    rewards = {"accuracy": ["--rewards", "accuracy:1"],
               "cosine": ["--rewards", "cosine:1", "--cosine-max-len", str(max_len),
                          "--cosine-unit", "tokens", f"--cosine-correct={args.cosine_correct}",
                          f"--cosine-wrong={args.cosine_wrong}"]}
    if not (sft / "model.safetensors").exists():
        timed("sft", out, [sys.executable, "sft.py", "--preset", "tiny", "--output-dir", str(sft)])
    evaluate = lambda model, where: pass_at_1(model, where, out, max_len, limit, samples)
    results = {"sft_lengths": measure(sft, out, kinds, max_len, cap), "sft": evaluate(sft, out / "sft"),
               "seeds": {}}
    for seed in seeds:
        results["seeds"][seed] = {}
        for arm in ARMS:
            run_dir = out / f"seed{seed}" / arm
            if not (run_dir / "model.safetensors").exists():
                timed(f"seed{seed}/{arm} grpo", out,
                      [sys.executable, "grpo.py", "--preset", "tiny", "--model", str(sft),
                       "--seed", str(seed), *common, *rewards[arm], "--output-dir", str(run_dir)])
            results["seeds"][seed][arm] = {**windows(run_dir), **evaluate(run_dir, run_dir)}
    run_dirs = [(seed, arm) for seed in seeds for arm in ARMS]
    run([sys.executable, "tools/plot.py", "curves", *(str(out / f"seed{s}" / arm) for s, arm in run_dirs),
         "--labels", *(f"{arm} reward, seed {s}" for s, arm in run_dirs),
         "--panels", "length", "truncation", "accuracy", "reward", "--smooth", "5", "--columns", "2",
         "--out", args.figure])

    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    wall, peak = sum(timings.values()), peak_rss_gb(out)
    results |= {"steps": steps, "max_len": max_len, "measure_max_tokens": cap,
                "cosine_correct": args.cosine_correct,
                "cosine_wrong": args.cosine_wrong, "timings_s": timings, "wall_s_all_steps": wall,
                "wall_s_this_call": time.time() - started, "peak_rss_gb": peak, "figure": args.figure,
                "smoke": args.smoke}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nthe SFT model, greedy, first {kinds} train problems of each kind, at most {cap} tokens:")
    for kind, f in results["sft_lengths"].items():
        print(f"  {kind}: mean length {f['mean_length']:.1f} tokens, "
              f"{100 * f['longer_than_limit']:.0f}% longer than {max_len}, pass@1 {100 * f['pass@1']:.1f}%")
    runs = list(results["seeds"].values())
    print(f"\nseeds {args.seeds}; {steps} steps of {prompts} x {generations} on all `linear` train problems "
          f"at most {max_len} tokens; held-out: {limit or 200} test problems at {max_len} tokens; mean ± "
          f"standard error over seeds; lengths in tokens, fractions in %; sampled = {samples} at "
          f"temperature 1\n")
    print("| reward | length, first 10 steps | length, last 10 | truncated, first 10 | truncated, last 10 | "
          "train accuracy, last 10 | groups with signal / step | greedy pass@1 | sampled pass@1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| (SFT model, no RL) | - | - | - | - | - | - | {cell([results['sft']['greedy']])} | "
          f"{cell([results['sft']['sampled']])} |")
    for arm in ARMS:
        f = [r[arm] for r in runs]
        columns = [cell([x[key] for x in f], 1.0) for key in ("length_first", "length_last")]
        fractions = ("truncated_first", "truncated_last", "accuracy_last")
        columns += [cell([x[key] for x in f]) for key in fractions]
        columns += [cell([x["groups_with_signal"] for x in f], 1.0)]
        columns += [cell([x[key] for x in f]) for key in ("greedy", "sampled")]
        print(f"| {arm} | {' | '.join(columns)} |")
    print(f"\nwall time of all steps {wall / 60:.1f} min (this call {(time.time() - started) / 60:.1f} "
          f"min); peak RSS of the largest step {peak:.2f} GB; figure {args.figure}; every number in "
          f"{out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
