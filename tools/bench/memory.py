"""Per-rank memory of one GRPO policy update, measured on CPU, beside what memplan.py predicts.

    python tools/bench/memory.py --json runs/memory.json

Each configuration is one `torchrun --standalone --nproc_per_node R` run (gloo) of grpo.policy_update
on a random Qwen2 model with the 152k vocabulary of Qwen2.5 (tied embeddings), one row of `seq` tokens
per micro-batch, gradient checkpointing on, fp32. Every rank measures:

  state     exactly, from the tensors: its shard of the weights, of the gradients (summed when the
            optimizer steps) and of Adam's moments (after the step)
  peak      the kernel's high-water mark of the process's resident memory (VmHWM, reset through
            /proc/self/clear_refs just before the update) minus the resident memory at that moment:
            everything the update allocates, Adam's first-step moments included

and the table shows the largest rank. The "plan" columns are memplan.make_plan's numbers for the same
model and config (gradients + Adam moments + the larger of FSDP's gathered layers + activations + log-prob
chunk and the root's fp32 reduce-scatter at the end of backward).

Variants: "full" trains every weight; "lora" trains rank-16 adapters (alpha 16) on the 7 projections, the base
frozen; "budget" cuts the rows by --max-tokens-per-micro-batch = 2 x seq (two rows a micro-batch) instead of
one row each. `--variants lora,budget` runs only those rows.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from mathrl import memplan  # noqa: E402

MiB = 1 << 20
VOCAB = 151936  # Qwen2.5-1.5B / Qwen2.5-Math-1.5B's vocabulary (config.json vocab_size)
MODELS = {  # hidden, layers, heads, kv heads, intermediate: ~52M and ~134M parameters with the 152k vocabulary
    "52M": (320, 4, 5, 1, 864),
    "134M": (768, 4, 12, 2, 2048),
}
# (model, ranks, rows, sequence, variant): ranks and micro-batches at 512 tokens, then length on 1 rank,
# then LoRA and token budgets
GRID = [("52M", 1, 1, 512, "full"), ("52M", 2, 1, 512, "full"), ("52M", 4, 1, 512, "full"),
        ("52M", 1, 4, 512, "full"), ("52M", 2, 4, 512, "full"), ("52M", 4, 4, 512, "full"),
        ("134M", 1, 1, 512, "full"), ("134M", 2, 1, 512, "full"), ("52M", 1, 1, 1024, "full"),
        ("52M", 1, 1, 2048, "full"), ("52M", 1, 1, 4096, "full"),
        ("52M", 1, 1, 512, "lora"), ("52M", 2, 1, 512, "lora"), ("134M", 1, 1, 512, "lora"),
        ("134M", 2, 1, 512, "lora"), ("52M", 1, 4, 512, "budget"), ("52M", 2, 8, 512, "budget")]
LORA_RANK = 16


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the high-water mark to the current RSS
        f.write("5")


def local_bytes(tensor) -> int:
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def worker(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import grpo
    from mathrl import distributed, fsdp, lora

    dist = distributed.init_distributed()
    hidden, layers, heads, kv_heads, intermediate = MODELS[args.model] if args.model in MODELS else \
        json.loads(args.model)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate,
                         max_position_embeddings=args.seq, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    if args.variant == "lora":
        lora.apply_lora(model, LORA_RANK, float(LORA_RANK))
    num_parameters = sum(p.numel() for p in model.parameters())
    model = fsdp.shard_model(model, dist, bf16=False, gradient_checkpointing=True)
    cfg = grpo.Config(micro_batch_size=1, num_iterations=1, beta=0.0, bf16=False,
                      gradient_checkpointing=True, max_prompt_length=16, max_completion_length=args.seq - 16,
                      lr=1e-6, max_tokens_per_micro_batch=2 * args.seq if args.variant == "budget" else 0)
    trained = lora.trainable_parameters(model) if args.variant == "lora" else model.parameters()
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr)
    scheduler = fsdp.cosine_schedule(optimizer, 1, 0.0, 1.0)
    gradient_bytes = []  # the gradients this rank holds when the optimizer steps
    optimizer.register_step_pre_hook(lambda *_: gradient_bytes.append(
        sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)))
    generator = torch.Generator().manual_seed(1 + dist.rank)
    rows = [grpo.Rollout(torch.randint(0, args.vocab, (16,), generator=generator).tolist(),
                         torch.randint(0, args.vocab, (args.seq - 16,), generator=generator).tolist(),
                         [-1.0] * (args.seq - 16), 1.0 if k % 2 else -1.0) for k in range(args.micro_batches)]
    gc.collect()
    reset_peak_rss()
    before = rss()
    grpo.policy_update(model, None, optimizer, scheduler, rows, cfg, dist, pad_id=0)
    peak = peak_rss() - before
    result = {"rank": dist.rank, "parameters": num_parameters, "peak": peak,
              "weights": sum(local_bytes(p) for p in model.parameters()), "gradients": gradient_bytes[0],
              "adam": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                          if torch.is_tensor(v) and v.dim() > 0)}
    results = distributed.all_gather_objects(result, dist)
    if dist.is_main:
        Path(args.out).write_text(json.dumps(results))
    distributed.shutdown(dist)


def run(model: str, ranks: int, micro_batches: int, seq: int, vocab: int = VOCAB,
        variant: str = "full") -> list[dict]:
    """One configuration under torchrun; each rank's measurements."""
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as scratch:
        out = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   __file__, "--worker", "--model", model,
                   "--micro-batches", str(micro_batches), "--seq", str(seq), "--vocab", str(vocab),
                   "--variant", variant, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        # gloo can abort at exit ("terminate called without an active exception") after rank 0 wrote every
        # rank's figures: those stand. Without them, one fresh launch (a new rendezvous: torchrun's own
        # --max-restarts reuses the store, and the restarted ranks dial the dead ranks' old ports); the
        # worker is deterministic, so a rerun measures the same thing.
        for attempt in (1, 2):
            launch = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            try:
                results = json.loads(out.read_text())
                if len(results) == ranks:
                    return results
            except (OSError, ValueError):  # not written, or cut short
                pass
        raise RuntimeError(f"memory bench worker failed twice (exit {launch.returncode}):\n{launch.stderr[-3000:]}")


