"""Fused pg_loss (kernels/pg_loss.py) in the Triton interpreter: hand-worked numbers per mode,
then randomized agreement with reference.pg_loss (values, stats, gradients).

Hand cases use old_logp = 0 and logp = log(r), so ratio = r; with ratio = 1 the surrogate is
-A. Every hand case runs through tao_fast.ops with backend "triton" and "torch".
"""
import math

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from tao_fast import ops  # noqa: E402
from tao_fast.kernels import pg_loss as pgk  # noqa: E402
from tao_fast.kernels import reference, utils  # noqa: E402

BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """The kernels' outputs and partial sums start as NaN: an unwritten element shows."""
    monkeypatch.setattr(utils, "DEBUG_POISON", True)
t = torch.tensor


def _run(backend, logp, old, adv, mask, **kw):
    lp = logp.clone().requires_grad_()
    loss, stats = ops.pg_loss(lp, old, adv, mask, backend=backend, **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    assert all(v.shape == () and v.dtype == torch.float32 for v in stats.values())
    loss.backward()
    return loss.item(), {k: v.item() for k, v in stats.items()}, lp.grad


def _check(got, loss, stats, grad):
    g_loss, g_stats, g_grad = got
    assert g_loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
    for k, v in stats.items():
        assert g_stats[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(g_grad, t(grad).reshape(g_grad.shape), rtol=1e-5, atol=1e-6)


def _logr(ratios):
    return torch.log(t(ratios, dtype=torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_clip(backend):
    # clip 0.2/0.2, token-mean over 5 tokens, pg = max(-A r, -A clamp(r, 0.8, 1.2)):
    # r=1.1 A=2 : inside           pg = -2.2               grad -A r = -2.2
    # r=1.5 A=1 : above, A>0       pg = max(-1.5, -1.2) = -1.2  clipped, grad 0
    # r=0.5 A=-1: below, A<0       pg = max(0.5, 0.8) = 0.8     clipped, grad 0
    # r=1.5 A=-1: above, A<0       pg = max(1.5, 1.2) = 1.5     grad -A r = 1.5
    # r=0.5 A=1 : below, A>0       pg = max(-0.5, -0.8) = -0.5  grad -0.5
    # loss = (-2.2 - 1.2 + 0.8 + 1.5 - 0.5) / 5 = -0.32; clip_frac 2/5; ratio mean 5.1/5
    r, a = [1.1, 1.5, 0.5, 1.5, 0.5], [2.0, 1.0, -1.0, -1.0, 1.0]
    got = _run(backend, _logr(r), torch.zeros(5), t(a), torch.ones(5))
    _check(got, -0.32, dict(clip_frac=0.4, ratio_mean=1.02, ratio_max=1.5, kl=0.0),
           [-2.2 / 5, 0.0, 0.0, 1.5 / 5, -0.5 / 5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_asymmetric_clip(backend):
    # clip_low 0.2, clip_high 0.28: range [0.8, 1.28]
    # r=1.25 A=1 : inside (would clip at 1.2)  pg = -1.25, grad -1.25
    # r=1.4  A=1 : above                       pg = -1.28, clipped, grad 0
    # r=0.75 A=-2: below                       pg = max(1.5, 1.6) = 1.6, clipped, grad 0
    # r=0.85 A=-2: inside                      pg = 1.7, grad 1.7
    # loss = (-1.25 - 1.28 + 1.6 + 1.7) / 4 = 0.1925; ratio mean 4.25/4 = 1.0625
    r, a = [1.25, 1.4, 0.75, 0.85], [1.0, 1.0, -2.0, -2.0]
    got = _run(backend, _logr(r), torch.zeros(4), t(a), torch.ones(4), clip_high=0.28)
    _check(got, 0.1925, dict(clip_frac=0.5, ratio_mean=1.0625, ratio_max=1.4, kl=0.0),
           [-1.25 / 4, 0.0, 0.0, 1.7 / 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip(backend):
    # dual_clip c=3 caps the loss of A<0 tokens at -A c = 3:
    # r=5 A=-1: pg = max(5, 1.2) = 5 -> min(5, 3) = 3, grad 0 (not counted as clipped)
    # r=2 A=-1: pg = max(2, 1.2) = 2 -> min(2, 3) = 2, grad -A r = 2
    # r=5 A=1 : pg = max(-5, -1.2) = -1.2 (clipped; dual clip skips A>0), grad 0
    # loss = (3 + 2 - 1.2) / 3 = 3.8/3; clip_frac 1/3; ratio mean 12/3 = 4
    r, a = [5.0, 2.0, 5.0], [-1.0, -1.0, 1.0]
    got = _run(backend, _logr(r), torch.zeros(3), t(a), torch.ones(3), dual_clip=3.0)
    _check(got, 3.8 / 3, dict(clip_frac=1 / 3, ratio_mean=4.0, ratio_max=5.0, kl=0.0),
           [0.0, 2.0 / 3, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl(backend, estimator):
    # A = 0 so pg = 0; ratio 1. kl_coef 0.5; d = ref - logp: t0 -1.5 - (-1) = -0.5, t1 1.0
    # k1 = -d = [0.5, -1.0]: mean -0.25, loss 0.5 * -0.25 = -0.125, grad 0.5 * 1 / 2 = 0.25
    # k3 = e^d - d - 1 = [e^-0.5 - 0.5, e - 2] = [0.1065307, 0.7182818], mean 0.4124063,
    #      loss 0.2062031; grad 0.5 * (1 - e^d) / 2 = [0.0983673, -0.4295705]
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    if estimator == "k1":
        kl, loss, grad = -0.25, -0.125, [0.25, 0.25]
    else:
        k3 = [math.exp(-0.5) - 0.5, math.e - 2.0]
        kl = sum(k3) / 2
        loss, grad = 0.5 * kl, [0.25 * (1 - math.exp(-0.5)), 0.25 * (1 - math.e)]
    got = _run(backend, logp, logp.clone(), torch.zeros(2), torch.ones(2), ref_logp=ref,
               kl_coef=0.5, kl_estimator=estimator)
    _check(got, loss, dict(clip_frac=0.0, ratio_mean=1.0, ratio_max=1.0, kl=kl), grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [None, 2.0])
def test_truncated_importance_sampling(backend, cap):
    # ratio 1, A = [1, -1] -> pg = [-1, 1]; w = exp(old - sampler) = [1.5, 4]
    # cap 2: w = [1.5, 2]: loss (-1.5 + 2) / 2 = 0.25, grad -A w / 2 = [-0.75, 1.0]
    # no cap: w = [1.5, 4]: loss (-1.5 + 4) / 2 = 1.25, grad [-0.75, 2.0]
    sampler = t([-math.log(1.5), -math.log(4.0)])
    w1 = 2.0 if cap else 4.0
    got = _run(backend, torch.zeros(2), torch.zeros(2), t([1.0, -1.0]), torch.ones(2),
               sampler_logp=sampler, tis_cap=cap)
    _check(got, (-1.5 + w1) / 2, dict(clip_frac=0.0, ratio_mean=1.0, ratio_max=1.0, kl=0.0),
           [-0.75, w1 / 2])


AGG_CASES = [
    # l = -A (ratio 1) = [1, 2, 3 | 4, 5, 6], mask [1, 1, 0 | 1, 0, 0]; grad = coef * m * l
    # token-mean: (1 + 2 + 4) / 3;  grad l * m / 3
    ("token-mean", None, 7 / 3, [1 / 3, 2 / 3, 0, 4 / 3, 0, 0]),
    # seq-mean-token-mean: mean(1.5, 4) = 2.75; grad l * m / (count 2 * 2 seqs), 4 / (1 * 2)
    ("seq-mean-token-mean", None, 2.75, [0.25, 0.5, 0, 2.0, 0, 0]),
    # token-sum-norm, loss_norm 10: 7 / 10; grad l * m / 10
    ("token-sum-norm", 10.0, 0.7, [0.1, 0.2, 0, 0.4, 0, 0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg,norm,loss,grad", AGG_CASES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_aggregation(backend, agg, norm, loss, grad, layout):
    adv = -t([1.0, 2, 3, 4, 5, 6])
    mask = t([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    stats = dict(clip_frac=0.0, ratio_mean=1.0, ratio_max=1.0, kl=0.0)
    if layout == "padded":  # rows are sequences
        z = torch.zeros(2, 3)
        got = _run(backend, z, z.clone(), adv.view(2, 3), mask.view(2, 3), agg=agg,
                   loss_norm=norm)
    else:  # plus an empty sequence and a fully masked one (-9 tokens): they do not count
        adv = torch.cat([adv, t([-9.0, -9.0])])
        mask = torch.cat([mask, t([False, False])])
        cu = t([0, 3, 3, 6, 8], dtype=torch.int32)
        got = _run(backend, torch.zeros(8), torch.zeros(8), adv, mask, agg=agg, loss_norm=norm,
                   cu_seqlens=cu)
        grad = grad + [0.0, 0.0]
    _check(got, loss, stats, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", reference.AGG_MODES)
def test_edge_cases_one_token_and_all_masked(backend, agg):
    kw = dict(agg=agg, loss_norm=4.0, cu_seqlens=t([0, 1], dtype=torch.int32))
    # T = 1, ratio e^0.1 inside the clip range, A = 2: loss = -2 e^0.1 / n
    n = 4.0 if agg == "token-sum-norm" else 1.0
    r = math.exp(0.1)
    got = _run(backend, t([0.1]), t([0.0]), t([2.0]), t([1.0]), **kw)
    _check(got, -2 * r / n, dict(clip_frac=0.0, ratio_mean=r, ratio_max=r, kl=0.0), [-2 * r / n])
    # all masked: zero loss, zero stats, zero gradient, no NaN
    kw["cu_seqlens"] = t([0, 2, 5], dtype=torch.int32)
    got = _run(backend, torch.randn(5), torch.randn(5), torch.randn(5), torch.zeros(5),
               ref_logp=torch.randn(5), kl_coef=0.1, **kw)
    _check(got, 0.0, dict(clip_frac=0.0, ratio_mean=0.0, ratio_max=0.0, kl=0.0), [0.0] * 5)


def _random(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(shape, generator=g) * 0.3 - 1.0).to(dtype)
    old = logp.float() + torch.randn(shape, generator=g) * 0.3
    old.view(-1)[::9] = logp.float().view(-1)[::9]  # ratio exactly 1: max() ties
    adv = torch.randn(shape, generator=g)
    adv.view(-1)[::11] = 0.0  # A = 0: clamp/max ties
    mask = torch.rand(shape, generator=g) > 0.3
    ref = logp.float() + torch.randn(shape, generator=g) * 0.2
    sampler = old + torch.randn(shape, generator=g) * 0.3
    return logp, old, adv, mask, ref, sampler


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("agg", reference.AGG_MODES)
def test_random_against_reference(layout, agg):
    shape = (3000,) if layout == "packed" else (5, 700)  # > 1 program block of 1024
    cu = t([0, 7, 7, 1500, 2999, 3000], dtype=torch.int32) if layout == "packed" else None
    options = [
        dict(),
        dict(clip_high=0.28, dual_clip=3.0),
        dict(ref_logp=True, kl_coef=0.05, kl_estimator="k1", sampler_logp=True),
        dict(ref_logp=True, kl_coef=0.05, kl_estimator="k3", sampler_logp=True, tis_cap=1.2,
             dual_clip=2.0, clip_low=0.1),
    ]
    for i, opt in enumerate(options):
        dtype = torch.bfloat16 if i == 3 else torch.float32
        logp, old, adv, mask, ref, sampler = _random(shape, seed=i, dtype=dtype)
        opt = dict(opt, agg=agg, cu_seqlens=cu, loss_norm=800.0)
        opt["ref_logp"] = ref if opt.get("ref_logp") else None
        opt["sampler_logp"] = sampler if opt.get("sampler_logp") else None
        outs = []
        for impl in (pgk.pg_loss, reference.pg_loss):
            lp = logp.clone().requires_grad_()
            loss, stats = impl(lp, old, adv, mask, **opt)
            loss.backward()
            outs.append((loss, stats, lp.grad))
        (loss, stats, grad), (r_loss, r_stats, r_grad) = outs
        assert grad.dtype == dtype
        torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-6)
        for k in r_stats:
            torch.testing.assert_close(stats[k], r_stats[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, r_grad, rtol=1e-5, atol=1e-8)


def test_bad_inputs_raise():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="agg"):
        pgk.pg_loss(x, x, x, x, ref_logp=None, kl_coef=0.0, kl_estimator="k3", clip_low=0.2,
                    clip_high=0.2, dual_clip=None, sampler_logp=None, tis_cap=None,
                    agg="sum", cu_seqlens=None, loss_norm=None)
    with pytest.raises(ValueError, match="cu_seqlens"):
        pgk.pg_loss(x, x, x, x, agg="seq-mean-token-mean")
    with pytest.raises(ValueError, match="loss_norm"):
        pgk.pg_loss(x, x, x, x, agg="token-sum-norm")
    with pytest.raises(ValueError, match="dual_clip"):
        pgk.pg_loss(x, x, x, x, dual_clip=1.0)
    with pytest.raises(ValueError, match="advantages"):
        pgk.pg_loss(x, x, torch.zeros(5), x)
