"""Speed of grpo.py's tiny preset: seconds per step split into generation / reward / update.

    .venv/bin/python bench/grpo_speed.py --model runs/demo/sft            # both engines
    .venv/bin/python bench/grpo_speed.py --model runs/demo/sft --engines hf --steps 10

Runs `grpo.py --preset tiny` for a few steps with each engine on the same model, prompts and
seed, reads the per-step timings from metrics.jsonl, and prints the medians (the first step is
left out: it pays for warm-up). Without --model it trains nothing and uses a fresh tiny model.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_grpo(model: str, engine: str, steps: int, out: Path, threads: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(ROOT / "grpo.py"), "--preset", "tiny", "--model", model, "--engine", engine,
               "--max-steps", str(steps), "--save-steps", str(10 ** 9), "--output-dir", str(out)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="starting policy (default: a fresh tiny model)")
    parser.add_argument("--engines", default="hf,vllm", help="comma list of engines to time")
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per engine (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for the runs")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = str(Path(scratch) / "tiny")
            sys.path.insert(0, str(ROOT))
            import training

            fresh, tokenizer = training.build_tiny_model(seed=0)
            fresh.save_pretrained(model)
            tokenizer.save_pretrained(model)
        results = {}
        for engine in args.engines.split(","):
            steps = run_grpo(model, engine, args.steps, Path(scratch) / engine, args.threads)[1:]
            median = lambda key: statistics.median(s[key] for s in steps)
            generation, reward, update = median("time/generation"), median("time/reward"), median("time/update")
            results[engine] = {"step_s": generation + reward + update, "generation_s": generation, "reward_s": reward,
                               "update_s": update, "generated_tokens_per_s": median("tokens_per_s"),
                               "response_length_mean": median("response_length_mean"), "steps_timed": len(steps)}

    print(f"grpo.py --preset tiny, model {args.model or 'fresh tiny'}, {args.threads} threads, "
          f"medians over {args.steps - 1} steps\n")
    print("| engine | s/step | generation s | reward s | update s | generated tokens/s | mean response tokens |")
    print("|---|---|---|---|---|---|---|")
    for engine, r in results.items():
        print(f"| {engine} | {r['step_s']:.2f} | {r['generation_s']:.2f} | {r['reward_s']:.3f} | {r['update_s']:.2f} | "
              f"{r['generated_tokens_per_s']:.0f} | {r['response_length_mean']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
