"""Per-rank memory of one GRPO policy update, measured on CPU, beside what memplan.py predicts.

    python bench/memory.py                       # the working tree
    python bench/memory.py --trees before,after  # commit 83cee8e (before the issue-13 fixes) vs working tree

Each configuration is one `torchrun --standalone --nproc_per_node R` run (gloo) of grpo.policy_update
on a random Qwen2 model with the 152k vocabulary of Qwen2.5 (tied embeddings), one row of `seq` tokens
per micro-batch, gradient checkpointing on, fp32. Every rank measures:

  state     exactly, from the tensors: its shard of the weights, of the gradients (summed when the
            optimizer steps) and of Adam's moments (after the step)
  peak      the kernel's high-water mark of the process's resident memory (VmHWM, reset through
            /proc/self/clear_refs just before the update) minus the resident memory at that moment:
            everything the update allocates, Adam's first-step moments included

and the table shows the largest rank. The "plan" columns are memplan.make_plan's numbers for the same
model and config (gradients + Adam moments + FSDP's gathered layers + activations + log-prob chunk).
"""
import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
VOCAB = 151936  # Qwen2.5-1.5B / Qwen2.5-Math-1.5B's vocabulary (config.json vocab_size)
MODELS = {  # hidden, layers, heads, kv heads, intermediate: ~52M and ~134M parameters with the 152k vocabulary
    "52M": (320, 4, 5, 1, 864),
    "134M": (768, 4, 12, 2, 2048),
}
# (model, ranks, micro-batches, sequence): ranks and micro-batches at 512 tokens, then length on 1 rank.
GRID = [("52M", 1, 1, 512), ("52M", 2, 1, 512), ("52M", 4, 1, 512), ("52M", 1, 4, 512), ("52M", 2, 4, 512),
        ("52M", 4, 4, 512), ("134M", 1, 1, 512), ("134M", 2, 1, 512), ("52M", 1, 1, 1024),
        ("52M", 1, 1, 2048), ("52M", 1, 1, 4096)]
# Unchunked log-probs (the before tree) at 4096 tokens would need ~10 GB on one rank: the "before" tree stops at 2048.
BEFORE_MAX_SEQ = 2048


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


def grpo_config(grpo, **values):
    """grpo.Config with the values this tree knows (the before tree has no --logprob-chunk-size)."""
    names = {f.name for f in dataclasses.fields(grpo.Config)}
    return grpo.Config(**{k: v for k, v in values.items() if k in names})


def worker(args):
    sys.path.insert(0, args.tree)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import grpo
    from mathrl import distributed, fsdp

    d = distributed.init_distributed()
    hidden, layers, heads, kv_heads, intermediate = MODELS[args.model] if args.model in MODELS else \
        json.loads(args.model)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate,
                         max_position_embeddings=args.seq, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    num_parameters = sum(p.numel() for p in model.parameters())
    model = fsdp.shard_model(model, d, bf16=False, gradient_checkpointing=True)
    cfg = grpo_config(grpo, micro_batch_size=1, num_iterations=1, beta=0.0, bf16=False,
                      gradient_checkpointing=True, max_prompt_length=16, max_completion_length=args.seq - 16,
                      lr=1e-6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = fsdp.cosine_schedule(optimizer, 1, 0.0, 1.0)
    gradient_bytes = []  # the gradients this rank holds when the optimizer steps
    optimizer.register_step_pre_hook(lambda *_: gradient_bytes.append(
        sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)))
    generator = torch.Generator().manual_seed(1 + d.rank)
    rows = [grpo.Rollout(torch.randint(0, args.vocab, (16,), generator=generator).tolist(),
                         torch.randint(0, args.vocab, (args.seq - 16,), generator=generator).tolist(),
                         [-1.0] * (args.seq - 16), 1.0 if k % 2 else -1.0) for k in range(args.micro_batches)]
    gc.collect()
    reset_peak_rss()
    before = rss()
    grpo.policy_update(model, None, optimizer, scheduler, rows, cfg, d, pad_id=0)
    peak = peak_rss() - before
    result = {"rank": d.rank, "parameters": num_parameters, "peak": peak,
              "weights": sum(local_bytes(p) for p in model.parameters()), "gradients": gradient_bytes[0],
              "adam": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                          if torch.is_tensor(v) and v.dim() > 0)}
    results = distributed.all_gather_objects(result, d)
    if d.is_main:
        Path(args.out).write_text(json.dumps(results))
    distributed.shutdown(d)


