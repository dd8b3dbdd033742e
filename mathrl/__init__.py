"""mathrl's machinery: you need not open these to follow an algorithm.

The algorithms live in the top-level files (grpo.py, ppo.py, sft.py, lim.py, rewards.py, evaluate.py,
data.py); each step of theirs is written there. What they call from here is plumbing, one concern a file:

  flags.py        flag(): a flag's default, help, choices and bounds in one place; the shared trainer
                  flags; presets on top of defaults; every value checked before anything loads
  distributed.py  Dist (rank, world size, device), collectives, each rank's random stream, stop()
  models.py       the tiny CPU model and tokenizer; loading a hub id, a folder or a GGUF file
  fsdp.py         FSDP2 sharding, the frozen reference, autocast, gradient clipping, the NaN guard, the
                  learning-rate schedule
  sequences.py    the data order; prompt + completion rows; next-token scores in chunks (the memory
                  bound of every log-prob); the Group record a rollout hands on
  checkpoints.py  atomic checkpoints that resume exactly; save_pretrained one tensor at a time
  logs.py         metrics.jsonl (and wandb / tensorboard), rollout metrics, completions.jsonl, and the
                  truncation of logs on resume
  engine.py       generation: vLLM, or transformers' generate; weight pushes after each update
  grader.py       answer extraction and equivalence, in worker processes under a time limit
  memplan.py      the per-GPU memory plan behind --dry-run

Imports run one way: flags, distributed -> models, sequences -> fsdp, logs, checkpoints -> engine,
memplan; grader stands alone. Nothing here imports a top-level file.
"""
