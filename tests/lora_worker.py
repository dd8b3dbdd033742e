"""One SGD step on the LoRA adapters of a tiny model; run as a script (1 process) or under torchrun
(N ranks, FSDP2). Writes OUT/result.pt (merged weights before and after the step, the loss, which
parameters got gradients, whether load_adapter into a fresh sharded model gives the same merged
weights) and OUT/adapter (save_adapter's folder): tests/test_lora.py checks N ranks take one process's step.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mathrl import distributed, fsdp, lora, models  # noqa: E402

ROWS, LENGTH = 4, 12


def lora_model(dist):
    """The same adapted model on every rank, B random (B = 0 would leave A's gradient zero)."""
    model, _ = models.build_tiny_model(hidden_size=32, num_layers=2, num_heads=2, seed=0)
    lora.apply_lora(model, rank=4, alpha=8.0, targets="q,k,v,o,gate,up,down", dropout=0.0, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * 0.1)
    return fsdp.shard_model(model, dist, bf16=False, gradient_checkpointing=False)


def main(out: str):
    dist = distributed.init_distributed()
    model = lora_model(dist)
    before = lora.merged_state_dict(model)
    optimizer = torch.optim.SGD(lora.trainable_parameters(model), lr=0.5)
    tokens = torch.randint(3, 90, (ROWS, LENGTH), generator=torch.Generator().manual_seed(5))
    mine = tokens[dist.rank::dist.world_size]  # equal shares: FSDP's gradient mean is the batch mean
    logits = model(input_ids=mine).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1))
    loss.backward()
    with_grad = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    optimizer.step()
    merged = lora.merged_state_dict(model)
    lora.save_adapter(model, Path(out) / "adapter", "tiny", dist)
    fresh = lora_model(dist)  # the weights before the step: load_adapter must bring the step's A and B
    lora.load_adapter(fresh, Path(out) / "adapter")
    reloaded = lora.merged_state_dict(fresh)
    mean_loss = float(distributed.all_reduce_sum(loss.detach(), dist)) / dist.world_size
    if dist.is_main:
        torch.save({"before": before, "merged": merged, "loss": mean_loss, "with_grad": with_grad,
                    "reload_equal": all(torch.equal(merged[k], reloaded[k]) for k in merged)},
                   Path(out) / "result.pt")
    distributed.shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1])
