"""Evaluate a model on math benchmarks: pass@1, unbiased pass@k, maj@k, response length, truncation.

    python evaluate.py --model Qwen/Qwen2.5-Math-7B --protocol limr --engine vllm --out results/limr.json
    python evaluate.py --model Qwen/Qwen2.5-Math-1.5B --bench math500 aime24 amc23 --n 8 --k 1,8 \
        --temperature 0.6 --engine vllm --tensor-parallel-size 2 --out results/qwen-math.json
    python evaluate.py --model runs/sft-tiny --bench linear --out runs/sft-tiny/eval.json   # CPU

Benchmarks are data.load_problems specs: gsm8k math500 aime24 aime25 amc23 minerva olympiadbench
limo linear, a local file, or name=path for a local copy of a known benchmark. `--protocol NAME`
sets the sampling, prompt and answer extraction a published table was measured with (PROTOCOLS
below); a flag given explicitly overrides it.

Each summary lands in --out (a JSON list, one entry per benchmark) and every completion, with its
extracted answer, verdict and the settings that produced it, in FILE.samples.jsonl beside it.
Rerunning with the same --out resumes: problems already in the samples file are not generated
again. A torn last line (a run killed mid-write, a full disk) is dropped and its problem redone;
records made with other settings (model, n, temperature, top_p, max tokens, template, ...) stop
the run with an error naming the difference, so old completions never pass under a new name.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import data
from mathrl import distributed, models
from mathrl.engine import Sampling, make_engine
from mathrl.grader import Grader, extract_answer, is_equiv

BENCHMARKS = ["gsm8k", "math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench", "limo", "linear"]
SINGLE_SPLIT = {"limo": "train"}  # the training sets evaluated as benchmarks have only a train split
# Completions per generate call: large, so vLLM schedules a whole benchmark (MATH-500 x 8) at once;
# a killed run loses at most one chunk.
CHUNK_COMPLETIONS = 4096
DEFAULTS = dict(n=1, temperature=0.0, top_p=1.0, max_tokens=2048, template="auto")

# ----------------------------------------------------------------------------------------------
# Evaluation protocols: the settings under which each published table was measured, read from the
# code that produced it. `per_bench` settings override `all`; a benchmark a per-bench protocol does
# not list needs --n and --temperature. `fallback`: where the answer comes from when the grader's
# extraction finds none (no box, no "the answer is"): "answer-line" (a last "Answer: X" line) and/or
# "last-number". Grading itself is always grader.is_equiv, not each paper's own checker.
PROTOCOLS = {
    # GAIR-NLP/LIMR @98ebf1b, eval/: LIMR's main table, readme.md:46-52 (AIME24, MATH500, AMC23)
    "limr": dict(
        bench=["aime24", "math500", "amc23"],                       # eval/eval.py:41-42
        all=dict(template="qwen-math",                              # eval/eval.py:23: system prompt, question
                 top_p=0.95, max_tokens=3072),                      # eval/eval.py:55
        per_bench={"aime24": dict(n=4, temperature=0.4),            # eval/config.json:2-5
                   "amc23": dict(n=4, temperature=0.4),             # eval/config.json:6-9
                   "math500": dict(n=1, temperature=0.0)},          # eval/config.json:10-13
        fallback=()),                                               # eval/eval.py:33-35: the last \boxed only
    # knoveleng/open-rs @2889c47 via lighteval @ed08481 (pinned in open-rs setup.py:58): Open-RS's main table
    "open-rs": dict(
        bench=["aime24", "math500", "amc23", "minerva", "olympiadbench"],  # evaluate.py:142-241; eval.sh:7
        all=dict(template="lighteval-math",     # open-rs evaluate.py:34-38, 83; eval.sh:96 chat template,
                                                # no --system-prompt (lighteval prompt_manager.py:265-276)
                 n=1,                           # lighteval lighteval_task.py:211-218, vllm_model.py:256
                 temperature=0.6, top_p=0.95, max_tokens=32768),    # open-rs eval.sh:4
        max_model_len=32768,                                        # open-rs eval.sh:4 max_model_length
        # math-verify through lighteval: "Answer:" matches (priority 100-200), then bare numbers (300),
        # rightmost first (lighteval extractive_match_utils.py:147-157, 549-570)
        fallback=("answer-line", "last-number")),
    # rqzhangberkeley/efficient-reasoning @f36bf77 (GRPO on LIMO's 817 with Qwen2.5-Math-1.5B):
    # README tables AIME2024 (pass@10) and MATH500 (pass@8). Its first commit (8bc97d2,
    # evaluate_model.py:36-48) had n = 10/3/1 for AIME/MATH500/GSM8K; the tables were made with these.
    "qwen-baselines": dict(
        bench=["aime24", "math500"],
        all=dict(template="question",                               # evaluate_model.py:130-133
                 temperature=0.6,                                   # evaluate_model.py:221, 228, 235, 242
                 top_p=1.0,                                         # evaluate_model.py:138-142: vLLM default
                 max_tokens=32768),                                 # evaluate_model.py:181 --tok_limit
        per_bench={"aime24": dict(n=10),                            # evaluate_model.py:219
                   "math500": dict(n=8),                            # evaluate_model.py:226
                   "gsm8k": dict(n=8),                              # evaluate_model.py:233
                   "limo": dict(n=8)},                              # evaluate_model.py:240
        fallback=("last-number",)),     # utils/utils.py:17-19 -> Qwen's parser, utils/parser.py:499, 538
    # QwenLM/Qwen2.5-Math @a45202b, evaluation/: the Qwen2.5-Math-Instruct tables (their MATH is the
    # full 5,000-problem test set, not MATH-500)
    "qwen-math": dict(
        bench=["gsm8k", "minerva", "olympiadbench", "aime24", "amc23"],     # sh/eval.sh:11, 95
        all=dict(template="qwen-math",                              # utils.py:141-147 qwen25-math-cot
                 n=1, temperature=0.0, top_p=1.0,                   # sh/eval.sh:21-23
                 max_tokens=2048),                                  # math_eval.py:36 (eval.sh leaves it)
        fallback=("last-number",)),                                 # parser.py:537-544
}

ANSWER_LINE = re.compile(r"^[ \t*#]*answer[ \t*]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
LAST_NUMBER = re.compile(r"-?\d*\.?\d+")  # Qwen2.5-Math evaluation/parser.py:539, commas removed first


def fallback_answer(text: str, rules) -> str | None:
    """The answer a protocol's extraction takes when the completion has none the grader reads."""
    for rule in rules:
        if rule == "answer-line":
            lines = [line.strip("$. ") for line in ANSWER_LINE.findall(text) if line.strip("$. ")]
            if lines:
                return lines[-1]
        elif rule == "last-number":
            numbers = LAST_NUMBER.findall(text.replace(",", ""))
            if numbers:
                return numbers[-1]
    return None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# maj@k as Qwen2.5-Math's evaluation computes it (QwenLM/Qwen2.5-Math @a45202b, evaluation/rm_maj_eval.py):
