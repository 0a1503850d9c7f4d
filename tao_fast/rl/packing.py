"""Packing RL sequences into token-budget micro-batches, and the loss weights that go with it.

`balance_tokens` deals a global batch's sequences to the ranks by tokens (every rank computes
the same deal, then packs its share); `pack_sequences` decides which sequences share a
micro-batch; `make_packed_batch` lays one micro-batch out for varlen attention (input_ids [T],
positions restarting at 0 per sequence, cu_seqlens, max_seqlen); `pack_per_token` lays
per-token floats (advantages, old log-probs, masks) out the same way; `microbatch_agg` says how
to aggregate a micro-batch's loss so that the sum over micro-batches equals the loss of the
whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch


def _ffd(items: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing; `items` already sorted by decreasing length."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in items:
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def _lpt(items: list[int], lengths: Sequence[int], budget: int, n_bins: int):
    """Longest-processing-time into n_bins: each item to the least-loaded bin it fits in
    (ties: lowest bin index). None when some item fits nowhere."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    loads = [0] * n_bins
    for i in items:
        best = None
        for b in range(n_bins):
            if loads[b] + lengths[i] <= budget and (best is None or loads[b] < loads[best]):
                best = b
        if best is None:
            return None
        bins[best].append(i)
        loads[best] += lengths[i]
    return bins


def _rebalance(bins: list[list[int]], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Local search: move one sequence, or swap two, between the heaviest and the lightest
    micro-batch while that narrows their gap and keeps the budget. Each step strictly lowers
    the sum of squared loads, so it ends; capped at 4 steps per sequence anyway."""
    bins = [list(b) for b in bins]
    loads = [sum(lengths[i] for i in b) for b in bins]
    for _ in range(4 * sum(map(len, bins))):
        hi = max(range(len(bins)), key=lambda b: (loads[b], -b))
        lo = min(range(len(bins)), key=lambda b: (loads[b], b))
        gap = loads[hi] - loads[lo]
        best = None  # (|gap - 2 * moved|, a, b) with b None for a move
        for a in bins[hi]:
            for b in [None] + bins[lo]:
                d = lengths[a] - (0 if b is None else lengths[b])
                if 0 < d < gap and loads[lo] + d <= budget:
                    key = (abs(gap - 2 * d), a, -1 if b is None else b)
                    if best is None or key < best[0]:
                        best = (key, a, b)
        if best is None:
            break
        _, a, b = best
        d = lengths[a] - (0 if b is None else lengths[b])
        bins[hi].remove(a)
        bins[lo].append(a)
        if b is not None:
            bins[lo].remove(b)
            bins[hi].append(b)
        loads[hi] -= d
        loads[lo] += d
    return bins


def pack_sequences(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `token_budget` tokens each.

    lengths: tokens per sequence. Returns a list of micro-batches, each a sorted list of
    indices into `lengths`; every index appears exactly once. Deterministic.

    The number of micro-batches is what first-fit-decreasing needs; the sequences are then
    re-dealt longest first to the least-loaded micro-batch they fit in (LPT; when that cannot
    place every sequence, the FFD packing is kept), and a local search moves or swaps sequences
    between the heaviest and lightest micro-batch while that narrows the gap.
    A sequence longer than the budget is not an error: it gets a micro-batch of its own (the
    only case where a micro-batch exceeds the budget). Micro-batches come heaviest first, so
    an out-of-memory shows up on the first one.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}")
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"sequence lengths must be >= 0, got {lengths}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    oversize = [[i] for i in order if lengths[i] > token_budget]
    rest = [i for i in order if lengths[i] <= token_budget]
    ffd = _ffd(rest, lengths, token_budget)
    bins = _rebalance(_lpt(rest, lengths, token_budget, len(ffd)) or ffd, lengths, token_budget)
    bins = [sorted(b) for b in oversize + bins if b]
    bins.sort(key=lambda b: (-sum(lengths[i] for i in b), b[0]))
    return bins



def balance_tokens(lengths: Sequence[int], world: int) -> list[list[int]]:
    """Deal sequences to `world` ranks, longest first to the rank with the fewest tokens so far
    (LPT; ties: lowest rank), so ranks get about the same number of *tokens*, not sequences.
    Deterministic: every rank computes the same assignment from the same lengths.
    Returns, per rank, the sorted indices into `lengths`."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += lengths[i]
    return [sorted(x) for x in out]

@dataclass
class PackedBatch:
    """One micro-batch of B sequences laid out back to back (T tokens in all).

    input_ids [T] int64; positions [T] int64, restarting at 0 for each sequence (rotary uses
    these); cu_seqlens [B+1] int32 (0, len0, len0+len1, ..., T); max_seqlen the longest
    sequence (Python int, so kernels launch without a host sync); seq_lens the B lengths.
    """
    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_lens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.positions.to(device),
                           self.cu_seqlens.to(device), self.max_seqlen, list(self.seq_lens))


