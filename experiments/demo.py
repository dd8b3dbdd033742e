"""The CPU experiment, end to end: does RL improve on SFT for a tiny model on linear equations?

    .venv/bin/python experiments/demo.py           # 10 minutes on 2 idle CPU cores (measured; 11 with --with-ppo)

1. baseline: a fresh ~1M-parameter Qwen2 model with a character tokenizer (it knows nothing)
2. sft.py --preset tiny: supervised fine-tuning on worked solutions of `linear` train problems
3. grpo.py --preset tiny: GRPO from the SFT model, rewarded only for the right final answer, on
   the RL pool: 512 one-unknown train problems (and with --with-ppo, ppo.py --preset tiny from the
   same SFT model on the same pool: about 2 more minutes; with --lora-rank R, GRPO again with LoRA
   adapters of rank R on the 7 projections, the base frozen, at --lora-lr). The SFT model solves 1-2% of the
   two-unknown systems, so their groups are almost all-wrong and carry no advantage; experiments/dynamic_sampling.py
   measures GRPO over all train problems against this pool (docs/experiments.md, "DAPO's dynamic sampling").
4. evaluate.py on the 200 held-out `linear` test problems: greedy pass@1, and pass@1 / pass@8
   from 8 samples at temperature 1; under the table, each RL model against SFT problem by problem
   (greedy: how many changed each way, the sign test, one- and two-unknown systems apart)
5. tools/plot.py: the RL runs' training curves, written to --figure (docs/figures/demo.png)

Every step is an ordinary command, printed before it runs; rerunning skips finished steps, and
the trainers resume from their last checkpoint if a step was interrupted.
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

from common import run, write_rl_pool  # first: it puts the repository root on sys.path


def evaluate(model_dir: Path, out: Path, sampled: bool):
    if out.exists():
        return
    flags = ["--n", "8", "--k", "1,8", "--temperature", "1.0"] if sampled else []
    run([sys.executable, "evaluate.py", "--engine", "hf", "--model", str(model_dir), "--bench", "linear",
         "--template", "plain", "--max-tokens", "192", *flags, "--out", str(out)])


def greedy_verdicts(model_dir: Path) -> dict:
    """{problem id: (answer, right or wrong)} from the greedy evaluation's samples file."""
    rows = [json.loads(line) for line in open(model_dir / "eval-greedy.samples.jsonl")]
    return {row["id"]: (row["answer"], row["correct"][0]) for row in rows}


def sign_test(up: int, down: int) -> float:
    """Two-sided exact sign test of `up` against `down` changed problems (ties dropped): the chance,
    were a change equally likely either way, of a split at least this lopsided."""
    n, k = up + down, min(up, down)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def paired_lines(sft: Path, rl_models: list[tuple[str, Path]]) -> list[str]:
    """Per RL model, against SFT on the same greedy test problems: how many changed each way, the sign
    test, and pass@1 on one-unknown (an integer answer) and two-unknown systems before and after."""
    before = greedy_verdicts(sft)
    kinds = {"one-unknown": [i for i, (answer, _) in before.items() if "(" not in answer]}
    kinds["two-unknown"] = [i for i in before if i not in kinds["one-unknown"]]
    share = lambda verdicts, ids: f"{100 * sum(verdicts[i][1] for i in ids) / max(1, len(ids)):.1f}%"
    lines = []
    for name, model_dir in rl_models:
        after = greedy_verdicts(model_dir)
        up = sum(after[i][1] and not right for i, (_, right) in before.items())
        down = sum(right and not after[i][1] for i, (_, right) in before.items())
        lines.append(f"{name} vs SFT, greedy: {up} test problems wrong -> right, {down} right -> wrong "
                     f"(sign test p = {sign_test(up, down):.3f}); " + ", ".join(
                         f"{kind} ({len(ids)}) {share(before, ids)} -> {share(after, ids)}"
                         for kind, ids in kinds.items()))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/demo", help="where models, metrics and results go")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("--with-ppo", action="store_true",
                        help="also run PPO with a critic from the same SFT model")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="also run GRPO with LoRA adapters of this rank from the same SFT model (0: no)")
    parser.add_argument("--lora-lr", type=float, default=5e-4,
                        help="that run's learning rate (the adapters start at zero: ten times the preset's)")
    parser.add_argument("--figure", default="docs/figures/demo.png",
                        help="training curves of the RL runs (tools/plot.py curves), as a PNG")
    args = parser.parse_args()
    if args.lora_rank < 0 or not args.lora_lr > 0:
        raise SystemExit("error: need --lora-rank >= 0 and --lora-lr > 0")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.out_dir)

    base, sft, grpo, ppo = out / "base", out / "sft", out / "grpo", out / "ppo"
    if not (base / "model.safetensors").exists():
        run([sys.executable, "-c", "from mathrl import models; m, t = models.build_tiny_model(seed=0); "
             f"m.save_pretrained({str(base)!r}); t.save_pretrained({str(base)!r})"])
    if not (sft / "model.safetensors").exists():
        run([sys.executable, "sft.py", "--preset", "tiny", "--output-dir", str(sft)])
    pool = write_rl_pool(out / "rl-pool.jsonl")
    if not (grpo / "model.safetensors").exists():
        run([sys.executable, "grpo.py", "--preset", "tiny", "--model", str(sft), "--data", str(pool),
             "--output-dir", str(grpo)])
    models = [("baseline (untrained)", base), ("SFT", sft), ("SFT + GRPO", grpo)]
    if args.with_ppo:
        if not (ppo / "model.safetensors").exists():
            run([sys.executable, "ppo.py", "--preset", "tiny", "--model", str(sft), "--data", str(pool),
                 "--output-dir", str(ppo)])
        models.append(("SFT + PPO", ppo))
    if args.lora_rank:
        lora_run = out / f"grpo-lora{args.lora_rank}"
        if not (lora_run / "model.safetensors").exists():
            run([sys.executable, "grpo.py", "--preset", "tiny", "--model", str(sft), "--data", str(pool),
                 "--lora-rank", str(args.lora_rank), "--lr", str(args.lora_lr), "--output-dir", str(lora_run)])
        models.append((f"SFT + GRPO LoRA r={args.lora_rank}", lora_run))

    rl_runs = [(name, model_dir) for name, model_dir in models if "+" in name]
    run([sys.executable, "tools/plot.py", "curves", *(str(m) for _, m in rl_runs), "--labels",
         *(name.split("+ ")[1] for name, _ in rl_runs), "--panels", "reward", "accuracy", "length", "entropy",
         "grad_norm", "logprob_gap", "--smooth", "10", "--out", args.figure])
    rows = []
    for name, model_dir in models:
        evaluate(model_dir, model_dir / "eval-greedy.json", sampled=False)
        evaluate(model_dir, model_dir / "eval-sampled.json", sampled=True)
        greedy = json.loads((model_dir / "eval-greedy.json").read_text())[0]
        sampled = json.loads((model_dir / "eval-sampled.json").read_text())[0]
        rows.append(f"| {name} | {100 * greedy['pass@1']:.1f} | {100 * sampled['pass@1']:.1f} | "
                    f"{100 * sampled['pass@8']:.1f} | {greedy['mean_response_tokens']:.0f} |")
    print("\nHeld-out `linear` test set (200 problems):\n")
    print("| model | greedy pass@1 (%) | sampled pass@1 (%) | pass@8 (%) | mean response tokens |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n" + "\n".join(paired_lines(sft, rl_runs)))


if __name__ == "__main__":
    main()
