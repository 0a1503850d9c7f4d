"""Sequence packing (tao_fast/rl/packing.py): bin invariants, layout, and loss aggregation."""
import random

import pytest
import torch

from tao_fast import ops
from tao_fast.rl.packing import (balance_tokens, make_packed_batch, microbatch_agg,
                                 n_counted_seqs, pack_per_token, pack_sequences, unpack)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def _ffd_count(lengths, budget):
    """Bins first-fit-decreasing needs (independent re-implementation), oversize excluded."""
    loads = []
    for n in sorted((n for n in lengths if n <= budget), reverse=True):
        for b, load in enumerate(loads):
            if load + n <= budget:
                loads[b] += n
                break
        else:
            loads.append(n)
    return len(loads)


def _check_packing(lengths, budget):
    bins = pack_sequences(lengths, budget)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every index exactly once"
    assert all(b == sorted(b) and b for b in bins)
    loads = [sum(lengths[i] for i in b) for b in bins]
    for b, load in zip(bins, loads):  # over budget only as a lone oversize sequence
        assert load <= budget or (len(b) == 1 and lengths[b[0]] > budget)
    n_over = sum(n > budget for n in lengths)
    assert len(bins) == n_over + _ffd_count(lengths, budget), "as few bins as FFD"
    inside = [load for load, b in zip(loads, bins) if all(lengths[i] <= budget for i in b)]
    if inside:  # balanced: the load gap is at most one (in-budget) sequence
        assert max(inside) - min(inside) <= max(n for n in lengths if n <= budget)
    assert loads == sorted(loads, reverse=True), "heaviest micro-batch first"
    assert pack_sequences(lengths, budget) == bins, "deterministic"
    return bins, loads


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 600), min_size=0, max_size=60), st.integers(1, 1000))
def test_pack_sequences_properties(lengths, budget):
    _check_packing(lengths, budget)


def test_pack_sequences_random_rl_batches_are_balanced():
    rng = random.Random(0)
    for _ in range(20):  # 64 rollouts of 16..2048 tokens into 8k-token micro-batches
        lengths = [rng.randint(16, 2048) for _ in range(64)]
        bins, loads = _check_packing(lengths, 8192)
        assert max(loads) - min(loads) <= 0.1 * 8192


def test_pack_sequences_examples_and_errors():
    assert pack_sequences([], 10) == []
    assert pack_sequences([3, 3, 3, 3], 6) == [[0, 2], [1, 3]]  # LPT deals alternately
    # 15 > 10 rides alone; FFD needs 2 bins for the rest, LPT balances them 9 | 2 + 1
    assert pack_sequences([9, 1, 15, 2], 10) == [[2], [0], [1, 3]]
    assert pack_sequences([5, 4, 3, 3, 3], 9) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError):
        pack_sequences([1, 2], 0)
    with pytest.raises(ValueError):
        pack_sequences([1, -2], 5)


def test_balance_tokens_balances_tokens_not_sequences():
    lengths = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]  # one long, ten short
    a, b = balance_tokens(lengths, 2)
    assert sorted(a + b) == list(range(len(lengths)))
    loads = sorted(sum(lengths[i] for i in part) for part in (a, b))
    assert loads == [100, 100]  # 1 sequence vs 10: equal tokens, not equal counts
    assert balance_tokens(lengths, 2) == [a, b]  # deterministic on every rank


def test_make_packed_batch_layout():
    seqs = [[5, 6, 7], [8], torch.tensor([9, 10, 11, 12]), []]
    b = make_packed_batch(seqs)
    assert b.input_ids.dtype == torch.int64
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert b.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]  # restart per sequence
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 4, 8, 8]
    assert b.max_seqlen == 4 and b.seq_lens == [3, 1, 4, 0] and b.num_tokens == 8
    adv = pack_per_token([[0.5] * 3, [1.0], torch.arange(4.0), []], b)
    assert adv.dtype == torch.float32 and adv.tolist() == [0.5] * 3 + [1.0, 0, 1, 2, 3]
    assert [t.tolist() for t in unpack(b.input_ids, b.cu_seqlens)] == [[5, 6, 7], [8],
                                                                       [9, 10, 11, 12], []]
    with pytest.raises(ValueError, match="do not match"):
        pack_per_token([[0.5] * 2, [1.0], [0.0] * 4, []], b)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "token-sum-norm"])
def test_microbatch_losses_sum_to_the_batch_loss(agg):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 40, (13,), generator=g).tolist()
    seq_masks = [(torch.rand(n, generator=g) > 0.3).float() for n in lens]
    seq_masks[4].zero_()  # a sequence with no counted token
    T = sum(lens)
    logp = (-torch.rand(T, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(T, generator=g)
    ref = logp.detach() + 0.1 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    whole = make_packed_batch([[0] * n for n in lens])
    mask = pack_per_token(seq_masks, whole)
    kw = dict(ref_logp=ref, kl_coef=0.05, backend="torch")
    norm = 40.0 * len(lens) if agg == "token-sum-norm" else None
    want, _ = ops.pg_loss(logp, old, adv, mask, agg=agg, cu_seqlens=whole.cu_seqlens,
                          loss_norm=norm, **kw)
    (want_grad,) = torch.autograd.grad(want, logp)

    starts = whole.cu_seqlens.tolist()
    total = 0.0
    for mb in pack_sequences(lens, 64):
        idx = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mb])  # tokens of mb
        mb_batch = make_packed_batch([[0] * lens[i] for i in mb])
        a = microbatch_agg(agg, global_n_tokens=int(mask.sum()),
                           global_n_seqs=n_counted_seqs(seq_masks),
                           mb_n_seqs=n_counted_seqs([seq_masks[i] for i in mb]), loss_norm=norm)
        loss, _ = ops.pg_loss(logp[idx], old[idx], adv[idx], mask[idx], ref_logp=ref[idx],
                              kl_coef=0.05, agg=a.agg, cu_seqlens=mb_batch.cu_seqlens,
                              loss_norm=a.loss_norm, backend="torch")
        total = total + loss * a.weight
    (got_grad,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-8)