def planned(model: str, ranks: int, micro_batches: int, seq: int, vocab: int = VOCAB,
            variant: str = "full") -> dict:
    """memplan's per-rank numbers for the same run (fp32, checkpointed, no reference, no engine)."""
    from mathrl import lora

    hidden, layers, heads, kv_heads, intermediate = MODELS[model] if model in MODELS else json.loads(model)
    shape = memplan.Shape(hidden, layers, heads, kv_heads, intermediate, vocab, tied=True)
    tokens = micro_batches * seq  # all rows; a micro-batch holds one row of seq tokens, or two under a budget
    micro_tokens = 2 * seq if variant == "budget" else seq
    P = shape.parameters()
    trained = lora.adapter_parameter_count(shape, LORA_RANK) if variant == "lora" else P
    weights = P + trained if variant == "lora" else P
    adapters_per_layer = trained // layers if variant == "lora" else 0
    transient = (memplan.gathered_bytes(shape, ranks, 4, adapters_per_layer=adapters_per_layer)
                 + memplan.activation_bytes(shape, micro_tokens, 4, True)
                 + memplan.logprob_bytes(shape, micro_tokens, 1024, 4))
    if variant != "lora":  # the frozen root has no gradients to reduce-scatter
        transient = max(transient, memplan.root_reduce_bytes(shape, ranks, 4))  # the end of backward's moment
    return {"parameters": weights, "weights": 4 * weights / ranks, "gradients": 4 * trained / ranks,
            "adam": 8 * trained / ranks, "peak": 12 * trained / ranks + transient, "tokens": tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="52M", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batches", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=VOCAB, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="full,lora,budget", help="which rows of the grid to run")
    parser.add_argument("--variant", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    variants = args.variants.split(",")
    print("| model | variant | ranks | rows | seq | weights MiB | gradients MiB | Adam MiB | "
          "update peak MiB | plan: state MiB | plan: peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for model, ranks, micro_batches, seq, variant in (row for row in GRID if row[-1] in variants):
        measured = run(model, ranks, micro_batches, seq, variant=variant)
        plan = planned(model, ranks, micro_batches, seq, variant=variant)
        top = max(measured, key=lambda r: r["peak"])
        state = lambda r: r["weights"] + r["gradients"] + r["adam"]
        rows.append({"model": model, "variant": variant, "ranks": ranks, "micro_batches": micro_batches,
                     "seq": seq, "measured": measured, "plan": plan})
        print(f"| {model} | {variant} | {ranks} | {micro_batches} | {seq} | {top['weights'] / MiB:.0f} | "
              f"{top['gradients'] / MiB:.0f} | {top['adam'] / MiB:.0f} | {top['peak'] / MiB:.0f} | "
              f"{state(plan) / MiB:.0f} | {plan['peak'] / MiB:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
