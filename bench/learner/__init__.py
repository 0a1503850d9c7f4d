"""The parts of bench/gpu_learner_step.py (the CLI and the order of work stay there):

  models.py     model shapes, transformers / in-house model building, the weight copy
  workload.py   the RL-like sequences, their micro-batches (packed and padded), FLOPs per step
  losses.py     the loss of each provider (the learner's pg loss, eager peers, Liger's GRPO)
  loop.py       one optimizer step and the timed step loop
  providers.py  one provider at one micro-batch budget, OOM fallbacks, matched memory
  check.py      per-token log-prob parity of the in-house model with transformers
  report.py     the row table, the best peer, the 1.5x goal
"""
