"""evaluate.py: pass@k, scoring on the real benchmark files, the CLI's outputs and resume."""
import itertools
import json
import shutil
import subprocess
import sys

import pytest

import data
import evaluate
from mathrl import distributed, models
from conftest import ROOT, shared_file
from mathrl.engine import Completion, Sampling
from mathrl.grader import Grader


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


def voting_record(extracted, correct):
    return {"extracted": extracted, "correct": correct, "num_tokens": [5] * len(correct),
            "finish_reasons": ["stop"] * len(correct)}


# Four problems of five samples each, with their hand-counted votes (k = 3 | 4 | 5):
VOTES = [
    # gold 1/2: three ways to write it form one cluster. k=3: 1/2 (2 votes to 1); k=4: a 2-2 tie, and the
    # cluster of "3" came first: wrong; k=5: 1/2, 3 votes to 2 (exact strings would elect "3")
    voting_record(["3", "0.5", "\\frac{1}{2}", "3", "1/2"], [False, True, True, False, True]),
    # gold 7: the samples with no answer vote together, as Qwen's "" does, and win every k: wrong
    voting_record([None, None, "7", None, "7"], [False, False, True, False, True]),
    # gold 7: right at every k; at k=4 a 2-2 tie that the first cluster, 7, wins
    voting_record(["7", "8", "7", "8", "7"], [True, False, True, False, True]),
    # gold 5: k=3: 5 (2 to 1); k=4: a tie that "2" wins, being first; k=5: "2" (3 to 2). Wrong at 4 and 5
    voting_record(["2", "5", "5", "2", "2"], [False, True, True, False, False]),
]


def test_vote_clusters_groups_equivalent_answers_and_the_unanswered():
    assert evaluate.vote_clusters(VOTES[0]["extracted"]) == [0, 1, 1, 0, 1]
    assert evaluate.vote_clusters(VOTES[1]["extracted"]) == [0, 0, 2, 0, 2]
    assert evaluate.vote_clusters(["x+1", "1+x", "2", "(1+x)"]) == [0, 0, 2, 0]


