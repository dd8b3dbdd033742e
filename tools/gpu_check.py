"""The GPU day: in at most 8 minutes on one H100, what only a GPU can show, written to one file.

    bash tools/gpu_check.sh                                # on the GPU; figures in ${OUT:-runs/gpu-check}
    python tools/gpu_check.py --dry-run --out /tmp/check   # the same code at a tiny size on CPU (the test)

Four parts, in this order; each writes its figures as it ends (so a run cut short keeps the parts done),
and one that fails is recorded and does not stop the others:

  tests     pytest tests/test_gpu.py tests/test_gpu_vllm.py: FSDP2 + NCCL bf16 at world size 1, the NaN
            guard, per-rank CUDA streams, log-prob memory flat in length, update memory flat in
            micro-batches (the vLLM tests skip, with their reason, where vLLM is absent)
  memory    a random model of Qwen2.5-Math-1.5B's published shape (memplan.KNOWN_MODELS; nothing is
            downloaded): one GRPO update at the limo preset's shapes (bf16, gradient checkpointing,
            reference model, AdamW, chunked log-probs, 8 x 4096 tokens a micro-batch) and one SFT step
            of 16,384 tokens, each in one process as the trainers run it (autocast) and under FSDP2 on
            one rank; the peak beside memplan.make_plan's for the same config, and the ratio
  speed     tokens/s and model FLOP utilisation (6 N tokens / time against the GPU's dense bf16 peak)
            of those updates, and the HF engine's generated tokens/s with the same model
  trainers  torchrun --nproc_per_node 1 grpo.py --engine hf --bf16 and sft.py --bf16 on a small random
            model, killed (SIGTERM) after a checkpoint, resumed, the final folder loaded by transformers

OUT/gpu_check.json holds every figure, OUT/gpu_check.txt the same for reading. --dry-run swaps the
1.5B shape for a tiny one and the steps for a couple; where CUDA and CPU differ (the peak: CUDA's
allocator against the process's resident high-water mark; NCCL against gloo) `Machine` decides.
Not yet run on a GPU.
"""
import argparse
import concurrent.futures
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
import torch.distributed as torch_dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools" / "bench")]
import grpo  # noqa: E402
import memory as memory_bench  # noqa: E402  tools/bench/memory.py: the CPU peak (resident high-water mark)
import sft  # noqa: E402
from mathrl import distributed, flags, fsdp, memplan, models, sequences  # noqa: E402
from mathrl.engine import HFEngine, Sampling  # noqa: E402

