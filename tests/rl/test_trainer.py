"""The learner on the embedded model (its first 4 layers for the kernels): Triton kernels
(interpreter) and torch references agree over a few optimizer steps, and the step's statistics
are what the batch says."""
import copy
import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

from tao_fast.config import RLConfig  # noqa: E402
from tao_fast.rl.trainer import Learner, Sample  # noqa: E402

pytestmark = pytest.mark.slow


def _samples(tok):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (q, a) in enumerate([("What is 12 + 30?", "42"), ("What is 7 + 8?", "It is 15."),
                                ("What is 40 + 9?", "49"), ("Say hi.", "Hello there!")]):
        prompt = tok(q)["input_ids"]
        resp = tok(a)["input_ids"] + [tok.eos_token_id]
        lps = (-torch.rand(len(resp), generator=g) * 3).tolist()  # a sampler's log-probs
        out.append(Sample(prompt + resp, len(prompt), [1.0, -1.0, 0.5, -0.5][i], lps))
    return out


def _train(model, samples, backend, steps=2):
    cfg = RLConfig(lr=1e-4, micro_batch_tokens=24, kl_coef=0.05, tis_cap=2.0)
    learner = Learner(model, cfg, temperature=0.7, ops_backend=backend)
    return [learner.step(samples) for _ in range(steps)]


def first_layers(model, n: int):
    """A copy of the model with its first n decoder layers (real weights, the real vocab and
    head dim): the Triton interpreter's time is per layer, and 30 of them cost ~3 minutes."""
    m = copy.deepcopy(model)
    m.layers = m.layers[:n]
    m.args = dataclasses.replace(m.args, num_layers=n)
    return m


def test_triton_and_torch_backends_agree(embedded):
    base, tok, _ = embedded
    base = first_layers(base, 4)
    samples = _samples(tok)
    start = {k: v.clone() for k, v in base.state_dict().items()}
    m_torch, m_triton = copy.deepcopy(base), copy.deepcopy(base)
    st_torch = _train(m_torch, samples, "torch")
    st_triton = _train(m_triton, samples, "triton")
    assert st_torch[0]["micro_batches"] >= 2  # packed into several micro-batches
    for a, b in zip(st_torch, st_triton):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    moved = agree = 0.0
    for k, v in m_torch.state_dict().items():
        moved += float((v - start[k]).pow(2).sum())
        agree += float((m_triton.state_dict()[k] - v).pow(2).sum())
    assert moved > 0
    # Adam turns tiny gradient differences into at most lr-sized steps: the two runs' weights
    # differ by far less than either moved.
    assert agree ** 0.5 < 0.02 * moved ** 0.5


def test_step_statistics(embedded):
    base, tok, _ = embedded
    samples = _samples(tok)
    model = copy.deepcopy(base)
    st = _train(model, samples, "torch", steps=1)[0]
    assert st["samples"] == 4
    assert st["train_tokens"] == sum(len(s.ids) for s in samples)
    assert st["ratio_mean"] == pytest.approx(1.0) and st["clip_frac"] == 0.0  # on-policy step
    assert st["kl"] == pytest.approx(0.0, abs=1e-9)  # the reference is the starting policy
    assert 0.0 <= st["sampler_ratio_outside"] <= 1.0 and st["sampler_logprob_abs_diff"] > 0


def test_logprobs_skip_the_positions_without_a_target_and_change_nothing():
    """The output projection runs on the target positions only: log-probs and entropies there
    equal the whole-batch computation's (float64), and are 0 elsewhere."""
    from tao_fast import ops
    from tao_fast.kernels.reference import IGNORE_INDEX
    from tao_fast.models.config import ModelArgs
    from tao_fast.models.llama import Transformer
    from tao_fast.rl.packing import make_packed_batch
    from tao_fast.rl.trainer import make_targets

    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_layers=2, num_heads=4, num_kv_heads=2)).double()
    model.ops_backend = "torch"
    learner = Learner(model, RLConfig(), temperature=0.7, ops_backend="torch")
    seqs = [[5, 6, 7, 8, 9], [1, 2, 3], [4, 4, 4, 4, 4, 4, 4]]
    per = [[IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX], [IGNORE_INDEX, 3, IGNORE_INDEX],
           [IGNORE_INDEX] * 4 + [4, 4, IGNORE_INDEX]]
    batch = make_packed_batch(seqs)
    targets = make_targets(per, batch, "cpu")
    assert targets.keep.tolist() == [1, 2, 3, 6, 12, 13]
    lp, ent = learner._logprobs(model, batch, targets, entropy=True)  # [T], [T]
    hidden = model(batch.input_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    want_lp, want_ent = ops.linear_logprob(hidden, model.output_weight, targets.all,
                                           temperature=0.7, return_entropy=True,
                                           backend="torch")
    mask = targets.all != IGNORE_INDEX
    torch.testing.assert_close(lp[mask], want_lp[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent[mask], want_ent[mask], rtol=1e-12, atol=1e-12)
    assert lp.shape == ent.shape == (15,) and not lp[~mask].any() and not ent[~mask].any()
    lp.sum().backward()  # the gradient reaches the model through the selected rows
    assert model.output_weight.grad is not None and model.output_weight.grad.abs().sum() > 0
