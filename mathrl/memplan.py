"""The memory plan: what one GPU will hold for a training config, worked out before anything loads.

    python grpo.py --preset limo --dry-run --plan-gpus 8       # the budget of one of 8 GPUs, then exit
    torchrun --nproc_per_node 8 ppo.py --preset limr --dry-run  # the same, for this launch's ranks

`--dry-run` exits 0 when the config is predicted to fit, 1 (naming the flag to change) when not;
every real run prints the plan's two-line summary on rank 0. No model is downloaded: shapes come
from KNOWN_MODELS, a local folder's config.json, or the Hugging Face cache.

The arithmetic, per GPU, with W ranks sharing each model (FSDP2) and P parameters per model:

  resident, all run long  fp32 master weights 4P/W and Adam's two fp32 moments 8P/W of each model
                          trained (PPO: actor and critic); the frozen reference 2P/W in bf16 under
                          FSDP (fp32 in one process: fsdp.frozen_dtype)
  during an update        fp32 gradients 4P/W (reduce-scattered after every micro-batch), then the
                          larger of two moments. Inside the backward of a layer: what FSDP has
                          gathered (the root group, embeddings and LM head, stays gathered for the
                          whole forward and backward; two layers at a time, one being prefetched) with
                          the unsharded gradients of the root and of one layer; the activations (with
                          checkpointing: each layer's input, one layer recomputed, the gradients inside
                          its backward); the log-prob chunk (chunk tokens x vocab x 16-24 bytes). At the
                          end of backward: the root's gradients and their fp32 reduce-scatter copy.
  during generation       vLLM's --vllm-gpu-memory-utilization share of the GPU (its bf16 weights,
                          activations, KV cache); the training state stays, gradients are freed
  always                  RESERVE_GIB for the CUDA context, NCCL buffers and vLLM asleep

One process (W = 1) has no FSDP: it runs fp32 weights under bf16 autocast, which caches a bf16 copy of
every trained weight and keeps the residual stream in fp32. The weights, gradient and Adam terms are
exact counts (tests/test_memplan.py checks them against the tensors FSDP holds on 1 and 2 ranks); the
activations of one decoder layer were counted on a Qwen2 layer (tests/test_memplan.py counts them again).
Against tools/bench/memory.py's CPU measurements (52M and 134M models, 1-4 ranks, 512-4096 tokens) the
predicted update peak came within -8% to +34% of the measured one (before the terms of issue 23);
`bash tools/gpu_check.sh` sets it beside torch.cuda.max_memory_allocated at 1.5B (docs/memory.md).
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mathrl import distributed, models

GiB = 1 << 30
# Allowance, not a measurement: CUDA context ~0.5 GiB per process, NCCL buffers ~1 GiB, vLLM asleep
# (CUDA graphs, its own context) ~1 GiB, and allocator fragmentation.
RESERVE_GIB = 4.0
# vLLM profiles a forward pass of max_num_batched_tokens at start-up and keeps that much free for
# activations (sampler logits included): an allowance for it.
VLLM_ACTIVATION_GIB = 2.0


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer of the Qwen2/Llama family: what its memory depends on."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool               # input embedding and LM head share one matrix
    qkv_bias: bool = True    # Qwen2 has biases on q, k and v; Llama does not

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_parameters(self) -> int:
        h, kv, bias = self.hidden, self.kv_dim, int(self.qkv_bias)
        attention = h * h + 2 * h * kv + h * h + bias * (h + 2 * kv)  # q, k, v, o
        return attention + 3 * h * self.intermediate + 2 * h            # gate, up, down; two RMSNorms

    def root_parameters(self) -> int:
        """Embedding, final norm and (untied) LM head: what FSDP's root group holds."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + self.root_parameters()

    def critic_parameters(self) -> int:
        """ppo.load_critic: the same body with a Linear(hidden, 1) head in place of the LM head."""
        return self.parameters() - (0 if self.tied else self.vocab * self.hidden) + self.hidden + 1