# the first k answers of a problem vote (:83), the largest group of equal answers wins, on a tie the
# group seen first (:22-23 Counter.most_common; :45 a stable sort), and the problem counts as correct
# if the first member of that group was graded correct (:84-85). Answers are grouped as its
# use_symbol=True branch does (:29-43): each joins the first group whose first member it equals, here
# by grader.is_equiv. (Its maj@k call passes use_symbol=False, :83: exact strings after its
# normalisation; equivalence also merges "0.5" with "\frac{1}{2}".)

def vote_clusters(answers: list[str | None]) -> list[int]:
    """For each sample, the index of the first sample of its cluster of equivalent answers.

    A sample joins the first cluster whose first member it is equivalent to (grader.is_equiv, the
    same judge as the verdicts), else founds a new one. Samples with no answer (None) form one
    cluster of their own, as Qwen's parser returns "" for them and "" votes like any answer
    (evaluation/parser.py:544-546); that cluster can win the vote, and is never correct.
    Processing in order means the clusters of the first k samples are a prefix of these, so one
    pass serves every k.
    """
    founders, founder_of_text, firsts = [], {}, []  # firsts: each cluster's first sample, in order
    for i, answer in enumerate(answers):
        if answer in founder_of_text:  # a repeat of a text seen before: no comparison needed
            founders.append(founder_of_text[answer])
            continue
        founder = next((first for first in firsts if answer is not None and answers[first] is not None
                        and is_equiv(answer, answers[first])), i)
        if founder == i:
            firsts.append(i)
        founder_of_text[answer] = founder
        founders.append(founder)
    return founders


