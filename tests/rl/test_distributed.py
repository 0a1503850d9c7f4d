"""Data-parallel tuning under torchrun, on the CPU with gloo and 2 processes: sampling that
does not depend on the prompt split, a 2-rank learner step equal to the 1-rank one, a dead
peer failing fast, rollout slices gathered whole, and (slow) a 2-rank `tao-fast tune` whose loss/reward curve and weights match a 1-rank run,
that stops within seconds when a rank is SIGKILLed and resumes to the same weights."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from tao_fast.config import LoraConfig, RLConfig
from tao_fast.models import lora
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl import distributed, fsdp, rollout_shards
from tao_fast.rl.state import latest_state, load_state, save_state
from tao_fast.rl.trainer import Learner, Sample
from tao_fast.rollout import Engine


class _Tok:  # what TorchEngine needs of a tokenizer
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_sampling_does_not_depend_on_the_prompt_split():
    """With SamplingParams.prompt_index, each chunk of prompts is seeded from its global index:
    5 prompts sampled at once or as slices 0-2 and 3-4 (two ranks) give the same tokens."""
    from tao_fast.rollout import SamplingParams
    from tao_fast.rollout.torch_engine import TorchEngine

    model = _tiny_model()
    engine = TorchEngine(model, _Tok(), max_batch_rows=3)  # n=3: one prompt per chunk
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
    sp = SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=7, prompt_index=0)
    whole = engine.generate(prompts, sp)
    a = engine.generate(prompts[:3], sp)
    b = engine.generate(prompts[3:], SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=7,
                                                    prompt_index=3))
    assert a.token_ids + b.token_ids == whole.token_ids
    assert a.logprobs + b.logprobs == whole.logprobs


def test_auto_parallel_picks_fsdp_when_a_replica_does_not_fit():
    model = _tiny_model()
    assert fsdp.choose_parallel("auto", model, 4096) == "ddp"  # CPU: no limit known
    assert fsdp.choose_parallel("fsdp", model, 4096) == "fsdp"
    assert fsdp.choose_parallel("auto", model, 4096, device_bytes=1 << 34) == "ddp"
    assert fsdp.choose_parallel("auto", model, 4096, device_bytes=1 << 20) == "fsdp"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(lora_rank=0):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                     num_heads=2, num_kv_heads=1)
    model = Transformer(args)
    model.ops_backend = "torch"
    if lora_rank:  # the frozen base + fp32 adapters (FSDP2: base sharded, adapters whole)
        lora.apply_lora(model, LoraConfig(rank=lora_rank), torch.float32)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (n_prompt, n_resp) in enumerate([(3, 9), (2, 2), (4, 5), (2, 7), (5, 1), (3, 3)]):
        ids = torch.randint(0, 64, (n_prompt + n_resp,), generator=g).tolist()
        lps = (-torch.rand(n_resp, generator=g)).tolist()
        out.append(Sample(ids, n_prompt, [1.0, -1.0, 0.5, -0.5, 0.25, -0.25][i], lps))
    return out


def _cfg(parallel="auto", updates=1):
    """updates 2: 2 epochs x 2 minibatches, old log-probs from a pass before the first."""
    return RLConfig(lr=1e-2, micro_batch_tokens=16, kl_coef=0.05, parallel=parallel,
                    epochs=updates, minibatches=updates)


def _worker(rank, world, port, out_dir, parallel, skew, updates, lora_rank=0):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init(timeout_s=60)
    learner = Learner(_tiny_model(lora_rank), _cfg(parallel, updates), temperature=1.0,
                      ops_backend="torch")
    batch = _batch()
    if skew:  # one long sequence and short ones: the ranks get unequal micro-batch counts
        batch = [Sample(list(range(40)), 2, 1.0, [-0.5] * 38)] + batch
    stats = [learner.step(batch) for _ in range(2)]
    weights = {k: v.detach().clone() for k, v in learner.named_full_parameters()}
    if lora_rank:  # the adapters are whole on every rank: the state needs no gather
        assert learner.full_state() == {} and learner.checkpoint_model() is learner.model
        if rank == 0:
            save_state(out_dir, 2, learner.model, learner.opt, learner.sched, {})
            torch.save({"stats": stats, "weights": weights}, os.path.join(out_dir, "dist.pt"))
        distributed.shutdown()
        return
    full = learner.full_state()  # FSDP: gathered to rank 0; every rank takes part
    whole = learner.checkpoint_model()  # FSDP: assembled on rank 0 alone
    replica = learner.full_model()  # FSDP: the whole-weight replica on every rank
    assert (whole is None) == (rank == 1 and parallel == "fsdp")
    if rank == 0:
        save_state(out_dir, 2, learner.model, learner.opt, learner.sched, {}, **full)
        copies = {name: {k: v.detach().clone() for k, v in m.named_parameters()}
                  for name, m in (("checkpoint", whole), ("replica", replica))}
        torch.save({"stats": stats, "weights": weights, **copies},
                   os.path.join(out_dir, "dist.pt"))
    distributed.shutdown()


@pytest.mark.parametrize("parallel,skew,updates,lora_rank", [
    ("ddp", False, 1, 0), ("fsdp", True, 1, 0), ("fsdp", True, 2, 0), ("fsdp", True, 1, 2)])
def test_two_rank_learner_step_equals_one_rank(tmp_path, parallel, skew, updates, lora_rank):
    """Each rank trains its token share of the same batch; the summed gradients (DDP: one
    all-reduce; FSDP2: reduce-scatter with divide factor 1) give the 1-rank update.
    Tolerance: the sums run in another order (per-rank micro-batches, then the collective),
    so fp32 rounding differs at ~1e-7 relative; 1e-5 covers two Adam steps. `skew` gives the
    ranks unequal micro-batch counts: FSDP pads the short rank with zero-weight passes.
    `updates` 2: each step is 2 epochs x 2 minibatches, each rank computing the old log-probs
    of the samples it will train in any of them. `lora_rank` 2: LoRA under FSDP2, the frozen
    base sharded and the adapters replicated (their gradients all-reduced)."""
    torch.set_num_threads(1)
    one = Learner(_tiny_model(lora_rank), _cfg(updates=updates), temperature=1.0,
                  ops_backend="torch")
    batch = _batch()
    if skew:
        batch = [Sample(list(range(40)), 2, 1.0, [-0.5] * 38)] + batch
    want = [one.step(batch) for _ in range(2)]
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), parallel, skew, updates, lora_rank),
             nprocs=2, join=True)
    got = torch.load(tmp_path / "dist.pt")
    for a, b in zip(want, got["stats"]):
        assert b["samples"] == a["samples"] == len(batch)
        assert b["train_tokens"] == a["train_tokens"]
        assert b["optimizer_steps"] == a["optimizer_steps"] == updates * updates
        for k in ("loss", "kl", "grad_norm", "ratio_mean", "clip_frac", "entropy",
                  "sampler_logprob_abs_diff"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
        assert b["micro_batches"] >= 2
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(got["weights"][k], v, rtol=1e-5, atol=1e-6)
    if lora_rank:
        return _lora_resumes(one, batch, tmp_path, updates)
    for k, v in got["weights"].items():  # the checkpoint and the replica: the same gathers
        assert torch.equal(got["checkpoint"][k], v) and torch.equal(got["replica"][k], v), k
    assert set(got["checkpoint"]) == set(got["replica"]) == set(got["weights"])
    assert any(not torch.equal(v, _tiny_model().state_dict()[k])
               for k, v in one.model.state_dict().items())  # the steps did move the weights
    # the 2-rank state (gathered from the FSDP shards) is a 1-rank state: one process resumes
    # from it and its next step matches the uninterrupted 1-process learner's
    resumed = Learner(_tiny_model(), _cfg(updates=updates), temperature=1.0, ops_backend="torch")
    load_state(latest_state(tmp_path), resumed.model, resumed.opt, resumed.sched)
    resumed.steps_done = one.steps_done  # as the recipe restores it (the minibatch shuffle's seed)
    a, b = one.step(batch), resumed.step(batch)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for (k, v), w in zip(one.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6)


def _lora_resumes(one, batch, tmp_path, updates):
    """The 2-rank LoRA state (the adapters alone) resumes in one process to the same step."""
    assert any(lora.is_adapter(n) and p.abs().max() > 0 and ".lora_B." in n
               for n, p in one.model.named_parameters())  # the adapters did train
    resumed = Learner(_tiny_model(2), _cfg(updates=updates), temperature=1.0,
                      ops_backend="torch")
    load_state(latest_state(tmp_path), resumed.model, resumed.opt, resumed.sched)
    resumed.steps_done = one.steps_done
    a, b = one.step(batch), resumed.step(batch)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for (k, v), w in zip(one.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6)


def _dying_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init(timeout_s=120, run_dir="/runs/x")
    distributed.all_gather_object(rank)  # both alive
    if rank == 1:
        os._exit(0)  # dies without a word, as a SIGKILLed or crashed worker would
    t0 = time.time()
    try:
        distributed.all_gather_object(rank, "rollout gather")
        msg = "no error"
    except distributed.DistributedError as e:
        msg = str(e)
    with open(os.path.join(out_dir, "msg.json"), "w") as f:
        json.dump({"msg": msg, "seconds": time.time() - t0}, f)
    os._exit(0)  # as the CLI does: tearing down a gloo group with a dead peer can abort()


def test_a_dead_peer_fails_the_next_collective_fast(tmp_path):
    """Without torchrun tearing the group down: gloo sees the closed connection, well before
    the 120 s group timeout, and the message says what happened and how to resume."""
    ctx = mp.start_processes(_dying_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    while not ctx.join(timeout=60):
        pass
    got = json.loads((tmp_path / "msg.json").read_text())
    assert got["seconds"] < 30, got
    assert "rank 0: lost contact with the other ranks during rollout gather" in got["msg"]
    assert "tao-fast tune --resume /runs/x" in got["msg"]


class _EchoEngine(Engine):  # samples "p<i>c<j>"; records what it was asked
    def generate(self, prompts, sampling, progress=False):
        from tao_fast.rollout import Rollouts

        ids = [[[p[0], j] for j in range(sampling.n)] for p in prompts]
        texts = [[f"p{p[0]}c{j}" for j in range(sampling.n)] for p in prompts]
        lps = [[[-1.0, -1.0] for _ in range(sampling.n)] for _ in prompts]
        return Rollouts([list(p) for p in prompts], ids, texts, lps,
                        [["stop"] * sampling.n for _ in prompts],
                        stats={"tokens": 2 * sampling.n * len(prompts), "seconds": 0.5,
                               "tokens_per_s": 1.0, "from": sampling.prompt_index})


class _LenScorer:
    name = "len"

    def score(self, prompts, candidates):
        from tao_fast.scoring import ScoreResult

        return ScoreResult([[float(len(t)) for t in g] for g in candidates],
                           [[{} for _ in g] for g in candidates],
                           failures={"len": len(candidates)}, stats={"len/x": 1.0})


def _gather_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tao_fast.rollout import SamplingParams

    distributed.init(timeout_s=60)
    for n_prompts in (3, 1):
        prompts = [[10 + i] for i in range(n_prompts)]
        ro, sc, _, _ = rollout_shards.generate_and_score(
            _EchoEngine(), _LenScorer(), prompts, [None] * n_prompts,
            SamplingParams(n=2, seed=1, prompt_index=0))
        with open(os.path.join(out_dir, f"n{n_prompts}-r{rank}.json"), "w") as f:
            json.dump({"texts": ro.texts, "ids": ro.prompt_ids, "rewards": sc.rewards,
                       "failures": sc.failures, "tokens": ro.stats["tokens"]}, f)
    distributed.shutdown()


def test_uneven_prompt_split_gathers_whole_groups_in_order(tmp_path):
    """3 prompts on 2 ranks (2 + 1) and 1 prompt on 2 ranks (rank 1 samples nothing): every
    rank ends with every group, in prompt order, with its rewards and summed failures."""
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for n_prompts in (3, 1):
        a, b = (json.loads((tmp_path / f"n{n_prompts}-r{r}.json").read_text()) for r in (0, 1))
        assert a == b
        assert a["ids"] == [[10 + i] for i in range(n_prompts)]
        assert a["texts"] == [[f"p{10 + i}c0", f"p{10 + i}c1"] for i in range(n_prompts)]
        assert a["rewards"] == [[5.0, 5.0]] * n_prompts  # len("p10c0")
        assert a["failures"] == {"len": n_prompts} and a["tokens"] == 4 * n_prompts


# ---- the whole loop under torchrun (slow: a real tune in every process) ----

CONFIG = """model:
  ops_backend: torch