def test_maj_at_k_and_first_sample_pass_at_1_against_a_hand_count():
    summary = evaluate.summarize(VOTES, [1, 3, 4, 5])
    assert summary["maj@3"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert summary["maj@4"] == pytest.approx((0 + 0 + 1 + 0) / 4)  # all three ties go to the first cluster
    assert summary["maj@5"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert "maj@1" not in summary  # it would be pass@1(first)
    assert summary["pass@1(first)"] == pytest.approx(1 / 4)  # only the third problem's first sample is right
    assert summary["pass@1"] == pytest.approx((3 + 2 + 3 + 2) / 20)
    table = evaluate.markdown_table([{"bench": "hand", **summary}], [1, 3, 4, 5]).splitlines()
    header, _, row = ([cell.strip() for cell in line.split("|")] for line in table)
    cells = dict(zip(header, row))
    assert cells["pass@1(first)"] == "0.250" and cells["pass@1"] == "0.500"
    assert (cells["maj@3"], cells["maj@4"], cells["maj@5"]) == ("0.750", "0.250", "0.500")
    assert "maj@1" not in cells and cells["pass@5"] == "1.000"


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
    with Grader(num_workers=2) as g:
        yield g


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_gold_answers_score_100_and_wrong_answers_score_0_on_real_benchmarks(name, grader):
    problems = data.load_problems(f"{name}={shared_file(BENCHMARKS[name])}", split="test")
    dist = distributed.init_distributed()
    sampling = Sampling(n=2)
    right = evaluate.evaluate_problems(AnsweringEngine(problems, lambda p: p["answer"]), problems, None,
                                       sampling, "plain", grader, dist)
    summary = evaluate.summarize(right, [1, 2])
    assert summary["n_problems"] == len(problems) and summary["n_samples"] == 2
    wrong_ids = [r["id"] for r in right if not all(r["correct"])]
    assert summary["pass@1"] == 1.0 and summary["pass@2"] == 1.0, wrong_ids[:5]
    wrong = evaluate.evaluate_problems(AnsweringEngine(problems, lambda p: "-987654.321"), problems, None,
                                       sampling, "plain", grader, dist)
    assert evaluate.summarize(wrong, [1, 2])["pass@1"] == 0.0


def test_cli_writes_summary_and_samples_and_skips_done_problems(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model, tokenizer = models.build_tiny_model(hidden_size=32, num_layers=1, num_heads=1)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval" / "r.json"
    argv = ["--model", str(model_dir), "--bench", "linear", "--limit", "6", "--n", "3", "--k", "1,2",
            "--temperature", "1.0", "--max-tokens", "8", "--template", "plain", "--engine", "hf", "--out", str(out)]
    summaries = evaluate.main(argv)
    assert "| linear |" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(summaries))
    entry = saved[0]
    for key in ("model", "bench", "n_problems", "n_samples", "pass@1", "pass@1(first)", "pass@2", "maj@2",
                "mean_response_tokens", "truncated_frac", "sampling"):
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




def test_vllm_and_hf_engines_give_the_same_greedy_results(tmp_path):
    pytest.importorskip("vllm")
    model_dir = tmp_path / "model"
    model, tokenizer = models.build_tiny_model(hidden_size=128, num_layers=2, num_heads=4, seed=3)
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



# ----------------------------------------------------------------------------------------------
# Resume: torn lines, settings recorded with every record.

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model"), hidden_size=32, num_layers=1, num_heads=1)


def lines_of(path):
    return path.read_text().splitlines()


def test_a_torn_last_line_is_dropped_and_its_problem_redone(tiny_model, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--model", str(tiny_model), "--bench", "linear", "--limit", "4", "--n", "2", "--temperature", "1.0",
            "--max-tokens", "6", "--template", "plain", "--engine", "hf", "--out", str(out)]
    evaluate.main(argv)
    samples = out.with_suffix(".samples.jsonl")
    whole = lines_of(samples)
    samples.write_text("\n".join(whole[:3]) + "\n" + whole[3][: len(whole[3]) // 2])  # the disk filled mid-write
    summary = evaluate.main(argv)[0]
    redone = lines_of(samples)
    assert len(redone) == 4 and redone[:3] == whole[:3]  # the whole records are kept, not generated again
    assert [json.loads(line)["id"] for line in redone] == [json.loads(line)["id"] for line in whole]
    assert summary["n_problems"] == 4 and summary["n_samples"] == 2
    record = json.loads(redone[3])
    assert record["produced_by"] == {"model": str(tiny_model), "split": "test", "seed": 0, "dtype": "float32",
                                     "fallback": [], "engine": "hf", "max_model_len": None, "n": 2,
                                     "temperature": 1.0, "top_p": 1.0, "max_tokens": 6, "template": "plain"}


def test_read_samples_keeps_whole_records_and_refuses_a_damaged_middle(tmp_path):
    path = tmp_path / "s.samples.jsonl"
    records = [{"bench": "b", "id": i, "correct": [True], "extracted": ["1"]} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in records))  # the last record lacks only its newline
    assert evaluate.read_samples(path, is_main=True) == records
    assert path.read_text().endswith("}\n") and len(lines_of(path)) == 3  # the next append starts a new line
    path.write_text(json.dumps(records[0]) + "\n{\"bench\": \"b\", \"id\n" + json.dumps(records[2]) + "\n")
    with pytest.raises(SystemExit, match="line 2 is not JSON"):
        evaluate.read_samples(path, is_main=True)
    path.write_bytes(json.dumps(records[0]).encode() + b"\n\xff\xfe{\n\n")  # a torn tail of any bytes
    assert evaluate.read_samples(path, is_main=True) == records[:1]
    assert path.read_text() == json.dumps(records[0]) + "\n"
    path.write_text(json.dumps({"bench": "b", "id": 0, "correct": [True]}) + "\n")  # no answers: no maj@k
    with pytest.raises(SystemExit, match=r"line 1 is not a record evaluate.py wrote \(it lacks extracted\)"):
        evaluate.read_samples(path, is_main=True)


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    """The samples file of one short run, and the command that wrote it."""
    out = tmp_path_factory.mktemp("first") / "r.json"
    argv = ["--model", str(tiny_model), "--bench", "linear", "--limit", "2", "--n", "2", "--temperature", "1.0",
            "--max-tokens", "6", "--template", "plain", "--engine", "hf"]
    evaluate.main(argv + ["--out", str(out)])
    return argv, out.with_suffix(".samples.jsonl").read_text()


@pytest.mark.parametrize("flag, value", [("--temperature", "0.5"), ("--n", "3"), ("--template", "auto"),
                                         ("--max-tokens", "7"), ("--top-p", "0.9"), ("--seed", "1"),
                                         ("--model", "OTHER"), ("--max-model-len", "64")])
def test_a_rerun_with_other_settings_is_a_one_line_error(tiny_model, first_run, tmp_path, flag, value, monkeypatch):
    argv, before = first_run
    out = tmp_path / "r.json"
    out.with_suffix(".samples.jsonl").write_text(before)
    argv = argv + ["--out", str(out)]
    if value == "OTHER":  # the same weights under another name
        value = str(shutil.copytree(tiny_model, tmp_path / "other-model"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    changed = argv + [flag, value]
    with pytest.raises(SystemExit) as error:
        evaluate.main(changed)
    name = flag.lstrip("-").replace("-", "_")
    assert f"{name}=" in str(error.value) and "\n" not in str(error.value) and "use another --out" in str(error.value)
    assert out.with_suffix(".samples.jsonl").read_text() == before  # nothing overwritten


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the flag or file, exit != 0, no traceback, before the model loads.

BAD_INPUTS = [
    (["--bench", "linear", "--k", "a"], "--k"),
    (["--bench", "linear", "--n", "2", "--k", "1,4"], "--k"),
    (["--bench", "linear", "--template", "chatml"], "--template"),
    (["--bench", "linear", "--limit", "0"], "--limit 0"),
    (["--bench", "linear", "--n", "0"], "--n"),
    (["--bench", "linear", "--n", "8"], "--temperature"),  # greedy n > 1: vLLM would fail after loading
    (["--bench", "linear", "--top-p", "0"], "--top-p"),
    (["--bench", "linear", "--temperature", "-1"], "--temperature"),
    (["--bench", "linear", "--temperature", "nan"], "--temperature"),
    (["--bench", "linear", "--seed", "-1"], "--seed"),
    (["--bench", "linear", "--tensor-parallel-size", "2"], "--tensor-parallel-size"),
    (["--bench", "linear", "--vllm-cpu-kv-cache-gb", "0"], "--vllm-cpu-kv-cache-gb"),
    (["--bench", "linear", "--vllm-cpu-kv-cache-gb", "inf"], "--vllm-cpu-kv-cache-gb"),
    (["--bench", "linear", "linear"], "--bench"),
    (["--protocol", "nope"], "--protocol"),
    (["--protocol", "limr", "--bench", "gsm8k"], "--n and --temperature"),
    (["--bench", "linear", "--template", "qwen-math"], "--template"),  # the tiny tokenizer has no chat template
    ([], "--bench"),
]


@pytest.mark.parametrize("flags, named", BAD_INPUTS, ids=[" ".join(f) or "no-bench" for f, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_the_model_loads(tiny_model, flags, named, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--model", str(tiny_model), "--engine", "hf", *flags])
    assert error.value.code != 0 and named in str(error.value) and "\n" not in str(error.value)


def test_cli_bad_input_exits_with_one_line_and_no_traceback(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for flags, named in [(["--bench", "linear", "--k", "a"], "--k"), (["--bench", str(empty)], "empty.jsonl"),
                         (["--bench", "linear", "--out", str(out_dir)], "--out")]:
        command = [sys.executable, "evaluate.py", "--model", str(tiny_model), "--engine", "hf", *flags]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ----------------------------------------------------------------------------------------------
# Protocols: each value as the upstream code has it (evaluate.PROTOCOLS cites file:line), the
# prompt it renders, and its answer fallback.

# chat_tokenizer and CHAT_TEMPLATE: conftest.py


def settings(*flags):
    return evaluate.parse_args(["--model", "m", *flags])


def test_limr_protocol(chat_tokenizer):
    args = settings("--protocol", "limr")
    assert args.bench == ["aime24", "math500", "amc23"]
    common = dict(top_p=0.95, max_tokens=3072, template="qwen-math")
    assert args.settings == {"aime24": dict(n=4, temperature=0.4, **common),
                             "amc23": dict(n=4, temperature=0.4, **common),
                             "math500": dict(n=1, temperature=0.0, **common)}
    assert evaluate.PROTOCOLS["limr"]["fallback"] == ()
    assert data.format_prompt("Q?", chat_tokenizer, "qwen-math") == (
        "<|system|>Please reason step by step, and put your final answer within \\boxed{}.\n<|user|>Q?\n<|assistant|>")
    # explicit flags override the protocol, benchmark by benchmark
    args = settings("--protocol", "limr", "--temperature", "0.9", "--bench", "math500", "gsm8k", "--n", "2")
    assert args.settings["math500"] == dict(n=2, temperature=0.9, **common) == args.settings["gsm8k"]


def test_open_rs_protocol(chat_tokenizer):
    args = settings("--protocol", "open-rs")
    assert args.bench == ["aime24", "math500", "amc23", "minerva", "olympiadbench"]
    assert all(s == dict(n=1, temperature=0.6, top_p=0.95, max_tokens=32768, template="lighteval-math")
               for s in args.settings.values())
    assert evaluate.PROTOCOLS["open-rs"]["max_model_len"] == 32768
    assert evaluate.PROTOCOLS["open-rs"]["fallback"] == ("answer-line", "last-number")
    assert data.format_prompt("Q?", chat_tokenizer, "lighteval-math") == (  # the user turn only, no system turn
        "<|user|>Solve the following math problem efficiently and clearly.  The last line of your response should "
        "be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' "
        "(without quotes) where ANSWER is just the final number or expression that solves the problem. Think step "
        "by step before answering.\n\nQ?\n<|assistant|>")


def test_qwen_baselines_protocol(chat_tokenizer):
    args = settings("--protocol", "qwen-baselines", "--bench", "aime24", "math500", "gsm8k", "limo")
    common = dict(temperature=0.6, top_p=1.0, max_tokens=32768, template="question")
    assert args.settings == {"aime24": dict(n=10, **common), "math500": dict(n=8, **common),
                             "gsm8k": dict(n=8, **common), "limo": dict(n=8, **common)}
    assert settings("--protocol", "qwen-baselines").bench == ["aime24", "math500"]
    assert evaluate.PROTOCOLS["qwen-baselines"]["fallback"] == ("last-number",)
    assert data.format_prompt("Q?", chat_tokenizer, "question") == "<|user|>Question: Q?\n<|assistant|>"


def test_qwen_math_protocol():
    args = settings("--protocol", "qwen-math")
    assert args.bench == ["gsm8k", "minerva", "olympiadbench", "aime24", "amc23"]
    assert all(s == dict(n=1, temperature=0.0, top_p=1.0, max_tokens=2048, template="qwen-math")
               for s in args.settings.values())
    assert evaluate.PROTOCOLS["qwen-math"]["fallback"] == ("last-number",)


def test_fallbacks_apply_only_inside_their_protocol(grader):
    problems = [{"id": "a", "prompt": "p1", "answer": "12"}, {"id": "b", "prompt": "p2", "answer": "\\frac{1}{2}"}]
    texts = {"p1": "3 boxes of 4 make 12 apples, I think.", "p2": "So half of them.\nAnswer: $\\frac{1}{2}$"}

    class Unboxed:
        def generate(self, prompts, sampling):
            return [[Completion([1], texts[p.split("\n")[0]], [0.0], "stop")] for p in prompts]

    dist = distributed.init_distributed()
    verdicts = {}
    for name in ("limr", "qwen-math", "open-rs"):
        records = evaluate.evaluate_problems(Unboxed(), problems, None, Sampling(n=1), "plain", grader, dist,
                                             fallback=evaluate.PROTOCOLS[name]["fallback"])
        verdicts[name] = [(r["extracted"][0], r["correct"][0]) for r in records]
    assert verdicts["limr"] == [(None, False), (None, False)]  # strict: nothing boxed, nothing right
    assert verdicts["qwen-math"] == [("12", True), ("2", False)]  # Qwen's parser: the last number
    assert verdicts["open-rs"] == [("12", True), ("\\frac{1}{2}", True)]  # the Answer: line first
    assert evaluate.fallback_answer("total 1,234.5 then -7", ("last-number",)) == "-7"
    assert evaluate.fallback_answer("no digits", ("answer-line", "last-number")) is None


# ----------------------------------------------------------------------------------------------
# GPU defaults: bf16 on CUDA, large chunks for vLLM.

def test_dtype_defaults_to_bf16_on_cuda_only(monkeypatch):
    monkeypatch.setattr(evaluate.torch.cuda, "is_available", lambda: True)
    assert evaluate.resolve_dtype("auto") == "bfloat16" and evaluate.resolve_dtype("float32") == "float32"
    monkeypatch.setattr(evaluate.torch.cuda, "is_available", lambda: False)
    assert evaluate.resolve_dtype("auto") == "float32" and evaluate.resolve_dtype("bfloat16") == "bfloat16"
    assert settings("--bench", "linear", "--bf16").dtype == "bfloat16"
    assert settings("--bench", "linear").dtype == "auto"


def test_whole_benchmarks_go_to_the_engine_in_chunks_of_thousands_of_completions(grader):
    problems = data.load_problems("linear", "train", limit=600)
    engine = AnsweringEngine(problems, lambda p: p["answer"])
    calls = []
    generate = engine.generate
    engine.generate = lambda prompts, sampling: calls.append(len(prompts)) or generate(prompts, sampling)
    dist = distributed.init_distributed()
    records = evaluate.evaluate_problems(engine, problems, None, Sampling(n=8), "plain", grader, dist)
    assert calls == [512, 88] and len(records) == 600  # 4096 completions per call: MATH-500 x 8 is one call


def test_a_protocol_runs_end_to_end_and_is_recorded(tiny_model, tmp_path):
    out = tmp_path / "r.json"
    summary = evaluate.main(["--model", str(tiny_model), "--protocol", "qwen-math", "--bench", "linear",
                             "--engine", "hf", "--template", "plain", "--max-tokens", "4", "--limit", "3", "--out", str(out)])[0]
    assert summary["n_problems"] == 3 and summary["n_samples"] == 1 and summary["mean_response_tokens"] == 4
    assert summary["sampling"]["protocol"] == "qwen-math" and summary["sampling"]["top_p"] == 1.0
    records = [json.loads(line) for line in lines_of(out.with_suffix(".samples.jsonl"))]
    assert all(r["produced_by"]["fallback"] == ["last-number"] and r["produced_by"]["max_tokens"] == 4
               for r in records)


# ----------------------------------------------------------------------------------------------
# vLLM sized from the work


def vllm_kwargs(monkeypatch, tiny_model, *flags, world_size=1):
    """What evaluate.build_engine asks make_engine for, on `world_size` ranks."""
    captured = {}
    monkeypatch.setattr(evaluate, "make_engine",
                        lambda kind, *a, **kwargs: captured.update(kwargs, kind=kind))
    args = evaluate.parse_args(["--model", str(tiny_model), "--engine", "vllm", *flags])
    benches = {spec: data.load_problems(spec, split="test", limit=args.limit) for spec in args.bench}
    dist = distributed.Dist(rank=0, world_size=world_size, local_rank=0, device=evaluate.torch.device("cpu"))
    tokenizer = models.load_tokenizer(str(tiny_model))
    evaluate.build_engine(args, None, tokenizer, dist, "float32", args.max_model_len, benches)
    return captured, benches


def test_vllm_is_sized_from_the_benchmarks_prompts_and_lengths(tiny_model, monkeypatch):
    tokenizer = models.load_tokenizer(str(tiny_model))
    def longest(problems):
        return max(len(tokenizer(data.format_prompt(p["prompt"], tokenizer, "plain"),
                                 add_special_tokens=False).input_ids) for p in problems)

    kwargs, benches = vllm_kwargs(monkeypatch, tiny_model, "--bench", "linear", "--limit", "40",
                                  "--max-tokens", "100", "--n", "3", "--temperature", "1")
    assert kwargs["kind"] == "vllm" and kwargs["kv_cache_memory_bytes"] is None  # the engine sizes it
    assert kwargs["max_model_len"] == longest(benches["linear"]) + 100 and kwargs["max_num_seqs"] == 40 * 3
    # on 4 ranks each call holds ceil(40 / 4) problems; a chunk caps a large benchmark (4096 completions)
    kwargs, _ = vllm_kwargs(monkeypatch, tiny_model, "--bench", "linear", "--limit", "40", "--n", "3",
                            "--temperature", "1", world_size=4)
    assert kwargs["max_num_seqs"] == 10 * 3
    kwargs, _ = vllm_kwargs(monkeypatch, tiny_model, "--bench", "linear", "--limit", "200", "--n", "64",
                            "--temperature", "1")
    assert kwargs["max_num_seqs"] == 64 * 64  # 4096 // 64 problems per chunk
    # an explicit length and KV cache win
    kwargs, _ = vllm_kwargs(monkeypatch, tiny_model, "--bench", "linear", "--limit", "5",
                            "--max-model-len", "77", "--vllm-cpu-kv-cache-gb", "0.25")
    assert kwargs["max_model_len"] == 77 and kwargs["kv_cache_memory_bytes"] == 1 << 28
    kwargs, _ = vllm_kwargs(monkeypatch, tiny_model, "--bench", "linear", "--limit", "5", "--engine", "hf")
    assert kwargs == {"kind": "hf", "batch_size": 64}  # vLLM's sizing does not apply to the HF engine