def majority_is_correct(founders: list[int], correct: list[bool], k: int) -> bool:
    """maj@k of one problem: is the most common cluster among the first k samples correct?"""
    # Counter keeps first-seen order and most_common is stable, so a tie goes to the cluster whose
    # first member comes first (Qwen's rm_maj_eval.py:23, the same call)
    winner = Counter(founders[:k]).most_common(1)[0][0]
    return correct[winner]


def summarize(records: list[dict], ks: list[int]) -> dict:
    """Benchmark metrics from per-problem records (each has n samples, their answers and verdicts).

    pass@1 is the mean verdict over all samples; pass@1(first) counts the first sample of each
    problem only (what some papers call pass@1); pass@k and maj@k for each k > 1 in `ks`.
    """
    summary = {"n_problems": len(records), "n_samples": min(len(r["correct"]) for r in records),
               "pass@1": _mean(sum(r["correct"]) / len(r["correct"]) for r in records),
               "pass@1(first)": _mean(r["correct"][0] for r in records)}
    vote_ks = [k for k in ks if k > 1]  # maj@1 is pass@1(first)
    for k in vote_ks:
        summary[f"pass@{k}"] = _mean(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records)
    if vote_ks:  # cluster each problem's answers once, for every k
        founders = [vote_clusters(r["extracted"][:max(vote_ks)]) for r in records]
        for k in vote_ks:
            summary[f"maj@{k}"] = _mean(majority_is_correct(f, r["correct"], k)
                                        for f, r in zip(founders, records))
    summary["mean_response_tokens"] = _mean(n for r in records for n in r["num_tokens"])
    summary["truncated_frac"] = _mean(reason == "length" for r in records for reason in r["finish_reasons"])
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def evaluate_problems(engine, problems, tokenizer, sampling: Sampling, template: str, grader, dist,
                      done_ids=frozenset(), on_chunk=None, fallback=()):
    """Generate, extract, grade. Problems are split across ranks and gathered on every rank.

    Returns one record per problem not in `done_ids`; `on_chunk(records)` sees them as they finish
    (so a killed run keeps what it had). `fallback`: a protocol's rules for completions with no
    answer the grader can extract (see PROTOCOLS).
    """
    todo = [p for p in problems if p["id"] not in done_ids]
    chunk_size = max(1, CHUNK_COMPLETIONS // sampling.n)
    records = []
    progress = tqdm(total=len(todo), disable=not dist.is_main, desc="eval", unit="problem")
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start:start + chunk_size]
        mine = chunk[dist.rank::dist.world_size]
        prompts = [data.format_prompt(p["prompt"], tokenizer, template) for p in mine]
        outputs = engine.generate(prompts, sampling) if mine else []
        texts = [c.text for completions in outputs for c in completions]
        golds = [p["answer"] for p, completions in zip(mine, outputs) for _ in completions]
        extracted = [extract_answer(text) for text in texts]
        graded = list(texts)
        for i, answer in enumerate(extracted):
            if answer is None and fallback:
                extracted[i] = fallback_answer(texts[i], fallback)
                graded[i] = texts[i] if extracted[i] is None else f"\\boxed{{{extracted[i]}}}"
        verdicts = grader.correct(graded, golds)
        mine_records, cursor = [], 0
        for problem, completions in zip(mine, outputs):
            end = cursor + len(completions)
            mine_records.append({
                "id": problem["id"], "answer": problem["answer"],
                "completions": [c.text for c in completions], "extracted": extracted[cursor:end],
                "correct": [bool(v) for v in verdicts[cursor:end]],
                "num_tokens": [len(c.token_ids) for c in completions],
                "finish_reasons": [c.finish_reason for c in completions]})
            cursor = end
        gathered = [r for part in distributed.all_gather_objects(mine_records, dist) for r in part]
        records += gathered
        if on_chunk is not None:
            on_chunk(gathered)
        progress.update(len(chunk))
    progress.close()
    return records


