"""Sequences: which examples a step takes, how prompt + completion rows are laid out, and the
next-token scores of those rows computed a chunk of positions at a time (the memory bound of every
log-prob in the trainers). Also the Group record an RL trainer's rollout hands on.

The data order comes first: the same global batches whatever the number of ranks, and after a resume.
"""
import collections
import dataclasses
import types

import torch
import torch.utils.checkpoint

from mathrl import distributed


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """The examples of global batch `step`: a fixed stream of seeded per-epoch permutations.

    It depends on nothing but the step, so a resumed run and a run on any number of ranks see
    exactly the same batches.
    """
    indices, orders = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            orders[epoch] = torch.randperm(num_examples, generator=generator)
        indices.append(int(orders[epoch][offset]))
    return indices


# ----------------------------------------------------------------------------------------------
# Prompt + completion rows and the log-probs of their tokens.


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device):
    """Right-padded prompt+completion rows, and completion_mask marking the completion's tokens.

    No attention mask: with the pads after the real tokens, causal attention never lets a real
    token see one, so the log-probs are those of each row alone. (The pads' own outputs are
    garbage, and completion_mask drops them.) Measured on CPU, passing a mask costs about the same."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.float32)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        completion_mask[row, len(p):len(p) + len(c)] = 1
    return input_ids.to(device), completion_mask.to(device)


def pack_logprobs(logprobs: list[list[float]], prompt_lengths: list[int], width: int, device):
    """The engine's log-probs laid out like next_token_scores' output (position t predicts token t+1)."""
    out = torch.zeros((len(logprobs), width - 1), device=device)
    for row, (lp, start) in enumerate(zip(logprobs, prompt_lengths)):
        out[row, start - 1:start - 1 + len(lp)] = torch.tensor(lp)
    return out


def token_budget_micro_batches(lengths: list[int], max_tokens: int, dist) -> list[list[int]]:
    """--max-tokens-per-micro-batch: the row indices of each micro-batch, rows in order of length, as many
    consecutive rows as fit max_tokens padded tokens (rows x the longest: pack right-pads to it), so long
    rows go few to a micro-batch and short ones many. Every rank gets as many micro-batches (a rank with
    fewer is given empty ones, to run with weight 0): FSDP's collectives inside them must pair up. The
    losses' normalisers are global counts, so the step equals that of any other grouping of the rows."""
    if lengths and max(lengths) > max_tokens:  # the trainers check the flag against their length limits
        raise ValueError(f"a row of {max(lengths)} tokens exceeds --max-tokens-per-micro-batch {max_tokens}")
    batches = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if not batches or (len(batches[-1]) + 1) * lengths[i] > max_tokens:  # row i is the longest yet
            batches.append([])
        batches[-1].append(i)
    most = int(distributed.all_reduce_max(torch.tensor(len(batches), device=dist.device), dist).item())
    return batches + [[] for _ in range(most - len(batches))]


LOGPROB_CHUNK_SIZE = 1024  # the default of every trainer's --logprob-chunk-size


def next_token_scores(model, input_ids, head, chunk_size: int = LOGPROB_CHUNK_SIZE):
    """head(logits, next_tokens) at every position t < T - 1 of the [B, T] rows: logits [n, V] (fp32) is
    the model's output at n positions, next_tokens [n] the tokens t + 1 those positions predict. head
    returns a pair of [n] tensors (or None for the second); they come back as [B, T - 1] each.

    This is plumbing for the memory bound; the algorithm files write the head (the log-softmax at the
    sampling temperature). The full-vocabulary logits of a micro-batch are never built: 4 x 3584
    positions x 152k vocabulary is 8 GiB in fp32, and logsumexp, softmax and backward multiply that.
    The model runs to its last hidden states, then lm_head and head run on `chunk_size` positions at a
    time under torch.utils.checkpoint: in backward each chunk's logits are recomputed, so one chunk's
    logits exist at a time, forward or backward, and the result equals the unchunked computation. (A lone
    chunk is checkpointed too: nothing vocabulary-wide outlives the forward, whatever head returns.) The
    recompute keeps what a chunk saved until backward reaches it: a head output with gradient that the
    loss never uses (an entropy kept for the metrics) would hold two [chunk, V] fp32 tensors per chunk
    for as long as it lives, so such an output must be computed under torch.no_grad(). (It
    takes the logits to be lm_head(last hidden state), as Qwen2 and Llama compute them; a model that
    scales or caps its logits, like Gemma 2, would need that step here too.)"""
    forward = getattr(model, "next_token_scores", None) or types.MethodType(model_next_token_scores, model)
    first, second = forward(input_ids, head, chunk_size)
    shape = (input_ids.shape[0], input_ids.shape[1] - 1)
    return first.view(shape), None if second is None else second.view(shape)


def model_next_token_scores(model, input_ids, head, chunk_size: int):
    """next_token_scores' model pass, flat over rows x positions; shard_model registers it with FSDP as a
    forward method. (It returns whole tensors, not views: FSDP's backward hooks on a view can be lost.)"""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    # Position t predicts token t + 1: the last position predicts nothing, the first token is not predicted.
    rows, width = input_ids.shape[0], input_ids.shape[1] - 1
    hidden, targets = hidden[:, :-1].reshape(rows * width, -1), input_ids[:, 1:].reshape(-1)
    lm_head = model.get_output_embeddings()
    chunk_head = lambda h, y: head(lm_head(h).float(), y)  # fp32: bf16 would round pi / pi_old by ~1%
    firsts, seconds = [], []
    for start in range(0, len(targets), chunk_size):
        args = (hidden[start:start + chunk_size], targets[start:start + chunk_size])
        first, second = (torch.utils.checkpoint.checkpoint(chunk_head, *args, use_reentrant=False)
                         if torch.is_grad_enabled() else chunk_head(*args))
        firsts.append(first)
        seconds.append(second)
    return torch.cat(firsts), None if seconds[0] is None else torch.cat(seconds)


@dataclasses.dataclass
class Group:
    """One prompt's completions and their rewards: what an RL trainer's rollout step hands on."""
    problem: int        # index of the prompt in the trainer's problem list
    position: int       # place in the stream of batches, step * prompts_per_step + j: epoch = position // N
    completions: list   # engine.Completion each: token_ids, text, logprobs, finish_reason
    rewards: dict       # reward name (and "correct", "total") -> one value per completion

    def summary(self, keep_text: bool) -> "Group":
        """This group as logging needs it, cheap to gather from every rank: each completion's text (only
        if keep_text), length and finish reason, without its token ids and log-probs (PPO at LIMR's
        scale samples 8,192 completions of up to 3,072 tokens a step: gigabytes as Python lists)."""
        return Group(self.problem, self.position, [Sampled(c.text if keep_text else "", c.num_tokens,
                                                           c.finish_reason) for c in self.completions],
                     self.rewards)


Sampled = collections.namedtuple("Sampled", "text num_tokens finish_reason")  # Group.summary's completions
