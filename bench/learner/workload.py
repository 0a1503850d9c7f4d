"""The step's sequences (random ids, RL-like lengths), their micro-batches in each provider's
layout, and the useful FLOPs of one step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tao_fast.kernels.reference import IGNORE_INDEX
from tao_fast.models.config import ModelArgs
from tao_fast.rl.packing import make_packed_batch

IGN = IGNORE_INDEX


@dataclass
class Workload:
    seqs: list  # int64 [L_i] CPU tensors: prompt + response
    prompt_lens: list
    advantages: list  # one float per sequence

    @property
    def lengths(self) -> list[int]:
        return [int(s.numel()) for s in self.seqs]

    @property
    def n_counted(self) -> int:  # response tokens: the tokens the loss reads
        return sum(L - p for L, p in zip(self.lengths, self.prompt_lens))


def make_workload(n, prompt_range, resp_range, vocab, seed) -> Workload:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(prompt_range[0], prompt_range[1] + 1, (n,), generator=g).tolist()
    r = torch.randint(resp_range[0], resp_range[1] + 1, (n,), generator=g).tolist()
    seqs = [torch.randint(0, vocab, (a + b,), generator=g) for a, b in zip(p, r)]
    adv = torch.randn(n, generator=g).tolist()
    return Workload(seqs, p, adv)


def targets_of(seq, prompt_len):
    """[L]: position t predicts token t + 1; only response tokens count (as the Learner's
    per-token targets)."""
    t = torch.full_like(seq, IGN)
    t[prompt_len - 1:-1] = seq[prompt_len:]
    return t


def packed_microbatches(wl: Workload, bins, device) -> list[dict]:
    """tao-fast: one PackedBatch [T] per bin, with targets / advantages / mask [T]."""
    out = []
    for idx in bins:
        batch = make_packed_batch([wl.seqs[i] for i in idx], device=device)
        targets = torch.cat([targets_of(wl.seqs[i], wl.prompt_lens[i]) for i in idx])  # [T]
        adv = torch.cat([torch.full((wl.lengths[i],), wl.advantages[i]) for i in idx])  # [T]
        targets, adv = targets.to(device), adv.to(device)
        out.append(dict(batch=batch, targets=targets, adv=adv, mask=targets != IGN))
    return out


def padded_microbatches(wl: Workload, bins, device) -> list[dict]:
    """Peers: the same bins, right-padded to the longest: ids / targets / mask [B, L], adv [B]."""
    out = []
    for idx in bins:
        L = max(wl.lengths[i] for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)  # [B, L], pad id 0 (never read)
        targets = torch.full((len(idx), L), IGN, dtype=torch.long)  # [B, L]
        for r, i in enumerate(idx):
            ids[r, :wl.lengths[i]] = wl.seqs[i]
            targets[r, :wl.lengths[i]] = targets_of(wl.seqs[i], wl.prompt_lens[i])
        adv = torch.tensor([wl.advantages[i] for i in idx])  # [B]
        ids, targets, adv = ids.to(device), targets.to(device), adv.to(device)
        out.append(dict(ids=ids, targets=targets, adv=adv, mask=targets != IGN,
                        n_counted=sum(wl.lengths[i] - wl.prompt_lens[i] for i in idx)))
    out.sort(key=lambda m: -m["ids"].numel())  # largest first: an OOM shows up at once
    return out


def matmul_params(args: ModelArgs) -> int:
    n = args.param_count()
    return n if args.tie_word_embeddings else n - args.vocab_size * args.hidden_size


def step_flops(args: ModelArgs, lengths) -> float:
    """6 * N * tokens + 6 * layers * heads * head_dim * sum(L^2) (causal QK^T and PV x 3)."""
    dense = 6 * matmul_params(args) * sum(lengths)
    attn = 6 * args.num_layers * args.num_heads * args.head_dim * sum(L * L for L in lengths)
    return float(dense + attn)