data:
  train: prompts.jsonl
scoring:
  scorer: random
rollout:
  engine: torch
  n: 2
  max_tokens: 6
  max_batch_rows: 2
rl:
  prompts_per_step: 2
  lr: 1.0e-4
eval:
  before: false
  after: false
run:
  steps: 3
  progress: false
  threads: 1
  save_every: 1
"""


def _launch(args, cwd, nproc, env=None):
    cmd = [sys.executable, "-m", "tao_fast.cli", "tune", *args]
    if nproc > 1:  # --standalone: a free local rendezvous port, so runs can overlap
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "tao_fast.cli", "tune", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return load_file(str(run_dir / "checkpoint-round1" / "model.safetensors"))


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory, embedded, tiny_model):
    """Side by side: the embedded model on 1 rank and on 2 ranks (DDP), with no training states
    and bf16 checkpoints (CI's disk has ~1 GB free); the tiny model on 1 rank, and on 2 ranks
    with FSDP2 where rank 1 SIGKILLs itself in step 2 (after step 1's state is saved)."""
    d = tmp_path_factory.mktemp("dist")
    (d / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"Say something about {w}."}) + "\n"
        for w in ["cats", "rain", "tea", "maps", "jazz"]))
    (d / "c.yaml").write_text(CONFIG)
    (d / "heldout.jsonl").write_text("".join(
        json.dumps({"prompt": f"Name a {w}."}) + "\n" for w in ["colour", "fruit", "city"]))
    # + a held-out eval after the run: 3 greedy answers, split 2 + 1 over two ranks
    small = ["run.keep_states=0", "run.checkpoint_dtype=bfloat16", "eval.after=true",
             "data.eval=heldout.jsonl", "eval.max_tokens=6"]
    tiny = [f"model.path={tiny_model}"]
    runs = (("one", 1, small, None), ("two", 2, small, None),
            ("tiny-one", 1, [*tiny, "run.keep_states=0"], None),
            ("killed", 2, [*tiny, "rl.parallel=fsdp"], {"TAO_FAST_KILL_AT": "2@1"}))
    procs = {name: _launch(["--config", "c.yaml", f"run.output_dir={name}", *extra], d, n, env)
             for name, n, extra, env in runs}
    yield d, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    shutil.rmtree(d, ignore_errors=True)  # ~0.6 GB of checkpoints; module dirs outlive the module


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_fast_and_it_resumes(torchrun_runs):
    """An FSDP2 run (states gathered from the shards to rank 0, loaded back into shards):
    rank 1 SIGKILLs itself in step 2 (TAO_FAST_KILL_AT=2@1, after step 1's state); the
    launcher stops within seconds with one clear line; --resume finishes it, landing on the
    1-rank run's weights (up to summation order: FSDP reduce-scatters per micro-batch over 2
    ranks). Runs first (file order), while the fixture's other runs go on."""
    d, procs = torchrun_runs
    p, run = procs["killed"], d / "killed"
    deadline = time.time() + 400
    while not (run / "state" / "latest").exists():  # step 1 done and its state saved
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    t0 = time.time()  # rank 1 dies moments later, once step 2's rollouts are in
    out = p.communicate(timeout=120)[0]
    took = time.time() - t0
    assert p.returncode != 0
    assert took < 60, took
    assert ("rank 0: stopped by the launcher" in out
            or "rank 0: lost contact with the other ranks" in out), out[-3000:]
    assert f"tao-fast tune --resume {run}" in out
    assert not (run / "checkpoint-round1").exists()

    r = _launch(["--resume", str(run)], d, 2)
    out = r.communicate(timeout=600)[0]
    assert r.returncode == 0, out[-3000:]
    assert "resuming" in out
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]
    assert procs["tiny-one"].wait(timeout=600) == 0
    for a, b in zip(_metrics(d / "tiny-one"), _metrics(run)):
        assert b["reward_mean"] == a["reward_mean"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    want, got = _weights(d / "tiny-one"), _weights(run)
    assert set(want) == set(got)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-5


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_curve(torchrun_runs, embedded):
    """The embedded model, same global batch (2 prompts x 2 candidates per step) on 1 and 2
    ranks. The samples are the same token for token (the torch engine seeds each prompt chunk
    from its global index, and max_batch_rows = n gives every chunk one prompt on both runs),
    so rewards match exactly; loss, gradient norm and weights differ only by summation order
    (fp32, ~1e-7 relative; GRPO's on-policy loss is ~1e-6 itself, so it is compared in
    absolute terms). The checkpoints are bf16: a ~1e-7 difference moves a weight across a
    bf16 rounding boundary with odds ~1e-7 / 2^-8: at most one bf16 step apart, and rarely."""
    d, procs = torchrun_runs
    for name in ("one", "two"):
        out = procs[name].communicate(timeout=600)[0]
        assert procs[name].returncode == 0, out[-3000:]
    one, two = _metrics(d / "one"), _metrics(d / "two")
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["reward_mean"] == a["reward_mean"]
        assert b["gen_tokens"] == a["gen_tokens"] and b["train_tokens"] == a["train_tokens"]
        assert b["samples"] == a["samples"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-6)
    ea, eb = (json.loads((d / r / "eval_after.json").read_text()) for r in ("one", "two"))
    assert [x["response"] for x in eb["records"]] == [x["response"] for x in ea["records"]]
    assert eb["n"] == 3 and eb["accuracy"] == ea["accuracy"]
    wa, wb = _weights(d / "one"), _weights(d / "two")
    base = load_file(str(embedded[2] / "model.safetensors"))
    n = moved = off = 0
    for k in wa:
        assert wa[k].dtype == wb[k].dtype == torch.bfloat16, k
        a, b = wa[k].float(), wb[k].float()
        step = torch.maximum(a.abs(), b.abs()) * 2.0**-7 + 1e-6  # one bf16 step, and near 0
        assert bool(((a - b).abs() <= step).all()), k
        n, off = n + a.numel(), off + int((a != b).sum())
        moved += int((wa[k] != base[k].to(torch.bfloat16)).sum())
    assert off / n < 1e-3, off / n
    assert moved / n > 0.05, moved / n  # and training did move the weights (lr 1e-4, 3 steps)
    # rank 0 alone wrote the run directory: one metrics line per step, one state
    assert (d / "two" / "summary.json").exists() and not list((d / "two").glob(".write-test*"))


def _vllm_config(**scoring) -> str:
    """CONFIG with vLLM rollouts (bf16, a small KV cache), 4 prompts a step at lr 1e-2, 2 steps,
    a held-out eval after, no training states."""
    cfg = yaml.safe_load(CONFIG)
    cfg["rollout"] = {"engine": "vllm", "n": 2, "max_tokens": 4, "dtype": "bfloat16",
                      "kv_cache_gb": 0.0625, "max_model_len": 128}
    cfg["rl"].update(prompts_per_step=4, lr=1e-2)
    cfg["eval"]["after"] = True
    cfg["run"].update(steps=2, keep_states=0)
    cfg["scoring"].update(scoring)
    return yaml.safe_dump(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("tp,parallel,sync", [(2, "ddp", "reload"), (1, "fsdp", "alias"),
                                           (2, "fsdp", "reload")])
def test_vllm_rollouts_under_torchrun(tmp_path, tiny_model, tp, parallel, sync):
    """vLLM on every rank, its workers being torchrun's own processes (external launcher):
    tp=2 makes the two ranks one tensor-parallel engine (each holds half of vLLM's weights;
    they sample the same prompts in lockstep), tp=1 gives each rank a whole engine for half
    the prompts (the engines step together, so one with no prompts still takes part); under
    FSDP2 its bf16 whole-weight replica is vLLM's own storage ("alias": one copy per rank),
    and with tp=2 there is no replica: the TP shards load from the gathered FSDP shards. After step 1's update (lr 1e-2) the new weights must be in vLLM: step 2's
    sampler log-probs agree with the learner's to 2e-3 with the sync (0.29 when it was left
    out, tried by hand), and the held-out eval after the run goes through the same engine."""
    pytest.importorskip("vllm")
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"Say something about {w}."}) + "\n"
        for w in ["cats", "rain", "tea", "jazz"]))
    (tmp_path / "heldout.jsonl").write_text(json.dumps({"prompt": "Hi?"}) + "\n")
    (tmp_path / "c.yaml").write_text(_vllm_config())
    p = _launch(["--config", "c.yaml", f"model.path={tiny_model}", "data.eval=heldout.jsonl",
                 f"rollout.tensor_parallel={tp}", f"rl.parallel={parallel}",
                 "run.output_dir=run"], tmp_path, 2)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    if parallel == "fsdp":  # a TP engine loads from the FSDP shards: no whole-weight replica
        assert ("no whole-weight replica" if tp > 1 else "bfloat16 replica per rank") in out
    lines = _metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["gen_tokens"] == 4 * 2 * 4  # every prompt's 2 candidates, 4 tokens each
        assert m["sync_path"] == sync
    assert lines[1]["sampler_logprob_abs_diff"] < 0.02, lines[1]
    assert (tmp_path / "run" / "eval_after.json").exists()  # 1 prompt: one engine gets none
    assert (tmp_path / "run" / "checkpoint-round1" / "model.safetensors").exists()
    if tp == 1:  # two data-parallel engines cannot share a judge on the policy
        (tmp_path / "j.yaml").write_text(_vllm_config(scorer={"type": "judge",
                                                               "model": "policy"}))
        p = _launch(["--config", "j.yaml", f"model.path={tiny_model}", "run.output_dir=j"],
                    tmp_path, 2)
        out = p.communicate(timeout=600)[0]
        assert p.returncode != 0 and "a judge on the policy model under vLLM data" in out, out


