"""evaluate.py: pass@k, scoring on the real benchmark files, the CLI's outputs and resume."""
import itertools
import json

import pytest

import data
import evaluate
import rewards
import training
from conftest import shared_file
from engine import Completion, Sampling


def test_pass_at_k_equals_the_probability_over_all_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                exact = sum(any(s) for s in subsets) / len(subsets)
                assert evaluate.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    assert evaluate.pass_at_k(16, 1, 1) == pytest.approx(1 / 16)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 5, 1)


class AnsweringEngine:
    """A stand-in model: answers every prompt with a fixed function of the problem."""

    def __init__(self, problems, answer_of):
        self.by_prompt = {data.format_prompt(p["prompt"], None, "plain"): p for p in problems}
        self.answer_of = answer_of

    def generate(self, prompts, sampling):
        out = []
        for prompt in prompts:
            text = f"Let me think.\nThe final answer is $\\boxed{{{self.answer_of(self.by_prompt[prompt])}}}$."
            out.append([Completion(token_ids=[1] * 7, text=text, logprobs=[0.0] * 7, finish_reason="stop")] * sampling.n)
        return out


BENCHMARKS = {"math500": "math500/test.jsonl", "gsm8k": "gsm8k/test.jsonl", "aime24": "aime24/test.jsonl",
              "aime25": "aime25", "amc23": "amc23/test.jsonl", "minerva": "minerva_math/test.jsonl",
              "olympiadbench": "olympiadbench/test.jsonl"}


@pytest.fixture(scope="module")
def grader():
    with rewards.Grader(num_workers=2) as g:
        yield g


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_gold_answers_score_100_and_wrong_answers_score_0_on_real_benchmarks(name, grader):
    problems = data.load_problems(f"{name}={shared_file(BENCHMARKS[name])}", split="test")
    d = training.init_distributed()
    sampling = Sampling(n=2)
    right = evaluate.evaluate_problems(AnsweringEngine(problems, lambda p: p["answer"]), problems, None,
                                       sampling, "plain", grader, d)
    summary = evaluate.summarize(right, [1, 2])
    assert summary["n_problems"] == len(problems) and summary["n_samples"] == 2
    wrong_ids = [r["id"] for r in right if not all(r["correct"])]
    assert summary["pass@1"] == 1.0 and summary["pass@2"] == 1.0, wrong_ids[:5]
    wrong = evaluate.evaluate_problems(AnsweringEngine(problems, lambda p: "-987654.321"), problems, None,
                                       sampling, "plain", grader, d)
    assert evaluate.summarize(wrong, [1, 2])["pass@1"] == 0.0


def test_cli_writes_summary_and_samples_and_skips_done_problems(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model, tokenizer = training.build_tiny_model(hidden_size=32, num_layers=1, num_heads=1)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval" / "r.json"
    argv = ["--model", str(model_dir), "--bench", "linear", "--limit", "6", "--n", "3", "--k", "1,2",
            "--temperature", "1.0", "--max-tokens", "8", "--template", "plain", "--out", str(out)]
    summaries = evaluate.main(argv)
    assert "| linear |" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(summaries))
    entry = saved[0]
    for key in ("model", "bench", "n_problems", "n_samples", "pass@1", "pass@2", "mean_response_tokens",
                "truncated_frac", "sampling"):
        assert key in entry
    assert entry["n_problems"] == 6 and entry["n_samples"] == 3 and 1 <= entry["mean_response_tokens"] <= 8
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["completions"]) == 3 == len(s["correct"]) for s in samples)

    # a rerun with more problems generates only the new ones and summarises all of them
    argv[argv.index("--limit") + 1] = "8"
    summaries = evaluate.main(argv)
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and len({s["id"] for s in samples}) == 8
    assert summaries[0]["n_problems"] == 8


def test_k_larger_than_n_is_a_usage_error():
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--bench", "linear", "--n", "2", "--k", "1,4"])


def test_vllm_and_hf_engines_give_the_same_greedy_results(tmp_path):
    pytest.importorskip("vllm")
    model_dir = tmp_path / "model"
    model, tokenizer = training.build_tiny_model(hidden_size=128, num_layers=2, num_heads=4, seed=3)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    results = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / f"{engine}.json"
        summary = evaluate.main(["--model", str(model_dir), "--bench", "linear", "--limit", "24", "--max-tokens", "40",
                                 "--template", "plain", "--engine", engine, "--out", str(out)])[0]
        samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
        results[engine] = (summary, {s["id"]: s["completions"] for s in samples})
    assert results["hf"][1] == results["vllm"][1]          # token-for-token the same greedy completions
    for key in ("pass@1", "mean_response_tokens", "truncated_frac"):
        assert results["hf"][0][key] == results["vllm"][0][key]
