"""The learner's update for each algorithm, on a tiny random Llama (torch ops, fp32): loss
values worked out by hand, several epochs and minibatches with real old log-probs (ratio != 1
and a non-zero clip fraction once the policy has moved), Dr.GRPO's constant normaliser, the
entropy metric, and bon-sft raising the chosen candidates' log-likelihood."""
import pytest
import torch

from tao_fast.config import RLConfig
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl.packing import make_packed_batch
from tao_fast.rl.trainer import Learner, Sample

TEMP = 0.8
MAX_TOKENS = 12
# (prompt tokens, response tokens) and advantages; 27 response tokens in all
SHAPES = [(3, 9), (2, 2), (4, 5), (2, 7), (5, 1), (3, 3)]
ADV = [1.0, -1.0, 0.5, -0.5, 0.25, 0.75]


def _model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(vocab_size=64, hidden_size=16, intermediate_size=32,
                              num_layers=2, num_heads=2, num_kv_heads=1))
    m.ops_backend = "torch"
    return m


def _samples(shapes=SHAPES, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for (n_prompt, n_resp), a in zip(shapes, ADV):
        ids = torch.randint(0, 64, (n_prompt + n_resp,), generator=g).tolist()
        # sampler log-probs far below the learner's: the importance weight is at its cap, 1
        out.append(Sample(ids, n_prompt, a, [-50.0] * n_resp))
    return out


def _learner(algorithm="grpo", lr=1e-9, **kw):
    cfg = RLConfig(algorithm=algorithm, lr=lr, micro_batch_tokens=16, tis_cap=1.0, **kw)
    return Learner(_model(), cfg, temperature=TEMP, ops_backend="torch",
                   max_response_tokens=MAX_TOKENS)


def _response_logp(model, s: Sample):
    """Log-probs [n_resp] and entropies [n_resp] of s's response tokens, one sequence at a
    time, in float64 from the hidden states (no packing, no fused op)."""
    b = make_packed_batch([s.ids])
    with torch.no_grad():
        h = model(b.input_ids, b.positions, b.cu_seqlens, b.max_seqlen).double()  # [L, H]
        logits = h @ model.output_weight.double().T / TEMP  # [L, V]
        lsm = torch.log_softmax(logits, -1)[s.prompt_len - 1:-1]  # [n_resp, V]
    tgt = torch.tensor(s.ids[s.prompt_len:])
    return lsm.gather(1, tgt[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)


@pytest.mark.parametrize("algorithm, expected", [
    # ratio 1, weight 1: every counted token's loss is -A
    ("grpo", -sum(ADV) / 6),  # mean over sequences of their token means
    ("rloo", -sum(ADV) / 6),
    ("gspo", -sum(ADV) / 6),  # mean over sequences of -A s_i, s_i = 1
    ("dapo", -sum(a * n for a, (_, n) in zip(ADV, SHAPES)) / 27),  # token mean: -8.5 / 27
    ("dr-grpo", -8.5 / (MAX_TOKENS * 6)),  # token sum / (max_tokens x sequences)
])
def test_loss_values_by_hand(algorithm, expected):
    st = _learner(algorithm).step(_samples())
    assert st["micro_batches"] >= 2  # the micro-batch weights must add up
    assert st["loss"] == pytest.approx(expected, abs=1e-6)
    assert st["ratio_mean"] == pytest.approx(1.0) and st["clip_frac"] == 0.0


def test_dr_grpo_normaliser_does_not_change_with_lengths():
    # the same advantages on responses 3x as long: dr-grpo divides by the same constant
    # (12 x 6), so the loss is -sum(A n) / 72 for both; dapo's token mean divides by sum(n)
    long = [(p, min(3 * n, MAX_TOKENS)) for p, n in SHAPES]
    for shapes in (SHAPES, long):
        s_an = sum(a * n for a, (_, n) in zip(ADV, shapes))
        n_tok = sum(n for _, n in shapes)
        assert _learner("dr-grpo").step(_samples(shapes))["loss"] == pytest.approx(
            -s_an / 72, abs=1e-6)
        assert _learner("dapo").step(_samples(shapes))["loss"] == pytest.approx(
            -s_an / n_tok, abs=1e-6)


def test_bon_sft_loss_is_the_nll_and_raises_the_chosen_likelihood():
    learner = _learner("bon-sft", lr=1e-2)
    samples = _samples()
    before = [_response_logp(learner.model, s)[0] for s in samples]
    nll = -float(torch.cat(before).mean())
    st = learner.step(samples)
    assert st["loss"] == pytest.approx(nll, rel=1e-5)
    for _ in range(2):
        learner.step(samples)
    after = [_response_logp(learner.model, s)[0] for s in samples]
    assert float(torch.cat(after).sum()) > float(torch.cat(before).sum()) + 1.0


def test_entropy_is_the_sampling_distributions():
    learner = _learner()
    samples = _samples()
    ent = torch.cat([_response_logp(learner.model, s)[1] for s in samples])
    assert learner.step(samples)["entropy"] == pytest.approx(float(ent.mean()), rel=1e-5)


def test_old_logprobs_are_the_learners_before_the_update():
    learner = _learner(epochs=2)
    samples = _samples()
    plans = [learner._plan(samples, idx) for idx in learner._schedule(len(samples))]
    old, _ = learner._old_logprobs(samples, plans)
    for i, s in enumerate(samples):
        ref, _ = _response_logp(learner.model, s)
        got = old[i][s.prompt_len - 1:-1]  # position t predicts ids[t + 1]
        assert torch.allclose(got.double(), ref, atol=1e-5)


def test_epochs_make_the_ratio_and_the_clip_real():
    st = _learner(lr=3e-2, epochs=2).step(_samples())
    first, second = st["updates"]
    assert st["optimizer_steps"] == 2 and "old_logprob_tokens" in st
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and first["clip_frac"] == 0.0
    assert abs(second["ratio_mean"] - 1.0) > 1e-3 and second["clip_frac"] > 0.0
    assert st["ratio_max"] == pytest.approx(second["ratio_max"])
    # the one-update step has no second pass: its ratio stays 1 however large the lr
    one = _learner(lr=3e-2).step(_samples())
    assert one["optimizer_steps"] == 1 and "updates" not in one and one["clip_frac"] == 0.0


def test_minibatches_split_the_batch_into_optimizer_steps():
    learner = _learner(epochs=2, minibatches=2)
    st = learner.step(_samples())
    assert st["optimizer_steps"] == 4 and [u["samples"] for u in st["updates"]] == [3] * 4
    assert learner.sched.last_epoch == 4  # the schedule counts optimizer steps
    sched = learner._schedule(6)
    assert sorted(sched[0] + sched[1]) == list(range(6)) != sched[0] + sched[1]  # shuffled
    assert sched[:2] != sched[2:]  # reshuffled every pass


def test_dual_clip_bounds_negative_advantage_tokens():
    # the first sample again with A = -0.5: the pair's net push is up, so after the first
    # epoch the copy's tokens have ratio > 1 with a negative advantage; dual clip 1.01 caps
    # their loss at 1.01 |A|, so the second update's loss is lower than without it
    def batch():
        s = _samples()
        return s + [Sample(s[0].ids, s[0].prompt_len, -0.5, s[0].sampler_logprobs)]
    base = _learner(lr=3e-2, epochs=2).step(batch())["updates"][1]
    dual = _learner(lr=3e-2, epochs=2, dual_clip=1.01).step(batch())["updates"][1]
    assert base["ratio_max"] > 1.01
    assert dual["loss"] < base["loss"] - 1e-4


def test_the_reference_runs_once_per_batch_whatever_the_updates():
    # KL to a frozen reference: its log-probs never change, so with 2 epochs x 2 minibatches
    # its forward runs in the pass before the first update only, as often as in a 1-update
    # step (one per micro-batch of the whole batch), and its KL to the start is 0 there
    calls = []
    counts = []
    for kw in ({}, {"epochs": 2, "minibatches": 2}):
        learner = _learner(lr=3e-2, kl_coef=0.05, **kw)
        calls.clear()
        learner.ref.register_forward_hook(lambda *a: calls.append(1))
        st = learner.step(_samples())
        counts.append(len(calls))
    assert counts[1] == counts[0] >= 2  # 16-token micro-batches: several
    assert st["updates"][0]["kl"] == pytest.approx(0.0, abs=1e-9) and st["updates"][3]["kl"] > 0