GiB = 1 << 30
MODEL = "Qwen/Qwen2.5-Math-1.5B"
# Dense bf16 tensor-core peak, TFLOP/s: NVIDIA H100 datasheet, SXM5 (1,979 with sparsity, halved); the
# H200 has the same compute. Any other GPU: no MFU is given.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
# The published config.json of Qwen/Qwen2.5-Math-1.5B beyond memplan's Shape: rope_theta, rms_norm_eps,
# max_position_embeddings (4,096; raised here so the 16k-token SFT step has positions: RoPE has no table).
QWEN_MATH_CONFIG = dict(rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu")


@dataclasses.dataclass
class Size:
    """What the check runs at: the real size on CUDA, a tiny one for --dry-run."""
    grpo_args: list       # grpo.py flags of the update measured (a preset and what differs from it)
    sft_tokens: int       # one SFT row
    grpo_rows: int        # rollouts in the measured update (micro-batches of the preset's size)
    prompts: int          # HF engine: prompts x n completions of max_new_tokens
    n: int
    max_new_tokens: int
    trainer_steps: int    # the kill/resume runs: max steps, checkpoint every 2


REAL = Size(["--preset", "limo"], 16384, 16, 4, 8, 256, 6)   # limo: Qwen2.5-Math-1.5B, 1024 + 3072 tokens
TINY = Size(["--preset", "limo", "--max-prompt-length", "16", "--max-completion-length", "48",
             "--micro-batch-size", "2", "--logprob-chunk-size", "16"], 128, 4, 2, 2, 8, 4)


class Machine:
    """The one place CUDA and CPU differ: device, process-group backend, the peak, the GPU's FLOP/s."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(0)   # NCCL's device
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.backend = "nccl" if self.cuda else "gloo"
        self.name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        self.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in self.name), None)
        self.baseline = memory_bench.rss()   # CPU: the process before any model

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            memory_bench.reset_peak_rss()

    def peak(self) -> int:
        """CUDA: torch.cuda.max_memory_allocated. CPU: the resident high-water mark above the process
        before any model (a dry run's figure only: the allocator, the libraries and Python are in it)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return memory_bench.peak_rss() - self.baseline


def random_model(shape: memplan.Shape, device, max_positions: int, seed: int = 0):
    """A randomly initialised Qwen2 of `shape`, built on `device` (no weights read or downloaded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
                         max_position_embeddings=max_positions, **QWEN_MATH_CONFIG)
    torch.manual_seed(seed)
    with device:
        return Qwen2ForCausalLM(config)


def word_tokenizer(vocab: int):
    """A tokenizer with one word per id ("t0" ... ), for the engine to encode and decode any sampled id."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tokenizer_models.WordLevel({f"t{i}": i for i in range(vocab)}, "t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t0", pad_token="t0")


@dataclasses.dataclass
class OneRankFSDP(distributed.Dist):
    """World size 1, sharded as the trainers shard several ranks (as tests/test_gpu.py does)."""
    enabled = True


def setup(machine: Machine, cfg, shape, fsdp_on: bool, max_positions: int, reference: bool):
    """The policy (and reference) and AdamW as grpo.main / sft.main build them, on one rank."""
    d = (OneRankFSDP if fsdp_on else distributed.Dist)(0, 1, 0, machine.device)
    policy = fsdp.shard_model(random_model(shape, machine.device, max_positions), d, cfg.bf16,
                              cfg.gradient_checkpointing)
    ref = None
    if reference:  # fsdp.load_reference, from a model object instead of a folder
        ref = random_model(shape, machine.device, max_positions).to(fsdp.frozen_dtype(d, cfg.bf16))
        ref = fsdp.shard_model(ref, d, cfg.bf16, False).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return d, policy, ref, optimizer


def measured(machine: Machine, step, tokens: int, parameters: int) -> dict:
    """Run `step` once to create Adam's moments, then again under the peak and the clock."""
    step()
    machine.reset_peak()
    started = time.perf_counter()
    step()
    machine.sync()
    seconds = time.perf_counter() - started
    flops = 6 * parameters * tokens / seconds   # model FLOPs: no recomputation, no reference forward
    return {"peak_bytes": machine.peak(), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "mfu": flops / (machine.peak_tflops * 1e12) if machine.peak_tflops else None}


def grpo_update(machine: Machine, size: Size, model_arg: str, fsdp_on: bool) -> dict:
    cfg = flags.parse_args(grpo.Config, grpo.PRESETS, size.grpo_args + ["--model", model_arg])
    shape = memplan.model_shape(cfg.model)
    seq = cfg.max_prompt_length + cfg.max_completion_length
    d, policy, reference, optimizer = setup(machine, cfg, shape, fsdp_on, seq, reference=cfg.beta > 0)
    scheduler = fsdp.cosine_schedule(optimizer, 10, 0.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(1, shape.vocab, (n,), generator=generator).tolist()
    rows = [grpo.Rollout(tokens(cfg.max_prompt_length), tokens(cfg.max_completion_length),
                         (-torch.rand(cfg.max_completion_length, generator=generator) * 3).tolist(),
                         float(k % 3 - 1)) for k in range(size.grpo_rows)]
    update = lambda: grpo.policy_update(policy, reference, optimizer, scheduler, rows, cfg, d, 0)
    result = measured(machine, update, len(rows) * seq * cfg.num_iterations, shape.parameters())
    plan = memplan.make_plan("grpo", cfg, 1, 80, fsdp=fsdp_on)
    if not fsdp_on:  # the HF engine's speed, on the model the update just trained, as grpo.main samples
        tokenizer = word_tokenizer(shape.vocab)
        engine = HFEngine(policy, tokenizer, d, batch_size=cfg.micro_batch_size * 4)
        prompts = [" ".join(f"t{i}" for i in rows[k].prompt_ids) for k in range(size.prompts)]
        machine.sync()
        started = time.perf_counter()
        outputs = engine.generate(prompts, Sampling(n=size.n, temperature=cfg.temperature,
                                                    max_new_tokens=size.max_new_tokens))
        machine.sync()
        seconds = time.perf_counter() - started
        generated = sum(len(c.token_ids) for group in outputs for c in group)
        result["hf_engine"] = {"sequences": size.prompts * size.n, "generated_tokens": generated,
                               "seconds": seconds, "tokens_per_s": generated / seconds}
    return result | compared(result["peak_bytes"], plan)


def sft_step(machine: Machine, size: Size, model_arg: str, fsdp_on: bool) -> dict:
    """One step of sft.main's loop: the response tokens' NLL of one row, backward, clip, AdamW."""
    cfg = flags.parse_args(sft.Config, sft.PRESETS, ["--preset", "limo", "--model", model_arg,
                                                     "--max-length", str(size.sft_tokens)])
    shape = memplan.model_shape(cfg.model)
    d, model, _, optimizer = setup(machine, cfg, shape, fsdp_on, size.sft_tokens, reference=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, shape.vocab, (size.sft_tokens,), generator=generator).tolist()
    input_ids, labels = sft.collate([(ids, [-100] * 64 + ids[64:])], 0, machine.device)

    def step():
        with fsdp.autocast(d, cfg.bf16):
            logp, _ = sequences.next_token_scores(model, input_ids, sft.log_softmax_at, cfg.logprob_chunk_size)
        mask = labels[:, 1:] != -100
        (-(logp * mask).sum() / mask.sum()).backward()
        fsdp.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measured(machine, step, size.sft_tokens, shape.parameters())
    return result | compared(result["peak_bytes"], memplan.make_plan("sft", cfg, 1, 80, fsdp=fsdp_on))


def compared(peak: int, plan) -> dict:
    """The plan's update peak less its reserve (CUDA context, NCCL, fragmentation: not allocated
    tensors, so not in max_memory_allocated) beside the measured peak."""
    predicted = plan.update_bytes - memplan.RESERVE_GIB * GiB
    return {"plan_bytes": predicted, "ratio_measured_to_plan": peak / predicted,
            "plan_rows": [[phase, what, size] for phase, what, size in plan.rows]}


def free(machine: Machine):
    gc.collect()
    if machine.cuda:
        torch.cuda.empty_cache()


def memory_and_speed(machine: Machine, size: Size, model_arg: str) -> dict:
    """Both measurements, one process (autocast) and FSDP2 on one rank; a one-rank process group for FSDP."""
    store = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-store-{os.getpid()}"
    torch_dist.init_process_group(machine.backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        figures = {}
        for name, run in (("grpo_update", grpo_update), ("sft_step", sft_step)):
            for fsdp_on in (False, True):
                key = f"{name}/{'fsdp2' if fsdp_on else 'one_process'}"
                try:
                    figures[key] = run(machine, size, model_arg, fsdp_on)
                except Exception as error:  # e.g. out of memory: recorded, the next one still runs
                    figures[key] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                free(machine)
        return figures
    finally:
        torch_dist.destroy_process_group()
        store.unlink(missing_ok=True)


# ---- the parts that run as subprocesses: the tests, the trainers

def run_tests(out: Path, timeout: int) -> dict:
    xml = out / "pytest.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "tests/test_gpu.py", "tests/test_gpu_vllm.py",
               f"--junitxml={xml}", "-p", "no:cacheprovider"]
    with open(out / "pytest.log", "w") as log:
        rc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
    cases = []
    for case in ElementTree.parse(xml).iter("testcase") if xml.exists() else []:
        outcome = next(((child.tag, child.get("message", "")) for child in case
                        if child.tag in ("failure", "error", "skipped")), ("passed", ""))
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome[0],
                      "seconds": float(case.get("time", 0)), "message": outcome[1][:300]})
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failure", "error", "skipped")}
    return {"returncode": rc, "counts": counts, "cases": cases, "log": str(out / "pytest.log")}


def torchrun(script: str, args: list) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", script, *args]


def kill_and_resume(command: list, output_dir: Path, timeout: int) -> dict:
    """Start `command`, SIGTERM it (its process group: torchrun and the worker) once checkpoint-2 is
    complete, rerun it to the end, and load the final folder with transformers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = started + timeout
    while not (output_dir / "checkpoint-2").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    signal_sent = "SIGTERM"
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # SIGTERM ignored: kill it
            signal_sent = "SIGKILL"
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    killed_before_the_end = not (output_dir / "model.safetensors").exists()
    first_seconds = time.time() - started
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    resumed_line = next((line for line in resumed.stdout.splitlines() if "resumed from" in line), "")
    result = {"killed_after_checkpoint": killed_before_the_end and (output_dir / "checkpoint-2").exists(),
              "signal": signal_sent, "first_run_seconds": first_seconds,
              "resume_returncode": resumed.returncode, "resumed": resumed_line,
              "resume_stderr_tail": resumed.stderr[-1500:] if resumed.returncode else ""}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output_dir)   # the final folder, as anyone would load it
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    result["reloaded_finite"] = bool(all(torch.isfinite(p).all() for p in model.parameters())
                                     and torch.isfinite(logits).all())
    result["ok"] = bool(result["killed_after_checkpoint"] and resumed.returncode == 0 and resumed_line
                        and result["reloaded_finite"])
    return result


def trainers(out: Path, size: Size, timeout: int) -> dict:
    start = out / "tiny-model"
    model, tokenizer = models.build_tiny_model(hidden_size=64, num_layers=2, num_heads=2, seed=1)
    model.save_pretrained(start)
    tokenizer.save_pretrained(start)
    steps = ["--max-steps", str(size.trainer_steps), "--save-steps", "2"]
    runs = {
        "grpo": torchrun("grpo.py", ["--model", str(start), "--data", "linear", "--template", "plain",
                                     "--engine", "hf", "--bf16", *steps, "--prompts-per-step", "2",
                                     "--num-generations", "2", "--micro-batch-size", "4",
                                     "--max-prompt-length", "64", "--max-completion-length", "16",
                                     "--grader-workers", "1", "--output-dir", str(out / "runs" / "grpo")]),
        "sft": torchrun("sft.py", ["--model", str(start), "--data", "linear", "--template", "plain", "--bf16",
                                   *steps, "--batch-size", "4", "--micro-batch-size", "4",
                                   "--max-length", "128",
                                   "--output-dir", str(out / "runs" / "sft")]),
    }

    def one(name):
        try:
            return kill_and_resume(runs[name], out / "runs" / name, timeout)
        except Exception as error:
            return {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:   # side by side: half the wall time
        return dict(zip(runs, pool.map(one, runs)))


# ---- the report

def as_text(report: dict) -> str:
    lines = [f"GPU check on {report['device']} (torch {report['torch']}, "
             f"transformers {report['transformers']}), "
             f"{'DRY RUN, tiny sizes' if report['dry_run'] else 'real sizes'}"]
    tests = report.get("tests", {})
    if "counts" in tests:
        lines.append(f"tests: {tests['counts']} (rc {tests['returncode']})")
        lines += [f"  {c['outcome']:<8} {c['test']} {c['message'][:100]}" for c in tests["cases"]]
    for key, figure in report.get("memory_and_speed", {}).items():
        if "error" in figure:
            lines.append(f"{key}: ERROR {figure['error'][:200]}")
            continue
        mfu = f", MFU {figure['mfu']:.1%}" if figure["mfu"] is not None else ""
        lines.append(f"{key}: peak {figure['peak_bytes'] / GiB:.2f} GiB, plan {figure['plan_bytes'] / GiB:.2f} "
                     f"GiB (ratio {figure['ratio_measured_to_plan']:.2f}); {figure['tokens']} tokens in "
                     f"{figure['seconds']:.2f} s = {figure['tokens_per_s']:.0f} tokens/s{mfu}")
        if "hf_engine" in figure:
            engine = figure["hf_engine"]
            lines.append(f"  HF engine: {engine['generated_tokens']} tokens over {engine['sequences']} "
                         f"sequences in {engine['seconds']:.2f} s = {engine['tokens_per_s']:.0f} tokens/s")
    for name, figure in report.get("trainers", {}).items():
        lines.append(f"trainer {name}: {'ok' if figure.get('ok') else 'FAILED'} {json.dumps(figure)[:400]}")
    lines += [f"part {name} ERROR: {error[:300]}" for name, error in report.get("errors", {}).items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check",
                        help="folder of gpu_check.json and gpu_check.txt (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: the CPU test of this script")
    parser.add_argument("--parts", default="tests,memory,trainers", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if not set(parts) <= {"tests", "memory", "trainers"}:
        raise SystemExit(f"error: --parts {args.parts!r}: choose among tests, memory, trainers")
    machine = Machine()
    if not machine.cuda and not args.dry_run:
        raise SystemExit("error: no CUDA GPU: the real sizes need one (--dry-run runs the tiny ones on CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = TINY if args.dry_run else REAL
    import transformers

    report = {"device": machine.name, "torch": torch.__version__, "transformers": transformers.__version__,
              "dry_run": args.dry_run, "peak_bf16_tflops": machine.peak_tflops, "errors": {}}

    def write():
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_check.txt").write_text(as_text(report))

    model_arg = MODEL
    if args.dry_run:  # the tiny shape as a config.json folder: memplan reads it like any local model
        model_arg = str(out / "tiny-shape")
        random_model(memplan.Shape(64, 2, 4, 2, 128, 512, tied=True), torch.device("cpu"), 256).save_pretrained(
            model_arg)
    jobs = {"tests": lambda: run_tests(out, timeout=240),
            "memory_and_speed": lambda: memory_and_speed(machine, size, model_arg),
            "trainers": lambda: trainers(out, size, timeout=120)}
    for name, job in jobs.items():
        if name.split("_")[0] not in parts:
            continue
        started = time.time()
        try:
            report[name] = job()
        except Exception:
            report["errors"][name] = traceback.format_exc()[-3000:]
        report.setdefault("seconds", {})[name] = time.time() - started
        write()
        print(f"gpu_check: {name} done in {time.time() - started:.0f} s", flush=True)
    print(as_text(report), end="")
    print(f"gpu_check: figures in {out / 'gpu_check.json'} and {out / 'gpu_check.txt'}")


if __name__ == "__main__":
    main()