# ----------------------------------------------------------------------------------------------
# Resume: the samples file of an earlier run with the same --out.

def read_samples(path: Path, is_main: bool) -> list[dict]:
    """The records in `path`. A last line that does not parse is the torn tail of a run that died
    mid-write: it is dropped (and cut from the file, so new records start on a line of their own).
    A bad line before the end means the file is not one evaluate.py wrote: an error."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, kept = [], 0  # kept: bytes of the whole, parsed lines
    for number, line in enumerate(lines, 1):
        ends_in_newline = number < len(lines)
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            if any(rest.strip() for rest in lines[number:]):
                raise SystemExit(f"error: {path} line {number} is not JSON, and lines follow it: this is not "
                                 f"a samples file evaluate.py wrote; move it away or use another --out")
            if is_main:
                print(f"evaluate: dropping the torn last line {number} of {path}; its problem is redone")
            break
        if record is not None:
            if not isinstance(record, dict):
                raise SystemExit(f"error: {path} line {number} is not a record evaluate.py wrote")
            missing = sorted({"bench", "id", "correct", "extracted"} - set(record))
            if missing:  # every evaluate.py wrote all four; maj@k votes with "extracted"
                raise SystemExit(f"error: {path} line {number} is not a record evaluate.py wrote "
                                 f"(it lacks {', '.join(missing)})")
            records.append(record)
        kept += len(line) + ends_in_newline
    if is_main and (kept < len(raw) or not raw.endswith(b"\n")) and raw:
        with open(path, "r+b") as f:
            f.truncate(kept)
            if kept and not raw[:kept].endswith(b"\n"):
                f.seek(kept)
                f.write(b"\n")
    return records


def check_same_settings(records: list[dict], produced_by: dict, path: Path):
    """Records of a benchmark evaluated now must come from the settings used now."""
    for record in records:
        want = produced_by.get(record["bench"])
        have = record.get("produced_by")
        if want is not None and have is None:
            raise SystemExit(f"error: {path} was written by an older evaluate.py that did not record its "
                             f"settings; use another --out or delete that file")
        if want is not None and have != want:
            key = next(k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k))
            raise SystemExit(f"error: {path} holds {record['bench']} completions made with {key}="
                             f"{have.get(key)!r}, this run has {key}={want.get(key)!r}; use another --out "
                             f"or delete that file")


# ----------------------------------------------------------------------------------------------
# Flags. Sampling flags default to None so that a protocol can tell explicit flags from defaults.

def _k_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = lambda message: sys.exit(f"evaluate.py: error: {message}")  # one line, without the usage block
    p.add_argument("--model", required=True, help="hub id, local save_pretrained folder, or .gguf file")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="the settings of a published table (PROTOCOLS in evaluate.py); flags override them")
    p.add_argument("--bench", nargs="+", help=f"one or more of {' '.join(BENCHMARKS)}, a local file, or "
                                              f"name=path (default: the protocol's benchmarks)")
    p.add_argument("--split", default="test", help="split to evaluate (single-split sets use their only one)")
    p.add_argument("--n", type=int, help="samples per problem (default 1)")
    p.add_argument("--k", type=_k_list, default=[1],
                   help="comma list of k, each <= n (default 1): unbiased pass@k and, for k > 1, maj@k "
                        "(majority vote of the first k samples' answers)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1)")
    p.add_argument("--max-tokens", type=int, help="max new tokens per completion (default 2048)")
    p.add_argument("--template", choices=data.TEMPLATES, help="prompt template (default auto)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems of each bench")
    p.add_argument("--engine", choices=["hf", "vllm"], default="vllm",
                   help="generation backend (default vllm, as the trainers'; hf for a GGUF file, or to generate with "
                        "the training code's own model)")
    p.add_argument("--batch-size", type=int, default=64, help="hf engine: prompts per batch (default 64)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="weights' dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16", help="--dtype bfloat16")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vllm: GPUs one model is sharded over (one process; use torchrun for data parallel)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm: fraction of GPU memory")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="vllm: prompt + completion tokens (default: the protocol's, else the longest prompt "
                        "+ --max-tokens, at most the model's)")
    p.add_argument("--vllm-cpu-kv-cache-gb", type=float, default=None,
                   help="vllm on CPU: the KV cache, GiB (default: enough for one generate call's sequences "
                        "at full length, at most half the free RAM)")
    p.add_argument("--rope-theta", type=float, default=0.0,
                   help="override the model's RoPE base (0: its own), in the HF model and vLLM alike")
    p.add_argument("--max-position-embeddings", type=int, default=0,
                   help="override the model's max_position_embeddings (0: its own), as --rope-theta")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--grader-workers", type=int, default=2, help="processes grading answers (default 2)")
    p.add_argument("--out", default=None,
                   help="summary JSON; completions go to FILE.samples.jsonl beside it. A rerun resumes from "
                        "that file; if it holds completions made with other settings, the run stops with an "
                        "error (it never mixes them or overwrites them)")
    args = p.parse_args(argv)
    if args.bench is None and args.protocol is None:
        p.error("--bench is required (or --protocol, which names its benchmarks)")
    args.bench = args.bench or PROTOCOLS[args.protocol]["bench"]
    if len(set(args.bench)) < len(args.bench):
        p.error(f"--bench names a benchmark twice: {' '.join(args.bench)}")
    for flag, value, low in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                             ("--tensor-parallel-size", args.tensor_parallel_size, 1),
                             ("--max-model-len", args.max_model_len, 1),
                             ("--grader-workers", args.grader_workers, 1)):
        if value is not None and value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.seed < 2 ** 32:  # numpy's seed range
        p.error(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.rope_theta < 0 or args.max_position_embeddings < 0:
        p.error("--rope-theta and --max-position-embeddings must be >= 0 (0: the model's own)")
    if not 0 < args.gpu_memory_utilization <= 1:
        p.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.vllm_cpu_kv_cache_gb is not None and not 0 < args.vllm_cpu_kv_cache_gb < math.inf:
        p.error(f"--vllm-cpu-kv-cache-gb must be a positive number of GiB, got {args.vllm_cpu_kv_cache_gb}")
    if args.engine == "vllm" and args.model.endswith(".gguf"):
        p.error(f"--model: a GGUF file loads with --engine hf; for vLLM make a model folder first: "
                f"python tools/model_folder.py {args.model} FOLDER")
    one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1  # torchrun runs one engine per GPU instead
    if args.tensor_parallel_size > 1 and (args.engine != "vllm" or not one_process):
        p.error("--tensor-parallel-size > 1 needs --engine vllm in one process, not under torchrun")
    if args.out and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a directory; give a file name such as {Path(args.out) / 'eval.json'}")
    args.settings = {spec: bench_settings(args, spec, p) for spec in args.bench}
    return args


def bench_settings(args, spec: str, p) -> dict:
    """Sampling and prompt settings of one benchmark: explicit flag > protocol > default."""
    settings = dict(DEFAULTS)
    name = spec.split("=", 1)[0]
    if args.protocol:
        protocol = PROTOCOLS[args.protocol]
        settings.update(protocol["all"])
        per_bench = protocol.get("per_bench")
        if per_bench and name in per_bench:
            settings.update(per_bench[name])
        elif per_bench and (args.n is None or args.temperature is None):
            p.error(f"--protocol {args.protocol} sets n and temperature for {', '.join(per_bench)} only; "
                    f"give --n and --temperature for --bench {spec}")
    explicit = {"n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                "max_tokens": args.max_tokens, "template": args.template}
    settings.update({key: value for key, value in explicit.items() if value is not None})
    if settings["n"] < 1 or settings["max_tokens"] < 1:
        p.error(f"--n and --max-tokens must be at least 1, got {settings['n']} and {settings['max_tokens']}")
    if not settings["temperature"] >= 0 or not 0 < settings["top_p"] <= 1:  # `not >=` also refuses NaN
        p.error(f"need --temperature >= 0 and 0 < --top-p <= 1, "
                f"got {settings['temperature']} and {settings['top_p']}")
    if any(not 1 <= k <= settings["n"] for k in args.k):
        p.error(f"every k in --k must be between 1 and n ({settings['n']} for {spec}), got {args.k}")
    if settings["n"] > 1 and settings["temperature"] == 0:  # n greedy copies of one completion; vLLM refuses it
        p.error(f"--n {settings['n']} at temperature 0 ({spec}) would repeat one greedy completion: "
                f"give --temperature > 0, or --n 1")
    return settings


def resolve_dtype(dtype: str) -> str:
    """bf16 on CUDA: half the memory and vLLM's fast attention kernels; fp32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    return dtype


