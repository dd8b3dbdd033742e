"""Logs: one JSON line per step in D/metrics.jsonl, a short console line, and optionally wandb or
tensorboard (imported only when asked for); an RL step's rollout metrics and its sample of
completions.jsonl; and, at the start of every run, the truncation that keeps each step in the logs once.
(trajectories.jsonl, LIM's input, is written by lim.write_trajectories.)
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mathrl.distributed import Dist


def rollout_metrics(step: int, groups: list, reward_names, prompts_per_step: int, num_problems: int) -> dict:
    """The rollout half of an RL step's metrics (rewards, accuracy, lengths) from the step's batch, the
    same list of groups on every rank. A group's completions may be engine.Completion or Group.summary's
    Sampled."""
    completions = [c for g in groups for c in g.completions]
    column = lambda name: [x for g in groups for x in g.rewards[name]]
    lengths = [c.num_tokens for c in completions]
    metrics = {}
    for name in list(reward_names) + ["total"]:
        metrics[f"reward/{name}"] = float(np.mean(column(name)))
        metrics[f"reward/{name}_std"] = float(np.std(column(name), ddof=1)) if len(lengths) > 1 else 0.0
    return metrics | {"accuracy": float(np.mean(column("correct"))),
                      "response_length_mean": float(np.mean(lengths)),
                      "response_length_max": max(lengths),
                      "truncated_frac": float(np.mean([c.finish_reason == "length" for c in completions])),
                      "epoch": (step + 1) * prompts_per_step / num_problems}


def write_completions(output_dir, step: int, groups: list, problems, prompts, every: int, dist: Dist):
    """Every `every` steps (0: never), the first group's completions, prompt, answer and rewards on rank 0,
    appended to completions.jsonl: what the policy writes, to read beside the metrics."""
    if not dist.is_main or not every or (step + 1) % every:
        return
    with open(Path(output_dir) / "completions.jsonl", "a") as f:
        g = groups[0]
        for c, r in zip(g.completions, g.rewards["total"]):
            f.write(json.dumps({"step": step + 1, "prompt": prompts[g.problem], "completion": c.text,
                                "answer": problems[g.problem]["answer"], "reward": r}) + "\n")


class MetricsLogger:
    def __init__(self, output_dir, report_to: str, run_config: dict, dist: Dist):
        self.active = dist.is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.backend = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to == "wandb":
            import wandb

            self.backend = wandb.init(config=run_config, dir=str(output_dir))
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict):
        if not self.active:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.backend is not None and hasattr(self.backend, "log"):
            self.backend.log(record, step=step)
        elif self.backend is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.backend.add_scalar(key, value, step)


def _plain(value):
    if torch.is_tensor(value) or isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def truncate_logs(output_dir, step: int, dist: Dist):
    """Logs hold each step once. At the start of every run, resumed (step = the checkpoint's) or fresh
    (step = 0), lines of later steps come from an attempt that died before its next checkpoint: the
    steps are redone, so those lines go. A line that does not parse (the last one, cut short by a kill
    or a full disk) is dropped with a warning. Each file is replaced atomically: a kill during this
    leaves the old file or the new one, never half of one."""
    for name in ("metrics.jsonl", "trajectories.jsonl", "completions.jsonl"):
        path = Path(output_dir) / name
        if not dist.is_main or not path.exists():
            continue
        kept, unreadable = [], 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                unreadable += line.strip() != ""
                continue
            if record_step <= step:
                kept.append(line + "\n")
        if unreadable:
            print(f"warning: {path}: dropped {unreadable} unreadable line(s) (a write cut short)",
                  file=sys.stderr)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)
