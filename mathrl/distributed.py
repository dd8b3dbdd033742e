"""Processes: `python x.py` is one process, `torchrun --nproc_per_node N x.py` is N ranks.

`Dist` is the project's record of this process's place (rank, world size, device); every function that
talks to the other ranks takes it. torch.distributed itself is imported as `torch_dist`, so the name
`dist` always means the record. Also here: each rank's random stream (seeded, saved, restored) and
`stop`, which ends every rank with one line said once.
"""
import dataclasses
import os
import random
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as torch_dist


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float = 30.0) -> Dist:
    """timeout_minutes: how long a collective waits for the slowest rank before the run is aborted
    (NCCL's default is 10: too short for a rank still writing a large checkpoint or generating)."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        local_rank, device = int(os.environ.get("LOCAL_RANK", 0)), torch.device("cpu")
        # Each CPU rank gets its own threads; ranks fighting over the same cores run ~40x slower.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=timeout_minutes))
        return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device)
    return Dist(0, 1, local_rank, device)


def all_reduce_sum(value, dist: Dist) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float64 if not torch.is_tensor(value) else value.dtype,
                             device=dist.device).clone()
    if dist.enabled:
        torch_dist.all_reduce(tensor)
    return tensor


def all_reduce_max(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    value = value.detach().clone()
    if dist.enabled:
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return value


def all_gather_objects(obj, dist: Dist) -> list:
    if not dist.enabled:
        return [obj]
    gathered = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def barrier(dist: Dist):
    if dist.enabled:
        torch_dist.barrier()


def shutdown(dist: Dist):
    """Leave the process group before exiting: a rank that exits with gloo's threads still alive
    can abort ("terminate called without an active exception") while another rank finishes."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_per_rank(seed: int, dist: Dist):
    """Give each rank its own random stream; call it after the models are built.

    Models must be initialised identically on every rank (a new critic value head, the tiny model),
    so every rank first seeds with `seed`. Sampling must not be identical: with one stream on every
    rank, rank r's k-th draw equals rank 0's, and the completions of different ranks are correlated,
    which every estimator here assumes they are not. Rank 0 keeps the stream it has (a one-process run
    with the HF engine samples as before; the vLLM engine derives each call's stream from this one and the
    rank, engine.rank_stream); rank r > 0 reseeds from (seed, r), hashed so no two (seed, rank) pairs
    share a stream. The checkpoint saves each rank's RNG state, so a resumed run continues each stream."""
    if dist.rank > 0:
        seed_everything(int(np.random.SeedSequence([seed, dist.rank]).generate_state(1)[0]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def stop(message: str, dist: Dist):
    """Exit every rank with `message` said once. Under torchrun the first rank to exit gets the others
    killed: rank 0 says it, and has cleaned up, before any rank leaves."""
    if not dist.enabled:
        raise SystemExit(message)
    if dist.is_main:
        print(message, file=sys.stderr, flush=True)
    barrier(dist)
    raise SystemExit(1)