def test_tensor_parallel_needs_vllm_and_ranks(tmp_path, tiny_model):
    """rollout.tensor_parallel > 1 with the torch engine, or on one process: a clear error."""
    import tao_fast
    from tao_fast.config import ConfigError, load_config

    cfg = load_config(overrides=[f"model.path={tiny_model}", "rollout.engine=torch",
                                 "rollout.tensor_parallel=2", "eval.before=false",
                                 f"run.output_dir={tmp_path / 'r'}", "run.progress=false"])
    with pytest.raises(ConfigError, match="torch engine has no tensor parallelism"):
        tao_fast.tune(cfg)
    with pytest.raises(ConfigError, match="weight_sync=reload"):
        load_config(overrides=["rollout.tensor_parallel=2", "rollout.weight_sync=shared"])


@pytest.mark.slow
def test_two_nodes_by_rendezvous_give_the_one_rank_curve(torchrun_runs, tiny_model):
    """Multi-node as torchrun does it: two launchers (one per 'node', here both on localhost)
    meet through a c10d rendezvous and make one 2-rank run in a shared output directory; it
    matches the 1-rank run of the same config (tiny model) step for step."""
    d, procs = torchrun_runs
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=tao-test",
         "-m", "tao_fast.cli", "tune", "--config", "c.yaml", f"model.path={tiny_model}",
         "run.output_dir=nodes", "run.keep_states=0"],
        cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for p in nodes:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    assert procs["tiny-one"].wait(timeout=600) == 0
    one, two = _metrics(d / "tiny-one"), _metrics(d / "nodes")
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["reward_mean"] == a["reward_mean"] and b["samples"] == a["samples"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    want, got = _weights(d / "tiny-one"), _weights(d / "nodes")
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-5
