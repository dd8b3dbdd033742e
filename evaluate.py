"""Evaluate a model on math benchmarks: pass@1, unbiased pass@k, response length, truncation.

    python evaluate.py --model Qwen/Qwen2.5-Math-1.5B --bench math500 aime24 amc23 --n 8 --k 1,8 \
        --temperature 0.6 --engine vllm --out results/qwen-math.json
    python evaluate.py --model runs/sft-tiny --bench linear --out runs/sft-tiny/eval.json   # CPU

Benchmarks are data.load_problems specs: gsm8k math500 aime24 aime25 amc23 minerva olympiadbench
limo linear, a local file, or name=path for a local copy of a known benchmark. Each summary lands in
--out (a JSON list, one entry per benchmark) and every completion, with its extracted answer and
verdict, in the JSONL beside it; rerunning with the same --out skips the problems already there.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import rewards
import training
from engine import Sampling, make_engine

BENCHMARKS = ["gsm8k", "math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "limo", "linear"]
SINGLE_SPLIT = {"limo": "train"}  # the training sets evaluated as benchmarks have only a train split


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records: list[dict], ks: list[int]) -> dict:
    """Benchmark metrics from per-problem records (each has n samples and their verdicts)."""
    n_samples = [len(r["correct"]) for r in records]
    summary = {"n_problems": len(records), "n_samples": min(n_samples, default=0),
               "pass@1": _mean([sum(r["correct"]) / len(r["correct"]) for r in records])}
    for k in ks:
        if k > 1:
            summary[f"pass@{k}"] = _mean([pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records])
    lengths = [n for r in records for n in r["num_tokens"]]
    summary["mean_response_tokens"] = _mean(lengths)
    summary["truncated_frac"] = _mean([reason == "length" for r in records for reason in r["finish_reasons"]])
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def evaluate_problems(engine, problems, tokenizer, sampling: Sampling, template: str, grader, d,
                      done_ids=frozenset(), chunk_size: int = 64, on_chunk=None):
    """Generate, extract, grade. Problems are split across ranks and gathered on every rank.

    Returns one record per problem not in `done_ids`; `on_chunk(records)` sees them as they finish
    (so a killed run keeps what it had).
    """
    todo = [p for p in problems if p["id"] not in done_ids]
    records = []
    progress = tqdm(total=len(todo), disable=not d.is_main, desc="eval", unit="problem")
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start:start + chunk_size]
        mine = chunk[d.rank::d.world_size]
        prompts = [data.format_prompt(p["prompt"], tokenizer, template) for p in mine]
        outputs = engine.generate(prompts, sampling) if mine else []
        texts = [c.text for completions in outputs for c in completions]
        golds = [p["answer"] for p, completions in zip(mine, outputs) for _ in completions]
        verdicts = grader.correct(texts, golds)
        mine_records, cursor = [], 0
        for problem, completions in zip(mine, outputs):
            mine_records.append({
                "id": problem["id"], "answer": problem["answer"],
                "completions": [c.text for c in completions],
                "extracted": [rewards.extract_answer(c.text) for c in completions],
                "correct": [bool(v) for v in verdicts[cursor:cursor + len(completions)]],
                "num_tokens": [len(c.token_ids) for c in completions],
                "finish_reasons": [c.finish_reason for c in completions]})
            cursor += len(completions)
        gathered = [r for part in training.all_gather_objects(mine_records, d) for r in part]
        records += gathered
        if on_chunk is not None:
            on_chunk(gathered)
        progress.update(len(chunk))
    progress.close()
    return records


def markdown_table(summaries: list[dict], ks: list[int]) -> str:
    columns = ["bench", "n_problems", "n_samples", "pass@1"] + [f"pass@{k}" for k in ks if k > 1] + \
              ["mean_response_tokens", "truncated_frac"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        cells = [f"{s[c]:.1f}" if c == "mean_response_tokens" else f"{s[c]:.3f}" if isinstance(s[c], float)
                 else str(s[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, local save_pretrained folder, or .gguf file")
    p.add_argument("--bench", nargs="+", required=True, help=f"one or more of {' '.join(BENCHMARKS)}, a local file, or name=path")
    p.add_argument("--split", default="test", help="split to evaluate (single-split sets such as limo and aime24 use their only one)")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--k", default="1", help="comma list of k for pass@k (each k <= n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-tokens", type=int, default=2048, help="max new tokens per completion")
    p.add_argument("--template", default="auto", help="prompt template: auto, qwen-math, r1, plain")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each bench")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="generation backend")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation call (hf engine)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of GPU memory")
    p.add_argument("--bf16", action="store_true", help="weights in bf16 (use on GPUs; float32 otherwise)")
    p.add_argument("--max-model-len", type=int, default=None, help="vllm: prompt + completion tokens per sequence (default: the model's limit)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--grader-workers", type=int, default=2, help="processes grading answers (each under a time limit)")
    p.add_argument("--out", default=None, help="summary JSON; per-problem JSONL written beside it (FILE.samples.jsonl)")
    args = p.parse_args(argv)
    args.k = [int(k) for k in args.k.split(",")]
    if any(k > args.n or k < 1 for k in args.k):
        p.error(f"every k in --k must be between 1 and --n ({args.n}), got {args.k}")
    return args


def main(argv=None):
    args = parse_args(argv)
    d = training.init_distributed()
    training.seed_everything(args.seed)

    # data first: a bad file or an unknown name fails here, before the model loads
    benches = {}
    for spec in args.bench:
        split = SINGLE_SPLIT.get(spec, args.split)
        benches[spec] = data.load_problems(spec, split=split, limit=args.limit)
    training.check_model_path(args.model)

    samples_path = Path(args.out).with_suffix(".samples.jsonl") if args.out else None
    done = {}  # (bench, id) -> record, from an earlier run with the same --out
    if samples_path is not None and samples_path.exists():
        for line in samples_path.read_text().splitlines():
            record = json.loads(line)
            done[(record["bench"], record["id"])] = record

    tokenizer = training.load_tokenizer(args.model)
    sampling = Sampling(n=args.n, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_tokens)
    model = None
    if args.engine == "hf":  # vLLM loads the weights itself
        model = training.load_model(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
        model.to(d.device).eval()
    engine = make_engine(args.engine, model, tokenizer, args.model, d, batch_size=args.batch_size,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         dtype="bfloat16" if args.bf16 else "float32", max_model_len=args.max_model_len)

    summaries = []
    with rewards.Grader(num_workers=args.grader_workers) as grader:
        for spec, problems in benches.items():
            def append(records, spec=spec):
                if samples_path is not None and d.is_main:
                    samples_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(samples_path, "a") as f:
                        for r in records:
                            f.write(json.dumps({"bench": spec, **r}) + "\n")

            started = time.time()
            done_ids = {pid for (bench, pid) in done if bench == spec}
            records = evaluate_problems(engine, problems, tokenizer, sampling, args.template, grader, d,
                                        done_ids=done_ids, chunk_size=args.batch_size, on_chunk=append)
            records += [done[(spec, p["id"])] for p in problems if p["id"] in done_ids]
            summary = {"model": args.model, "bench": spec, **summarize(records, args.k),
                       "sampling": {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                                    "max_tokens": args.max_tokens, "template": args.template, "seed": args.seed,
                                    "engine": args.engine},
                       "seconds": round(time.time() - started, 1)}
            summaries.append(summary)

    if d.is_main:
        print(markdown_table(summaries, args.k))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summaries, indent=2) + "\n")
            print(f"evaluate: summary in {args.out}, completions in {samples_path}")
    training.shutdown(d)
    return summaries


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