def run(tree: str, model: str, ranks: int, micro_batches: int, seq: int, vocab: int = VOCAB) -> list[dict]:
    """One configuration under torchrun; each rank's measurements."""
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as scratch:
        out = Path(scratch) / "result.json"
        # one relaunch: gloo can abort at exit ("terminate called without an active exception"); the worker is
        # deterministic, so a rerun measures the same thing
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts=1",
                   f"--nproc_per_node={ranks}",
                   __file__, "--worker", "--tree", tree, "--model", model,
                   "--micro-batches", str(micro_batches), "--seq", str(seq), "--vocab", str(vocab),
                   "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def planned(model: str, ranks: int, micro_batches: int, seq: int, chunked: bool, vocab: int = VOCAB) -> dict:
    """memplan's per-rank numbers for the same run (fp32, checkpointed, no reference, no engine)."""
    sys.path.insert(0, str(ROOT))
    from mathrl import memplan

    hidden, layers, heads, kv_heads, intermediate = MODELS[model] if model in MODELS else json.loads(model)
    shape = memplan.Shape(hidden, layers, heads, kv_heads, intermediate, vocab, tied=True)
    tokens = micro_batches * seq  # one row per micro-batch: the plan's micro-batch is one row of seq tokens
    P = shape.parameters()
    transient = (memplan.gathered_bytes(shape, ranks, 4) + memplan.activation_bytes(shape, seq, 4, True)
                 + memplan.logprob_bytes(shape, seq, 1024 if chunked else None, 4))
    return {"parameters": P, "weights": 4 * P / ranks, "gradients": 4 * P / ranks, "adam": 8 * P / ranks,
            "peak": 12 * P / ranks + transient, "tokens": tokens}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default="after",
                        help="comma list of before (--before-commit) and/or after (the working tree)")
    parser.add_argument("--before-commit", default="83cee8e",
                        help="the code measured as before: the last commit without chunked log-probs and "
                             "per-micro-batch gradient reduction")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="52M", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batches", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=VOCAB, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    trees = {}
    for name in args.trees.split(","):
        if name == "after":
            trees[name] = str(ROOT)
        elif name == "before":  # the files of --before-commit, untouched by the working tree
            path = Path("/tmp/plan/before")
            subprocess.run(f"rm -rf {path} && mkdir -p {path} && git -C {ROOT} archive {args.before_commit} | tar -x -C {path}",
                           shell=True, check=True)
            trees[name] = str(path)
        else:
            raise SystemExit(f"error: --trees takes before and/or after, not {name!r}")
    print("| tree | model | ranks | micro-batches | seq | weights MiB | gradients MiB | Adam MiB | "
          "update peak MiB | plan: state MiB | plan: peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for tree_name, tree in trees.items():
        for model, ranks, micro_batches, seq in GRID:
            if tree_name == "before" and seq > BEFORE_MAX_SEQ:
                continue
            measured = run(tree, model, ranks, micro_batches, seq)
            plan = planned(model, ranks, micro_batches, seq, chunked=tree_name == "after")
            top = max(measured, key=lambda r: r["peak"])
            state = lambda r: r["weights"] + r["gradients"] + r["adam"]
            rows.append({"tree": tree_name, "model": model, "ranks": ranks, "micro_batches": micro_batches,
                         "seq": seq, "measured": measured, "plan": plan})
            print(f"| {tree_name} | {model} | {ranks} | {micro_batches} | {seq} | {top['weights'] / MiB:.0f} | "
                  f"{top['gradients'] / MiB:.0f} | {top['adam'] / MiB:.0f} | {top['peak'] / MiB:.0f} | "
                  f"{state(plan) / MiB:.0f} | {plan['peak'] / MiB:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