def _lens_and_cu(lens: list[int]):
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)  # [B+1]
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    return cu


def make_packed_batch(seqs: Sequence, device=None) -> PackedBatch:
    """Pack token sequences (lists of ints or 1-D integer tensors) into a PackedBatch."""
    if not len(seqs):
        raise ValueError("make_packed_batch needs at least one sequence")
    ids = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in seqs]
    lens = [int(t.numel()) for t in ids]
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens])  # [T]
    batch = PackedBatch(input_ids=torch.cat(ids), positions=positions,
                        cu_seqlens=_lens_and_cu(lens), max_seqlen=max(lens), seq_lens=lens)
    return batch if device is None else batch.to(device)


def pack_per_token(values: Sequence, batch: PackedBatch | None = None,
                   dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Concatenate per-token values (lists or 1-D tensors, one per sequence) into [T].

    With `batch`, checks that each sequence's length matches the batch's. dtype None keeps the
    inputs' dtype. The result is on the first tensor's device (CPU for lists).
    """
    vals = [torch.as_tensor(v).reshape(-1) for v in values]
    if batch is not None:
        lens = [int(v.numel()) for v in vals]
        if lens != list(batch.seq_lens):
            raise ValueError(f"per-token lengths {lens} do not match the batch's {batch.seq_lens}")
    out = torch.cat(vals) if vals else torch.zeros(0)  # [T]
    return out if dtype is None else out.to(dtype)


def unpack(packed: torch.Tensor, cu_seqlens) -> list[torch.Tensor]:
    """Split a packed [T, ...] tensor back into per-sequence views (host-side cu_seqlens)."""
    cu = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    return [packed[s:e] for s, e in zip(cu[:-1], cu[1:])]


class MicroBatchAgg(NamedTuple):
    """Call pg_loss(..., agg=agg, loss_norm=loss_norm) on the micro-batch, multiply by weight."""
    agg: str
    loss_norm: float | None
    weight: float


def microbatch_agg(agg: str, *, global_n_tokens: int, global_n_seqs: int, mb_n_seqs: int,
                   loss_norm: float | None = None) -> MicroBatchAgg:
    """How to aggregate one micro-batch's loss so that summing over micro-batches gives the
    whole batch's loss (and gradient) for `agg`.

    global_n_tokens: counted tokens (sum of the loss mask) in the whole batch.
    global_n_seqs / mb_n_seqs: sequences with at least one counted token in the whole batch /
    in this micro-batch (pg_loss's seq-mean skips sequences with none).
    loss_norm: the whole batch's constant for agg='token-sum-norm'.
    Counts are host numbers (Python ints), known from the rollout before anything moves to the
    GPU, so using them costs no sync.
      token-mean          -> token-sum-norm over the GLOBAL counted-token count, weight 1
      seq-mean-token-mean -> seq-mean-token-mean, weight mb_n_seqs / global_n_seqs
      token-sum-norm      -> unchanged, weight 1
    """
    if agg == "token-mean":
        return MicroBatchAgg("token-sum-norm", float(max(global_n_tokens, 1)), 1.0)
    if agg == "seq-mean-token-mean":
        return MicroBatchAgg(agg, None, mb_n_seqs / max(global_n_seqs, 1))
    if agg == "token-sum-norm":
        if not loss_norm:
            raise ValueError("agg='token-sum-norm' needs loss_norm > 0")
        return MicroBatchAgg(agg, float(loss_norm), 1.0)
    raise ValueError(f"unknown agg {agg!r}")


def n_counted_seqs(masks: Sequence) -> int:
    """Number of sequences (per-sequence masks, lists or 1-D tensors) with a counted token."""
    return sum(bool(torch.as_tensor(m).reshape(-1).any()) for m in masks)
