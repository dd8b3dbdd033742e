"""Multi-node is torchrun's job: two "nodes" on localhost meeting through a c10d rendezvous run
sft.py and grpo.py exactly as two ranks on one node do.

On real machines the same command runs once per node, with --node-rank 0 and 1 and the first node's
address as the rendezvous endpoint (README, "Running it for real")."""
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str]):
    """One process per "node", both started at once, as two machines would start them."""
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "mathrl-test"]
    nodes = [subprocess.Popen(launcher + [f"--node_rank={n}"] + args, cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in range(2)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]


def one_node(args: list[str], nproc: int):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run(launcher + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_sft_and_grpo_on_two_nodes_equal_two_ranks_on_one(tmp_path):
    sft = ["sft.py", "--preset", "tiny", "--max-steps", "3", "--batch-size", "8", "--micro-batch-size", "2",
           "--save-steps", "100"]
    two_nodes(sft + ["--output-dir", str(tmp_path / "sft-nodes")])
    one_node(sft + ["--output-dir", str(tmp_path / "sft-one")], nproc=1)
    assert max_difference(tmp_path / "sft-nodes", tmp_path / "sft-one") < 2e-5   # same step as one process

    grpo = ["grpo.py", "--preset", "tiny", "--model", str(tmp_path / "sft-one"), "--max-steps", "2",
            "--prompts-per-step", "4", "--num-generations", "4", "--micro-batch-size", "8",
            "--max-completion-length", "24", "--lr", "1e-3", "--save-steps", "100",
            "--rewards", "cosine:1"]  # a 3-step SFT model is never right: length-scaled rewards still differ
    two_nodes(grpo + ["--output-dir", str(tmp_path / "grpo-nodes")])
    one_node(grpo + ["--output-dir", str(tmp_path / "grpo-ranks")], nproc=2)
    # the same two ranks with the same per-rank random streams: the same samples, the same updates
    assert max_difference(tmp_path / "grpo-nodes", tmp_path / "grpo-ranks") < 1e-6
    assert max_difference(tmp_path / "grpo-nodes", tmp_path / "sft-one") > 1e-5   # and it trained
