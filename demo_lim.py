"""LIMR's experiment in miniature: does training on LIM-selected samples match training on all?

    .venv/bin/python demo_lim.py              # about 15 minutes (measured at 1 thread, shared CPU)

1. start from the tiny SFT model of demo.py (trained here if it is not there yet)
2. GRPO for several epochs over a pool of `linear` problems, recording for every problem and
   epoch the fraction of its samples that were right (trajectories.jsonl)
3. lim.py scores the pool and keeps the problems whose curve follows the average (threshold 0.6
   as in LIMR, or lower for a pool this small: --threshold); RAND keeps a random subset of the
   same size
4. three fresh GRPO runs from the SFT model for the same number of steps: on the full pool, on
   the LIM subset, on the RAND subset
5. evaluate.py: greedy pass@1 of each on the 200 held-out `linear` test problems

Every step is an ordinary command, printed before it runs; rerunning skips what is finished.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from grpo import PRESETS


def run(command: list[str]):
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def grpo(model: Path, data: str, out: Path, steps: int, extra=()):
    if not (out / "model.safetensors").exists():
        run([sys.executable, "grpo.py", "--preset", "tiny", "--model", str(model), "--data", data,
             "--max-steps", str(steps), "--save-steps", str(steps), "--output-dir", str(out), *extra])


def greedy_pass_at_1(model: Path) -> float:
    out = model / "eval-greedy.json"
    if not out.exists():
        run([sys.executable, "evaluate.py", "--model", str(model), "--bench", "linear", "--template", "plain",
             "--max-tokens", "192", "--out", str(out)])
    return json.loads(out.read_text())[0]["pass@1"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/lim-demo", help="where runs and results go")
    parser.add_argument("--sft", default="runs/demo/sft", help="the tiny SFT model (trained by sft.py if absent)")
    parser.add_argument("--pool", type=int, default=128, help="problems in the pool (sampled from linear train)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the trajectory-recording GRPO run")
    parser.add_argument("--steps", type=int, default=24, help="steps of each of the three comparison runs")
    parser.add_argument("--threshold", type=float, default=0.6, help="LIM score threshold")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out, sft = Path(args.out_dir), Path(args.sft)
    pool = f"linear:{args.pool}"   # a seeded sample of the linear train split

    if not (sft / "model.safetensors").exists():
        run([sys.executable, "sft.py", "--preset", "tiny", "--output-dir", str(sft)])
    prompts_per_step = PRESETS["tiny"]["prompts_per_step"]
    grpo(sft, pool, out / "trajectory-run", args.epochs * args.pool // prompts_per_step)

    subsets = {}
    for method in ("lim", "rand"):
        subset = out / f"{method}.jsonl"
        if not subset.exists():
            run([sys.executable, "lim.py", "--trajectories", str(out / "trajectory-run" / "trajectories.jsonl"),
                 "--data", pool, "--method", method, "--threshold", str(args.threshold), "--out", str(subset),
                 "--scores", str(out / f"{method}-scores.json")])
        subsets[method] = subset

    rows = []
    for name, data in [("full pool", pool), ("LIM subset", str(subsets["lim"])), ("RAND subset", str(subsets["rand"]))]:
        run_dir = out / name.split()[0].lower()
        grpo(sft, data, run_dir, args.steps)
        size = args.pool if data == pool else sum(1 for _ in open(data))
        rows.append(f"| {name} | {size} | {args.steps} | {100 * greedy_pass_at_1(run_dir):.1f} |")
    print(f"\nSFT model before RL: greedy pass@1 {100 * greedy_pass_at_1(sft):.1f}%\n")
    print("| GRPO trained on | problems | steps | held-out greedy pass@1 (%) |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