# Each from the model's published config.json on the Hugging Face hub
# (https://huggingface.co/<name>/blob/main/config.json): hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings.
KNOWN_MODELS = {
    "Qwen/Qwen2.5-Math-1.5B": Shape(1536, 28, 12, 2, 8960, 151936, tied=True),
    "Qwen/Qwen2.5-Math-7B": Shape(3584, 28, 28, 4, 18944, 152064, tied=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": Shape(1536, 28, 12, 2, 8960, 151936, tied=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": Shape(3584, 28, 28, 4, 18944, 152064, tied=False),
    "Qwen/Qwen2.5-1.5B-Instruct": Shape(1536, 28, 12, 2, 8960, 151936, tied=True),
    "Qwen/Qwen2.5-7B-Instruct": Shape(3584, 28, 28, 4, 18944, 152064, tied=False),
    "Qwen/Qwen2.5-32B-Instruct": Shape(5120, 64, 40, 8, 27648, 152064, tied=False),
}


def shape_from_config(config: dict) -> Shape:
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    return Shape(hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
                 kv_heads=config.get("num_key_value_heads") or heads,
                 intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                 tied=bool(config.get("tie_word_embeddings", False)),
                 qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)))


def model_shape(name_or_path: str) -> Shape | None:
    """The shape of --model without loading it: the table, `tiny`, a local config.json, the HF cache."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]
    if name_or_path == "tiny":  # models.build_tiny_model's defaults
        return Shape(128, 4, 4, 2, 512, len(models.build_tiny_tokenizer()), tied=True)
    path = Path(os.path.expanduser(name_or_path))
    config = path / "config.json"
    if not config.exists() and not path.exists():
        try:  # a hub id downloaded before: read its cached config, never download
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
            config = Path(cached) if isinstance(cached, str) else config
        except Exception:  # not a valid repo id, or no hub library: the shape is unknown
            pass
    try:  # a config of another architecture (or not JSON) has no shape the plan knows
        return shape_from_config(json.loads(config.read_text())) if config.is_file() else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------
# The budget of one GPU for one trainer's config.


@dataclass
class Plan:
    header: str
    rows: list            # (phase, what, bytes)
    update_bytes: float   # peak while training
    generation_bytes: float
    gpu_bytes: float
    notes: list           # e.g. vLLM's KV-cache capacity
    advice: list          # empty when it fits

    @property
    def fits(self) -> bool:
        return not self.advice

    def summary(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit: " + "; ".join(self.advice)
        generation = (f"generation {self.generation_bytes / GiB:.1f} GiB" if self.generation_bytes
                      else "no generation")
        return (f"{self.header}\n  peak per GPU: update {self.update_bytes / GiB:.1f} GiB, {generation}, "
                f"of {self.gpu_bytes / GiB:.0f} GiB: {verdict}")

    def table(self) -> str:
        lines = [self.header]
        for phase, what, size in self.rows:
            lines.append(f"  {phase:<11} {what:<58} {size / GiB:8.2f} GiB")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines) + "\n" + self.summary().split("\n", 1)[1]


def count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e8 else f"{parameters / 1e6:.2f}M"


# Bytes per token and per hidden unit that Qwen2RMSNorm keeps in fp32 in one decoder layer, by how the
# layer computes. Its forward (transformers 5.19 models/qwen2/modeling_qwen2.py:240-244) casts its input
# to fp32 (:241), and pow (:242) and the multiplication by rsqrt (:243) save that fp32 tensor for
# backward: with bf16 weights (FSDP's bf16 policy) a 4-byte copy of each of the two norms' inputs, where
# the old estimate charged 2 bytes. In fp32 the cast is the input itself, and the second norm's input
# (the mid-layer residual) is what it saves. Under autocast (one process) the residual stream is fp32
# and the norms' normalised values stay fp32 too (mul is not an autocast op). Counted with
# saved_tensors_hooks on a Qwen2DecoderLayer: tests/test_memplan.py checks the whole per-layer sum.
NORM_FP32_BYTES = {"bf16": 8, "fp32": 4, "autocast": 14}


def regime(compute_bytes: int, fsdp: bool) -> str:
    """How a layer computes: bf16 weights (FSDP's bf16 policy), fp32, or fp32 weights under autocast."""
    return "fp32" if compute_bytes == 4 else "bf16" if fsdp else "autocast"


def layer_activation_bytes(shape: Shape, compute_bytes: int, fsdp: bool) -> float:
    """Per token, what one decoder layer saves for backward: in the compute dtype, the inputs of the
    q, k, v, o, gate, up and down projections and the attention's q, k, v and output (6 h + 2 kv values)
    and the MLP's gate, up, silu(gate) and product (4 intermediate); plus RMSNorm's fp32 values."""
    h, kv, intermediate = shape.hidden, shape.kv_dim, shape.intermediate
    norms = NORM_FP32_BYTES[regime(compute_bytes, fsdp)] * h
    return (6 * h + 2 * kv + 4 * intermediate) * compute_bytes + norms


def activation_bytes(shape: Shape, tokens: int, compute_bytes: int, checkpointing: bool,
                     fsdp: bool = True) -> float:
    """The activations of one micro-batch of `tokens` tokens at the peak of its backward.

    With checkpointing each layer's input is kept (fp32 under autocast: the residual stream) and one
    layer at a time is recomputed in backward. Inside a layer's backward, beside its saved tensors,
    autograd holds one intermediate-sized gradient and hidden-sized ones for the layer's output and
    input: (intermediate + 2 h) x compute bytes per token (torch's MemTracker over a Qwen2 layer's
    forward and backward, tests/test_memplan.py; the old plan charged none of it).
    The root adds the final norm's fp32 input and its output, the last hidden states that the log-prob
    chunks read."""
    residual_bytes = 4 if regime(compute_bytes, fsdp) == "autocast" else compute_bytes
    one_layer = tokens * layer_activation_bytes(shape, compute_bytes, fsdp)
    backward = tokens * (shape.intermediate + 2 * shape.hidden) * compute_bytes
    final_norm = tokens * shape.hidden * (4 + compute_bytes)
    if checkpointing:
        return shape.layers * tokens * shape.hidden * residual_bytes + one_layer + backward + final_norm
    return shape.layers * one_layer + backward + final_norm


def logprob_bytes(shape: Shape, tokens: int, chunk: int | None, compute_bytes: int,
                  temperature: bool = True) -> float:
    """One chunk's log-prob computation at the peak of its backward (sequences.next_token_scores): four
    fp32 [chunk, V] tensors (the fp32 logits logsumexp saved, its exp temporary, its gradient, gather's
    scattered gradient), a fifth where the head divides by the sampling temperature (grpo, ppo; not
    sft), and under bf16 the bf16 logits and their bf16 gradient beside them. Counted, not estimated:
    tests/test_memplan.py tracks every live [n, V] tensor through forward and backward of the real heads
    (fp32: 16 and 20 B per element; bf16: 18.9 and 22.9 against the 20 and 24 charged here).
    Without chunking (chunk None) the whole micro-batch is one chunk."""
    chunk = tokens if not chunk else min(chunk, tokens)
    per_element = 4 * 4 + (4 if temperature else 0) + (2 + 2 if compute_bytes == 2 else 0)
    return chunk * shape.vocab * per_element


def root_parameters(shape: Shape, critic: bool = False) -> int:
    """A critic's root has a Linear(hidden, 1) head where the LM head was."""
    root = shape.root_parameters()
    return root + (shape.hidden + 1 - (0 if shape.tied else shape.vocab * shape.hidden) if critic else 0)


def gathered_bytes(shape: Shape, world_size: int, compute_bytes: int, critic: bool = False,
                   fsdp: bool | None = None, adapters_per_layer: int = 0) -> float:
    """FSDP's unsharded working set inside a layer's backward: the root group (gathered for the whole
    forward and backward) and two layers in the compute dtype, the unsharded gradients of the root (the
    LM head's lives through the backward) and of one layer, and that layer's gradients copied into fp32
    to be reduce-scattered. Without FSDP (fsdp None: one process), bf16 autocast caches a bf16 copy of
    every trained weight it uses. With LoRA (adapters_per_layer > 0) the frozen base has no gradients:
    only the layer's adapters have one, and autocast caches no copy of a frozen weight."""
    root, layer = root_parameters(shape, critic), shape.layer_parameters()
    if not (world_size > 1 if fsdp is None else fsdp):
        trained = shape.layers * adapters_per_layer if adapters_per_layer else root + shape.layers * layer
        return trained * 2 if compute_bytes == 2 else 0.0
    if adapters_per_layer:
        return (root + 2 * layer) * compute_bytes + adapters_per_layer * (compute_bytes + 4)
    return (root + 2 * layer) * compute_bytes + (root + layer) * compute_bytes + layer * 4


def root_reduce_bytes(shape: Shape, world_size: int, compute_bytes: int, critic: bool = False,
                      fsdp: bool | None = None) -> float:
    """The end of backward, when the root group's gradients are reduce-scattered: its unsharded
    gradients in the compute dtype, the fp32 input of the reduce-scatter (the whole root, 4 B each:
    ~4 GiB for 7B's untied embedding and LM head) and its fp32 output shard. In torch 2.13's
    fsdp/_fully_shard/_fsdp_collectives.py foreach_reduce allocates the reduce_dtype input at :597-601
    and copies the gradients in before freeing them (:603-606), the output at :612-616; the root's
    parameters are resharded before (_fsdp_param_group.py:637-638, post_backward) and the previous
    layer's input buffer is released first (:645-658; at most reduce_scatter_max_input_buffers = 1
    kept, :112). The root's forward inputs (token ids) need no gradient, so its post-backward runs in
    the final callback once every layer is done (_fsdp_state.py:411-414), when the activations are
    gone: a moment of its own, not one more term beside the layer's. Without FSDP: nothing."""
    if not (world_size > 1 if fsdp is None else fsdp):
        return 0.0
    root = root_parameters(shape, critic)
    return root * compute_bytes + root * 4 + root * 4 / world_size


def make_plan(trainer: str, cfg, world_size: int, gpu_memory_gb: float,
              fsdp: bool | None = None) -> Plan | None:
    """The budget of one GPU for `cfg` of grpo.py, ppo.py or sft.py; None if the shape is unknown.
    fsdp None: sharded iff world_size > 1, as the trainers do (True plans FSDP on one rank, as
    tests/test_gpu.py and tools/gpu_check.py run it)."""
    shape = model_shape(cfg.model)
    if shape is None:
        return None
    W, gpu = world_size, gpu_memory_gb * GiB
    fsdp = W > 1 if fsdp is None else fsdp
    cb = 2 if cfg.bf16 else 4
    policy = shape.parameters()
    critic_shape, critic, with_reference = None, 0, False
    seq = cfg.max_length if trainer == "sft" else cfg.max_prompt_length + cfg.max_completion_length
    if trainer == "ppo":
        critic_shape = model_shape(cfg.critic) if cfg.critic else shape
        if critic_shape is None:
            return None
        critic, with_reference = critic_shape.critic_parameters(), cfg.kl_coef > 0 and not cfg.lora_rank
    elif trainer == "grpo":
        with_reference = cfg.beta > 0 and not getattr(cfg, "lora_rank", 0)  # LoRA: the policy, adapters off
    trained = policy + critic
    weights = trained
    adapters = 0
    if getattr(cfg, "lora_rank", 0):  # LoRA: the base frozen in fp32; gradients, Adam of A, B (and PPO's critic)
        from mathrl import lora
        try:
            adapters = lora.adapter_parameter_count(shape, cfg.lora_rank, cfg.lora_targets)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        trained = adapters + critic
        weights = policy + trained
    budget = getattr(cfg, "max_tokens_per_micro_batch", 0)  # rows are then cut by tokens, not counted
    tokens = budget or cfg.micro_batch_size * seq
    chunk = getattr(cfg, "logprob_chunk_size", None)

    rows = [("resident", f"weights, fp32, 1/{W} of {count(weights)} parameters"
                         f"{f' ({count(trained)} trained)' if weights != trained else ''}", 4 * weights / W),
            ("resident", "Adam moments, fp32, sharded", 8 * trained / W)]
    if with_reference:  # fsdp.frozen_dtype: bf16 only under FSDP with bf16
        reference_bytes = 2 if cfg.bf16 and fsdp else 4
        rows.append(("resident", f"reference model, {'bf16' if reference_bytes == 2 else 'fp32'}, sharded",
                     reference_bytes * policy / W))
    resident = sum(size for _, _, size in rows)

    # during an update: the gradients, then the larger of two moments: inside a layer's backward (what
    # FSDP gathered, activations, a log-prob chunk) and the root's reduce-scatter at its end
    grads = 4 * trained / W
    checkpointing = cfg.gradient_checkpointing
    lora_layer = adapters // shape.layers  # adapters of one layer (0 without LoRA)
    gathered = gathered_bytes(shape, W, cb, fsdp=fsdp, adapters_per_layer=lora_layer)
    policy_activations = activation_bytes(shape, tokens, cb, checkpointing, fsdp)
    logprobs = logprob_bytes(shape, tokens, chunk, cb, temperature=trainer != "sft")
    policy_step = gathered + policy_activations + logprobs
    rows.append(("update", "gradients, fp32, sharded", grads))
    rows.append(("update", (f"gathered by FSDP: root + 2 layers, {'adapters' if lora_layer else 'unsharded'} "
                            "gradients") if fsdp else "bf16 copies of the trained weights cached by autocast",
                 gathered))
    batch = f"a budget of {budget}" if budget else f"{cfg.micro_batch_size} x {seq}"
    rows.append(("update", f"activations of {batch} tokens, "
                           f"{'checkpointed' if checkpointing else 'NOT checkpointed'}", policy_activations))
    rows.append(("update", f"log-probs: {min(chunk or tokens, tokens)} tokens x {shape.vocab} vocabulary "
                           f"at once{'' if chunk else ' (unchunked)'}", logprobs))
    step = policy_step
    root_reduce = 0.0 if lora_layer else root_reduce_bytes(shape, W, cb, fsdp=fsdp)  # LoRA: root frozen
    if critic_shape is not None:  # the critic's step alternates with the actor's: the larger one counts
        critic_step = gathered_bytes(critic_shape, W, cb, critic=True, fsdp=fsdp) + \
            activation_bytes(critic_shape, tokens, cb, checkpointing, fsdp)
        rows.append(("update", "critic micro-batch: gathered + activations (alternates)", critic_step))
        step = max(policy_step, critic_step)
        root_reduce = max(root_reduce, root_reduce_bytes(critic_shape, W, cb, critic=True, fsdp=fsdp))
    if root_reduce:  # under FSDP, of a trained root (LoRA freezes the policy's; PPO's critic trains its own)
        rows.append(("update", "root's gradients, fp32 reduce-scatter copy (alternates)",
                     root_reduce))
    rows.append(("always", "reserve: CUDA context, NCCL, vLLM asleep, fragmentation", RESERVE_GIB * GiB))
    update = resident + grads + max(step, root_reduce) + RESERVE_GIB * GiB

    # during generation: vLLM's share, or the HF engine's KV cache
    notes, advice = [], []
    kv_per_token = 2 * shape.layers * shape.kv_dim * cb
    engine = getattr(cfg, "engine", None)
    if engine == "vllm":
        share = cfg.vllm_gpu_memory_utilization * gpu
        vllm_weights = cb * policy
        kv_room = share - vllm_weights - VLLM_ACTIVATION_GIB * GiB
        sequences = max(0.0, kv_room) / (kv_per_token * seq)
        rows.append(("generation", f"vLLM: {cfg.vllm_gpu_memory_utilization:g} of the GPU", share))
        notes.append(f"vLLM's share: weights {vllm_weights / GiB:.1f} GiB, "
                     f"activations {VLLM_ACTIVATION_GIB:.0f} GiB, KV cache {max(0.0, kv_room) / GiB:.1f} GiB "
                     f"= {sequences:.1f} sequences of {seq} tokens")
        generation = resident + share + RESERVE_GIB * GiB
        if sequences < 1:
            advice.append(f"vLLM's share cannot hold its weights and one {seq}-token sequence: raise "
                          f"--vllm-gpu-memory-utilization (now {cfg.vllm_gpu_memory_utilization:g})")
        if generation > gpu:
            room = (gpu - resident - RESERVE_GIB * GiB) / gpu
            advice.append(f"generation needs {generation / GiB:.1f} GiB: lower --vllm-gpu-memory-utilization "
                          f"(now {cfg.vllm_gpu_memory_utilization:g}, at most {max(0.0, room):.2f} fits)"
                          + ("" if room * gpu > vllm_weights + VLLM_ACTIVATION_GIB * GiB + kv_per_token * seq
                             else ", which is too little: use more GPUs"))
    elif engine == "hf":
        cache = cfg.micro_batch_size * 4 * seq * kv_per_token  # make_engine's batch_size
        rows.append(("generation", f"HF engine KV cache, {cfg.micro_batch_size * 4} sequences", cache))
        generation = resident + cache + gathered + RESERVE_GIB * GiB
    else:
        generation = 0.0

    if update > gpu:  # name the flag that moves the largest part
        parts = {"state": resident + grads + max(gathered, root_reduce), "activations": policy_activations,
                 "logprobs": logprobs}
        largest = max(parts, key=parts.get)
        if largest == "activations" and not checkpointing:
            advice.append("turn on --gradient-checkpointing")
        elif largest == "activations" and cfg.micro_batch_size > 1:
            advice.append(f"lower --micro-batch-size (now {cfg.micro_batch_size})")
        elif largest == "activations":
            length_flag = "--max-length" if trainer == "sft" else "--max-completion-length"
            advice.append(f"shorten {length_flag} (now {seq} tokens with the prompt)")
        elif largest == "logprobs":
            advice.append(f"lower --logprob-chunk-size (now {chunk or 'unchunked'})")
        else:
            advice.append(f"the sharded state needs more GPUs than {W}: raise torchrun --nproc_per_node "
                          f"(or --plan-gpus for the plan)")
        advice[-1] = f"the update needs {update / GiB:.1f} GiB: " + advice[-1]
    header = (f"memory plan: {trainer}, {cfg.model} ({count(policy)} parameters"
              f"{f', critic {count(critic)}' if critic else ''}), {W} GPU(s) x {gpu_memory_gb:g} GiB, "
              f"{'bf16' if cfg.bf16 else 'fp32'}")
    return Plan(header, rows, update, generation, gpu, notes, advice)


def report(trainer: str, cfg, dist):
    """Print the plan on rank 0 (the whole table under --dry-run, then exit: 0 if it fits, 1 if not)."""
    # the flags' ranges were checked by flags.check_flags when they were parsed
    if not cfg.dry_run and dist.device.type != "cuda":
        return None  # a GPU budget means nothing to a CPU run (--dry-run still prints it anywhere)
    plan = make_plan(trainer, cfg, cfg.plan_gpus or dist.world_size, cfg.gpu_memory_gb)
    if plan is None:
        critic = f" or --critic {cfg.critic!r}" if getattr(cfg, "critic", "") else ""
        message = (f"the shape of --model {cfg.model!r}{critic} is unknown offline "
                   f"(not in memplan.KNOWN_MODELS, no config.json found)")
        if cfg.dry_run:
            distributed.shutdown(dist)
            raise SystemExit(f"error: --dry-run: {message}")
        if dist.is_main:
            print(f"memory plan: skipped, {message}")
        return None
    if dist.is_main:
        print(plan.table() if cfg.dry_run else plan.summary() + " (--dry-run for the breakdown)")
    if cfg.dry_run:
        distributed.shutdown(dist)
        raise SystemExit(0 if plan.fits else 1)
    return plan