def markdown_table(summaries: list[dict], ks: list[int]) -> str:
    columns = ["bench", "n_problems", "n_samples", "pass@1", "pass@1(first)"] + \
              [f"pass@{k}" for k in ks if k > 1] + [f"maj@{k}" for k in ks if k > 1] + \
              ["mean_response_tokens", "truncated_frac"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summaries:
        cells = [f"{s[c]:.1f}" if c == "mean_response_tokens" else f"{s[c]:.3f}" if isinstance(s[c], float)
                 else str(s[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_engine(args, model, tokenizer, dist, dtype: str, max_model_len: int | None, benches: dict):
    """The engine the flags ask for, vLLM sized from the work (tools/bench/eval_speed.py times this
    very one): sequences as long as the longest prompt + its --max-tokens (unless --max-model-len or
    the protocol sets the length), as many at once as one generate call holds on this rank (a chunk
    of CHUNK_COMPLETIONS), and on CPU a KV cache that holds all of them (--vllm-cpu-kv-cache-gb)."""
    if args.engine != "vllm":
        return make_engine(args.engine, model, tokenizer, args.model, dist, batch_size=args.batch_size)
    longest, sequences = 1, 1
    for spec, problems in benches.items():
        settings = args.settings[spec]
        prompts = [data.format_prompt(p["prompt"], tokenizer, settings["template"]) for p in problems]
        longest = max(longest, settings["max_tokens"] + max(
            len(tokenizer(prompt, add_special_tokens=False).input_ids) for prompt in prompts))
        chunk = min(len(problems), max(1, CHUNK_COMPLETIONS // settings["n"]))  # evaluate_problems' chunks
        sequences = max(sequences, math.ceil(chunk / dist.world_size) * settings["n"])
    kv_gb = args.vllm_cpu_kv_cache_gb
    overrides = {}
    if args.rope_theta or args.max_position_embeddings:  # as models.load_model would build it
        from transformers import AutoConfig

        try:
            overrides = models.config_overrides(AutoConfig.from_pretrained(args.model), args.rope_theta,
                                                args.max_position_embeddings)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    return make_engine("vllm", model, tokenizer, args.model, dist, dtype=dtype,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       max_model_len=max_model_len or longest, max_num_seqs=sequences,
                       kv_cache_memory_bytes=int(kv_gb * 2**30) if kv_gb else None,
                       tensor_parallel_size=args.tensor_parallel_size, hf_overrides=overrides)


def main(argv=None):
    args = parse_args(argv)
    dtype = resolve_dtype(args.dtype)
    protocol = PROTOCOLS.get(args.protocol, {})
    fallback = protocol.get("fallback", ())
    max_model_len = args.max_model_len or protocol.get("max_model_len")
    dist = distributed.init_distributed()
    distributed.seed_everything(args.seed)

    # data, model path and earlier samples first: bad input fails here, before the model loads
    benches = {}
    for spec in args.bench:
        benches[spec] = data.load_problems(spec, split=SINGLE_SPLIT.get(spec, args.split), limit=args.limit)
        if not benches[spec]:
            raise SystemExit(f"error: --bench {spec} has no problems (an empty file, or --limit 0)")
    models.check_model_path(args.model)
    produced_by = {spec: {"model": args.model, "split": SINGLE_SPLIT.get(spec, args.split), "seed": args.seed,
                          "dtype": dtype, "fallback": list(fallback), "engine": args.engine,
                          "max_model_len": max_model_len, **args.settings[spec],
                          **({"rope_theta": args.rope_theta} if args.rope_theta else {}),
                          **({"max_position_embeddings": args.max_position_embeddings}
                             if args.max_position_embeddings else {})}
                   for spec in benches}
    samples_path = Path(args.out).with_suffix(".samples.jsonl") if args.out else None
    done = {}  # (bench, id) -> record, from an earlier run with the same --out
    if samples_path is not None:
        records = read_samples(samples_path, dist.is_main)
        check_same_settings(records, produced_by, samples_path)
        done = {(r["bench"], r["id"]): r for r in records}

    tokenizer = models.load_tokenizer(args.model)
    for spec in benches:  # a chat template the tokenizer lacks fails now, not after the weights load
        try:
            data.format_prompt("1 + 1", tokenizer, args.settings[spec]["template"])
        except ValueError as error:
            raise SystemExit(f"error: --template: {error}")
    model = None
    if args.engine == "hf":  # vLLM loads the weights itself
        model = models.load_model(args.model, dtype=getattr(torch, dtype), rope_theta=args.rope_theta,
                                  max_positions=args.max_position_embeddings).to(dist.device).eval()
    engine = build_engine(args, model, tokenizer, dist, dtype, max_model_len, benches)
    distributed.seed_per_rank(args.seed, dist)  # each rank samples its share from its own stream

    summaries = []
    with Grader(num_workers=args.grader_workers) as grader:
        for spec, problems in benches.items():
            settings = args.settings[spec]

            def append(records, spec=spec):
                if samples_path is not None and dist.is_main:
                    samples_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(samples_path, "a") as f:
                        for r in records:
                            f.write(json.dumps({"bench": spec, **r, "produced_by": produced_by[spec]}) + "\n")

            started = time.time()
            done_ids = {pid for (bench, pid) in done if bench == spec}
            sampling = Sampling(n=settings["n"], temperature=settings["temperature"], top_p=settings["top_p"],
                                logprobs=False,  # grading needs the text only
                                max_new_tokens=settings["max_tokens"])
            records = evaluate_problems(engine, problems, tokenizer, sampling, settings["template"], grader,
                                        dist, done_ids=done_ids, on_chunk=append, fallback=fallback)
            records += [done[(spec, p["id"])] for p in problems if p["id"] in done_ids]
            summaries.append({"model": args.model, "bench": spec, **summarize(records, args.k),
                              "sampling": {**produced_by[spec], "protocol": args.protocol},
                              "seconds": round(time.time() - started, 1)})

    if dist.is_main:
        print(markdown_table(summaries, args.k))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summaries, indent=2) + "\n")
            print(f"evaluate: summary in {args.out}, completions in {samples_path}")
    engine.close()  # vLLM's teardown needs the process group that distributed.shutdown destroys
    distributed.shutdown(dist)
    return summaries


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad data is the user's to fix: one line, no traceback
        raise SystemExit(f"error: {error}")
