"""One optimizer step over a step's micro-batches, and the timed step loop."""
from __future__ import annotations

import torch

from harness import sync, time_ms


def train_step(model, opt, mbs, loss_fn, n_counted):
    """Per micro-batch forward, loss, backward; then clip_grad_norm_(1.0), AdamW, zero_grad."""
    for mb in mbs:
        loss = loss_fn(model, mb, n_counted)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def time_steps(model, mbs, loss_fn, n_counted, device, warmup: int, steps: int):
    """(median step seconds, peak bytes over the timed steps or None on the CPU, last loss).

    `warmup` untimed steps (compiles, Triton JIT, optimizer state), then exactly `steps` timed
    ones (bench/harness.py: CUDA events, L2 flushed between steps; perf_counter on the CPU)."""
    cuda = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.0, fused=cuda)
    last = {}

    def step():
        last["loss"] = train_step(model, opt, mbs, loss_fn, n_counted)
    for _ in range(warmup):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_ms(step, device, warmup=0, budget_ms=0, min_reps=steps, max_reps=steps)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return ms / 1e3, peak, float(last["loss"])
