"""What the experiment scripts share: running a step, timing it, the RL pool, evaluating, table cells.

Each script in experiments/ is a sequence of ordinary commands (`python sft.py ...`, `python grpo.py ...`,
`python evaluate.py ...`, `python tools/plot.py ...`), printed before they run, from the repository root.
"""
import json
import math
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # data.py and lim.py, when a script is run as `python experiments/x.py`

import data  # noqa: E402
import lim  # noqa: E402


def write_rl_pool(path: Path, size: int = 512) -> Path:
    """The first `size` one-unknown `linear` train problems, as a file grpo.py and ppo.py take as --data."""
    if not path.exists():
        one_unknown = [p for p in data.load_problems("linear", split="train") if "(" not in p["answer"]]
        lim.write_rows(path, one_unknown[:size])
    return path


def run(command: list[str]):
    """Run one step. A demo stopped with SIGTERM (or Ctrl-C) stops the step it is running too, and waits
    for it: a trainer left behind would go on writing into the run folder."""
    print("+ " + " ".join(command), flush=True)
    step = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda *_: step.terminate())
    try:
        code = step.wait()
    except BaseException:  # Ctrl-C: the step got SIGINT from the terminal as well; make sure it ends
        step.terminate()
        step.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        raise subprocess.CalledProcessError(code, command)


def timed(name: str, out: Path, command: list[str]):
    """Run a step; keep its wall time in timings.json and the peak RSS of the largest step so far in
    peak_rss_gb.json (ru_maxrss of the children: the largest one), so a resumed run still reports them."""
    started = time.time()
    run(command)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    timings[name] = time.time() - started
    timings_file.write_text(json.dumps(timings, indent=1))
    (out / "peak_rss_gb.json").write_text(json.dumps(peak_rss_gb(out)))


def peak_rss_gb(out: Path) -> float:
    """The largest step's peak RSS over every call that ran steps in `out` (0 if none has)."""
    peak_file = out / "peak_rss_gb.json"
    earlier = json.loads(peak_file.read_text()) if peak_file.exists() else 0.0
    return max(earlier, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20)  # KiB on Linux


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); nan with one value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def cell(values: list[float], scale: float = 100.0) -> str:
    mean, se = mean_se([scale * v for v in values])
    return f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f} ± {se:.1f}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def pass_at_1(model: Path, where: Path, out: Path, max_tokens: int, limit: int | None,
              samples: int) -> dict:
    """{"greedy", "sampled", "greedy_length", "greedy_truncated"} on the held-out `linear` problems;
    the evaluation files go to `where`."""
    where.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, extra in (("greedy", []), ("sampled", ["--n", str(samples), "--temperature", "1.0"])):
        result = where / f"eval-{name}.json"
        if not result.exists():
            timed(f"{where.relative_to(out)} eval {name}", out,
                  [sys.executable, "evaluate.py", "--engine", "hf", "--model", str(model), "--bench", "linear",
                   "--template", "plain", "--max-tokens", str(max_tokens), "--out", str(result), *extra,
                   *(["--limit", str(limit)] if limit else [])])
        summary_ = json.loads(result.read_text())[0]
        figures[name] = summary_["pass@1"]
        if name == "greedy":
            figures |= {"greedy_length": summary_["mean_response_tokens"],
                        "greedy_truncated": summary_["truncated_frac"]}
    return figures
