"""Keep the training problems a model solves sometimes but not always: pass-rate filtering.

    python evaluate.py --model M --bench open-rs --split train --n 8 --temperature 0.6 --out runs/rates.json
    python tools/pass_rate_filter.py runs/rates.samples.jsonl --data open-rs --min 0.125 --max 0.875 \
        --out runs/open-rs-band.jsonl
    python grpo.py --data runs/open-rs-band.jsonl ...

A problem's pass rate is the fraction of its samples in evaluate.py's samples file that were graded
correct. Those in [--min, --max] are written as JSON lines every trainer reads (`--data FILE`):
problem, answer, solution and id as --data loaded them, plus the pass rate and the sample count.
Problems the samples file does not cover are left out and counted. Why a band: a GRPO group whose
completions are all right or all wrong has zero advantage everywhere and teaches nothing (DAPO's
dynamic sampling drops such groups after the fact; filtering drops them before training, as open-r1's
and Open-RS's data cleaning did with their own models and thresholds, which this script does not fix).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def pass_rates(samples_path: Path) -> dict[str, tuple[float, int]]:
    """{problem id: (pass rate, samples)} from an evaluate.py samples file (one bench)."""
    rates, benches = {}, set()
    for number, line in enumerate(samples_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            verdicts = record["correct"]
            benches.add(record["bench"])
            rates[str(record["id"])] = (sum(map(bool, verdicts)) / len(verdicts), len(verdicts))
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            raise SystemExit(f"error: {samples_path} line {number}: not a record of an evaluate.py samples file")
    if len(benches) > 1:
        raise SystemExit(f"error: {samples_path} holds several benches ({', '.join(sorted(benches))}); "
                         f"evaluate one training set per samples file")
    return rates


def keep_in_band(problems: list[dict], rates: dict, low: float, high: float) -> list[dict]:
    """The problems whose pass rate lies in [low, high], as rows of a --data file."""
    return [{"id": p["id"], "problem": p["prompt"], "answer": p["answer"], "solution": p["solution"],
             "pass_rate": rates[p["id"]][0], "samples": rates[p["id"]][1]}
            for p in problems if p["id"] in rates and low <= rates[p["id"]][0] <= high]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path, help="FILE.samples.jsonl written by evaluate.py --out FILE")
    parser.add_argument("--data", required=True, help="the training set that was evaluated (its --bench spec)")
    parser.add_argument("--split", default="train", help="its split, as evaluate.py's --split (default train)")
    parser.add_argument("--min", type=float, default=0.0, help="lowest pass rate kept (inclusive)")
    parser.add_argument("--max", type=float, default=1.0, help="highest pass rate kept (inclusive)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON-lines file to write")
    args = parser.parse_args(argv)
    if not 0 <= args.min <= args.max <= 1:
        raise SystemExit(f"error: need 0 <= --min <= --max <= 1, got --min {args.min} --max {args.max}")
    if not args.samples.is_file():
        raise SystemExit(f"error: {args.samples}: no such samples file")
    rates = pass_rates(args.samples)
    try:
        problems = data.load_problems(args.data, split=args.split)
    except data.DataError as error:
        raise SystemExit(f"error: --data: {error}")
    unknown = set(rates) - {p["id"] for p in problems}
    if unknown:
        raise SystemExit(f"error: {len(unknown)} problem ids of {args.samples} are not in --data {args.data!r} "
                         f"(e.g. {sorted(unknown)[0]!r}): evaluate and filter the same data")
    kept = keep_in_band(problems, rates, args.min, args.max)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in kept))
    covered = sum(p["id"] in rates for p in problems)
    print(f"pass_rate_filter: kept {len(kept)} of {covered} evaluated problems with pass rate in "
          f"[{args.min:g}, {args.max:g}] ({len(problems) - covered} of {len(problems)} not evaluated, left out) "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
