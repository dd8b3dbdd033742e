"""LIMR's experiment in miniature: does training on LIM-selected samples match training on all?

    .venv/bin/python demo_lim.py              # 13-14 minutes on a 2-core CPU (measured), +5 to train SFT
    .venv/bin/python demo_lim.py --seed 1 --out-dir runs/lim-demo-seed1     # the same experiment, another seed

1. start from the tiny SFT model of demo.py (trained here if it is not there yet)
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

Every step is an ordinary command, printed before it runs; rerunning skips what is finished.
One seed per arm per call: differences of a few points are within run-to-run noise, so compare seeds
(two are in the README).
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import lim
from demo import run, write_rl_pool
from grpo import PRESETS

LIMR_KEEP_RATIO = 1389 / 8523


def grpo(model: Path, data_file: Path, out: Path, steps: int, seed: int):
    if not (out / "model.safetensors").exists():
        run([sys.executable, "grpo.py", "--preset", "tiny", "--model", str(model), "--data", str(data_file),
             "--max-steps", str(steps), "--save-steps", str(steps), "--seed", str(seed), "--output-dir", str(out)])


def select(out: Path, pool: Path, name: str, method: str, threshold: float, seed: int) -> Path:
    subset = out / f"{name}.jsonl"
    if not subset.exists():
        run([sys.executable, "lim.py", "--trajectories", str(out / "full" / "trajectories.jsonl"), "--data", str(pool),
             "--method", method, "--threshold", str(threshold), "--out", str(subset),
             "--scores", str(out / f"{name}-scores.jsonl"), "--seed", str(seed)])
    return subset


def pass_at_1(model: Path, results: Path) -> tuple[float, float]:
    figures = []
    results.mkdir(parents=True, exist_ok=True)
    for name, extra in (("greedy", []), ("sampled", ["--n", "4", "--temperature", "1.0"])):
        out = results / f"eval-{name}.json"
        if not out.exists():
            run([sys.executable, "evaluate.py", "--model", str(model), "--bench", "linear", "--template", "plain",
                 "--max-tokens", "192", "--out", str(out), *extra])
        figures.append(json.loads(out.read_text())[0]["pass@1"])
    return figures[0], figures[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/lim-demo", help="where runs and results go")
    parser.add_argument("--sft", default="runs/demo/sft", help="the tiny SFT model (trained by sft.py if absent)")
    parser.add_argument("--pool", type=int, default=512, help="one-unknown linear training problems in the pool")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the full-pool run (which records trajectories)")
    parser.add_argument("--threshold", type=float, default=0.6, help="LIM score threshold")
    parser.add_argument("--seed", type=int, default=0, help="every GRPO run's data order and sampling, and RAND's draw")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out, sft = Path(args.out_dir), Path(args.sft)
    out.mkdir(parents=True, exist_ok=True)

    if not (sft / "model.safetensors").exists():
        run([sys.executable, "sft.py", "--preset", "tiny", "--output-dir", str(sft)])
    pool = write_rl_pool(out / "pool.jsonl", args.pool)
    steps = math.ceil(args.epochs * args.pool / PRESETS["tiny"]["prompts_per_step"])
    grpo(sft, pool, out / "full", steps, args.seed)

    subsets = {"LIM": select(out, pool, "lim", "lim", args.threshold, args.seed)}
    scores = sorted((json.loads(line)["score"] for line in open(out / "lim-scores.jsonl")), reverse=True)
    top_sixth = scores[max(0, round(LIMR_KEEP_RATIO * len(scores)) - 1)]
    subsets["LIM, top 16%"] = select(out, pool, "lim-top", "lim", top_sixth, args.seed)
    subsets["RAND"] = select(out, pool, "rand", "rand", top_sixth, args.seed)  # as many as LIM's top 16%
    subsets["LINEAR"] = select(out, pool, "linear", "linear", lim.PAPER_THRESHOLDS["linear"], args.seed)

    greedy, sampled = pass_at_1(sft, out / "sft")  # its figures under the same evaluation, kept beside the others
    rows = [f"| SFT model (no RL) | - | - | 0 | {100 * greedy:.1f} | {100 * sampled:.1f} |"]
    for name, subset in [("full pool", pool), *subsets.items()]:
        run_dir = out / ("full" if subset == pool else subset.stem)
        grpo(sft, subset, run_dir, steps, args.seed)
        greedy, sampled = pass_at_1(run_dir, run_dir)
        rule = {"LIM": f"score >= {args.threshold}", "RAND": "random, as many as LIM top 16%", "LINEAR": f"score >= {lim.PAPER_THRESHOLDS['linear']}",
                "LIM, top 16%": f"score >= {top_sixth:.3f}"}.get(name, "-")
        rows.append(f"| {name} | {rule} | {sum(1 for _ in open(subset))} | {steps} | {100 * greedy:.1f} | {100 * sampled:.1f} |")
    print("\nheld-out: the 200 `linear` test problems; sampled = 4 samples per problem at temperature 1\n")
    print("| GRPO trained on | selection | problems | steps | greedy pass@1 (%) | sampled pass@1 (%) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
