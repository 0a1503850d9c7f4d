"""Memory accounting (tao_fast.rl.memory): parameter counts, KV cache, the 8B/70B layouts, and
the learner estimate against the measured peak of real Learner steps on small models."""
import json
import subprocess
import sys

import pytest
import torch

from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl import memory
from tao_fast.rl.memory import GiB, KNOWN, Shape


def test_parameter_counts():
    assert Shape.from_hf(KNOWN["llama-3-8b"]).params() == 8_030_261_248  # Meta's 8.03B
    assert Shape.from_hf(KNOWN["llama-3-70b"]).params() == 70_553_706_496  # 70.55B
    assert Shape.from_hf(KNOWN["smollm2-135m"]).params() == 134_515_008  # docs/DESIGN.md: 134.5M
    for tied, bias in ((False, False), (True, True)):
        args = ModelArgs(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3,
                         num_heads=4, num_kv_heads=2, tie_word_embeddings=tied, qkv_bias=bias)
        model = Transformer(args)
        assert Shape.from_args(args).params() == sum(p.numel() for p in model.parameters())


def test_kv_cache_bytes():
    s = Shape.from_hf(KNOWN["llama-3-8b"])
    # 128 KiB per token: 32 layers x K,V x 8 heads x 128 dims x 2 bytes
    assert memory.kv_cache_bytes(s, 1) == 32 * 2 * 8 * 128 * 2 == 131072
    assert memory.kv_cache_bytes(s, 1000, tp=2) == memory.kv_cache_bytes(s, 1000) // 2
    assert memory.kv_cache_bytes(s, 1, tp=16) == memory.kv_cache_bytes(s, 1, tp=8)  # replicated


def test_activation_checkpointing_keeps_only_layer_inputs():
    s = Shape.from_hf(KNOWN["llama-3-8b"])
    full = memory.activation_bytes(s, 8192, 2)
    ckpt = memory.activation_bytes(s, 8192, 2, checkpointing=True)
    assert ckpt < full / 8
    assert ckpt == 32 * 8192 * 4096 * 2 + 8192 * memory.activation_elems_per_token_layer(s) * 2


def test_layouts_for_8b_and_70b_on_8x80gb():
    r8 = memory.layout(Shape.from_hf(KNOWN["llama-3-8b"]), 8, 80, name="llama-3-8b")
    assert r8["fits"] and r8["vllm_tp"] == 1 and not r8["cpu_offload"]
    assert r8["train"]["AdamW moments (fp32)"] == pytest.approx(2 * 4 * 8_030_261_248 / 8)
    r70 = memory.layout(Shape.from_hf(KNOWN["llama-3-70b"]), 8, 80, name="llama-3-70b")
    # fp32 master + AdamW alone are 105 GiB per GPU even sharded 8 ways: they go to the host
    assert r70["fits"] and r70["cpu_offload"] and r70["vllm_tp"] == 4
    for r in (r8, r70):
        assert r["train_total"] <= 80 * GiB * r["util"] + 1
        assert r["generate_total"] <= 80 * GiB * r["util"] + 1
        assert r["kv_seqs_per_engine"] >= 64
        assert r["colocation_saves_total"] > 0
    assert not memory.layout(Shape.from_hf(KNOWN["llama-3-70b"]), 8, 80,
                             cpu_offload=False)["fits"]


def test_memory_command_prints_the_tables():
    out = subprocess.run([sys.executable, "-m", "tao_fast.rl.memory", "--model", "llama-3-8b",
                          "--gpus", "8", "--gpu-gb", "80"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "8.03B params on 8 x 80 GiB" in out.stdout and "TP=1" in out.stdout
    assert "| **total** |" in out.stdout and "Colocation saves" in out.stdout



# ---- LoRA (model.lora): a frozen bf16 base, fp32 adapters -------------------------------------

TINY = Shape(vocab=96, hidden=32, inter=48, layers=3, heads=4, kv_heads=2, head_dim=8, tied=False)


def test_lora_params_by_hand():
    # per layer, in + out: q 32+32, k 32+16, v 32+16, o 32+32, gate 32+48, up 32+48, down 48+32
    assert 64 + 48 + 48 + 64 + 80 + 80 + 80 == 464
    assert memory.lora_params(TINY, 4) == 3 * 4 * 464 == 5568
    assert memory.lora_params(TINY, 4, ("q_proj", "v_proj")) == 3 * 4 * (64 + 48) == 1344
    assert memory.lora_params(TINY, 4, "v_proj, q_proj") == 1344  # PEFT's comma list
    assert memory.lora_params(TINY, 4, "all-linear") == 5568
    assert memory.lora_params(TINY, 0) == 0
    # llama-3-8b, rank 16: 16 * 32 * (8192 + 5120 + 5120 + 8192 + 3 * 18432) = 41.9M
    assert memory.lora_params(Shape.from_hf(KNOWN["llama-3-8b"]), 16) == 41_943_040
    with pytest.raises(ValueError, match="target_modules"):
        memory.lora_target_names("q_proj,qkv_proj")


def test_lora_params_match_the_lora_model():
    lora = pytest.importorskip("tao_fast.models.lora")
    from tao_fast.config import LoraConfig

    args = ModelArgs(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3,
                     num_heads=4, num_kv_heads=2)
    assert Shape.from_args(args) == TINY
    for targets in ("all-linear", "q_proj,v_proj", "k_proj,up_proj,down_proj"):
        m = lora.apply_lora(Transformer(args), LoraConfig(rank=4, target_modules=targets),
                            torch.float32)
        trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert trained == memory.lora_params(TINY, 4, targets), targets


def _saved_bytes_per_token_layer(model, tokens_per_seq=32, seqs=4):
    """Bytes autograd saves in the decoder layers' forward (model parameters excluded, each
    storage once) per token and layer."""
    from tao_fast.rl.packing import make_packed_batch

    b = make_packed_batch([list(range(1, tokens_per_seq + 1))] * seqs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = model.embed_tokens(b.input_ids).detach().requires_grad_(True)
    cos, sin = model.rotary(b.positions)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for blk in model.layers:
            x = model._block(blk, x, cos, sin, b.cu_seqlens, b.max_seqlen)
    return sum(seen.values()) / (tokens_per_seq * seqs * len(model.layers))


@pytest.mark.parametrize("rank,targets,dtype", [
    (8, "all-linear", torch.bfloat16), (16, "all-linear", torch.bfloat16),
    (8, "q_proj,v_proj", torch.bfloat16), (4, "down_proj", torch.bfloat16),
    (8, "all-linear", torch.float32)])
def test_lora_activation_delta_matches_saved_tensors(rank, targets, dtype):
    """What LoRA changes in the saved activations, against saved_tensors_hooks: the frozen
    linears and norms keep no inputs, the adapted linears keep an fp32 copy of theirs (an
    fp32 base: the input itself), the adapters keep x @ A^T."""
    lora = pytest.importorskip("tao_fast.models.lora")
    from tao_fast.config import LoraConfig

    args = ModelArgs(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    plain = Transformer(args).to(dtype)
    adapted = lora.apply_lora(Transformer(args), LoraConfig(rank=rank, target_modules=targets),
                              dtype)
    for m in (plain, adapted):
        m.ops_backend = "torch"
    delta = _saved_bytes_per_token_layer(adapted) - _saved_bytes_per_token_layer(plain)
    s, nbytes = Shape.from_args(args), dtype.itemsize
    assert delta == memory.lora_activation_delta(s, rank, targets, nbytes)
    assert memory.activation_bytes(s, 128, nbytes, lora_rank=rank, lora_targets=targets) == (
        memory.activation_bytes(s, 128, nbytes) + 2 * 128 * delta)


def test_lora_rank_0_is_todays_full_weight_accounting():
    s8, s70 = Shape.from_hf(KNOWN["llama-3-8b"]), Shape.from_hf(KNOWN["llama-3-70b"])
    kw = dict(shards=8, master_bytes=4, act_bytes=2, checkpointing=True, micro_batches=2)
    full = memory.learner_bytes(s8, 8192, **kw)
    assert memory.learner_bytes(s8, 8192, lora_rank=0, lora_targets=("q_proj",), **kw) == full
    assert full["peak"] == 23_396_360_192  # the numbers before LoRA was added
    assert memory.learner_bytes(s70, 8192, **kw)["peak"] == 160_053_084_160
    assert memory.activation_bytes(s8, 8192, 2, True, lora_rank=0) == \
        memory.activation_bytes(s8, 8192, 2, True)
    before = {("llama-3-8b", 1): (True, True, 1, 24_268_808_192, 480_399),
              ("llama-3-8b", 8): (True, False, 1, 40_329_330_688, 388_500),
              ("llama-3-70b", 2): (False, True, 2, 92_921_995_264, 51_719),
              ("llama-3-70b", 8): (True, True, 4, 57_645_142_016, 534_064)}
    for (name, gpus), want in before.items():
        r = memory.layout(Shape.from_hf(KNOWN[name]), gpus, 80, lora_rank=0)
        assert (r["fits"], r["cpu_offload"], r["vllm_tp"], r["train_total"],
                r["kv_tokens_per_engine"]) == want, (name, gpus)
        assert r["lora"] is None


def test_lora_learner_bytes():
    s = Shape.from_hf(KNOWN["llama-3-8b"])
    a, P = memory.lora_params(s, 16), s.params()
    r = memory.learner_bytes(s, 8192, shards=4, checkpointing=True, lora_rank=16)
    assert r["weights"] == P * 2 / 4  # the frozen bf16 base, sharded
    assert (r["adapter"], r["grads"], r["adamw"]) == (4 * a, 4 * a, 8 * a)  # replicated
    assert r["activations"] == memory.activation_bytes(s, 8192, 2, True, lora_rank=16)
    assert r["backward_transients"] == (memory.backward_transient_bytes(s, 8192, 2)
                                        + 4 * 8192 * s.inter)  # + down_proj's fp32 input grad
    # forward/backward holds everything at once (the adapter's gradients are all small)
    assert r["peak"] == r["sum"]
    full = memory.learner_bytes(s, 8192, shards=4, act_bytes=2, checkpointing=True)
    assert r["peak"] < full["peak"] / 2.5  # 11.9 vs 31.9 GiB


def test_8b_lora_fits_on_one_80gb_gpu_full_weight_only_offloaded():
    s = Shape.from_hf(KNOWN["llama-3-8b"])
    lo = memory.layout(s, 1, 80, lora_rank=16)
    assert lo["fits"] and not lo["cpu_offload"] and lo["vllm_tp"] == 1
    assert lo["train"]["frozen base = rollout weights (bf16, shared)"] == s.params() * 2
    assert lo["train"]["LoRA adapter (fp32)"] == 4 * 41_943_040
    assert "FSDP gather buffers" not in lo["train"]  # one rank: nothing sharded
    assert lo["kv_seqs_per_engine"] >= 64 and lo["train_total"] < 24 * GiB
    # full-weight on one GPU fits only with master/grads/AdamW in host memory (~120 GiB)
    full = memory.layout(s, 1, 80)
    assert full["fits"] and full["cpu_offload"]
    assert full["host_bytes_per_gpu"] == pytest.approx(16 * s.params())
    assert not memory.layout(s, 1, 80, cpu_offload=False)["fits"]


def test_70b_lora_on_2_and_8_gpus():
    s = Shape.from_hf(KNOWN["llama-3-70b"])
    P = s.params()
    assert not memory.layout(s, 1, 80, lora_rank=16)["fits"]  # 131 GiB of bf16 base
    # two GPUs: vLLM's TP=2 copy is 66 GiB a GPU, not enough left for 64 sequences of KV
    # cache even with the base shard in host memory
    r2 = memory.layout(s, 2, 80, lora_rank=16)
    assert not r2["fits"] and r2["kv_seqs_per_engine"] < 64
    r8 = memory.layout(s, 8, 80, lora_rank=16)
    assert r8["fits"] and not r8["cpu_offload"] and r8["vllm_tp"] == 8
    assert r8["train"]["frozen base shard (bf16, FSDP2)"] == P * 2 / 8  # counted next to
    assert r8["train"]["rollout weights (bf16, vLLM's TP copy)"] == P * 2 / 8  # vLLM's
    assert r8["colocation_saves"]["second bf16 weight copy"] == 0
    for phase in ("train_total", "generate_total"):
        assert r8[phase] <= 80 * GiB * r8["util"] + 1
    assert r8["kv_seqs_per_engine"] >= 64
    # full-weight 70B on 8 GPUs needs CPU offload; LoRA does not
    assert memory.layout(s, 8, 80)["cpu_offload"]


def test_memory_command_prints_a_lora_plan(capsys):
    rc = memory.main(["--model", "llama-3-8b", "--gpus", "1", "--gpu-gb", "80",
                      "--lora-rank", "16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "**LoRA plan**: rank 16 on all-linear: 41.9M adapter params" in out
    assert "fits with these settings" in out and "| LoRA adapter (fp32) |" in out
    assert "| frozen base = rollout weights (bf16, shared) |   15.0 |" in out
    rc = memory.main(["--model", "llama-3-70b", "--gpus", "2", "--lora-rank", "8",
                      "--lora-targets", "q_proj,v_proj", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert rc == 1 and not r["fits"]
    assert r["lora"]["targets"] == ["q_proj", "v_proj"]
    assert r["lora"]["adapter_params"] == memory.lora_params(
        Shape.from_hf(KNOWN["llama-3-70b"]), 8, "q_proj,v_proj")
    with pytest.raises(SystemExit):
        memory.main(["--model", "llama-3-8b", "--lora-rank", "8", "--lora-targets", "qkv"])

MEASURE = r"""
import json, sys
import torch
from tao_fast.config import RLConfig
from tao_fast.models.config import ModelArgs
from tao_fast.models.llama import Transformer
from tao_fast.rl.trainer import Learner, Sample

torch.set_num_threads(1)
tokens, seqs, ckpt = map(int, sys.argv[1:4])
dev = sys.argv[4]
args = ModelArgs(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_layers=4,
                 num_heads=8, num_kv_heads=2)
g = torch.Generator().manual_seed(0)
L = tokens // seqs
samples = [Sample(torch.randint(0, 16384, (L,), generator=g).tolist(), 8, (-1.0) ** i,
                  (-torch.rand(L - 8, generator=g)).tolist()) for i in range(seqs)]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def learner(a):
    m = Transformer(a).to(dev)
    m.gradient_checkpointing = bool(ckpt)
    return Learner(m, RLConfig(micro_batch_tokens=tokens), 1.0, "torch")

# one-time costs (kernels, thread pools, allocator) go into the baseline: a tiny model first
tiny = ModelArgs(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                 num_kv_heads=1)
learner(tiny).step([Sample([1, 2, 3, 4], 2, 1.0, [-1.0, -1.0]), Sample([1, 2, 5], 2, -1.0, [-1.0])])
if dev == "cpu":
    try:  # reset the peak (VmHWM) to the current RSS, so the warm-up's peak is not counted
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = status("VmRSS")
else:
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
lr = learner(args)
for _ in range(2):  # the second step is the steady state: AdamW moments exist
    lr.step(samples)
if dev == "cpu":
    # VmHWM, this address space's peak RSS: ru_maxrss would not do, Linux carries it over
    # exec from the forked parent (a pytest process holding the 135M model reads ~1.6 GiB)
    peak = status("VmHWM")
else:
    peak = torch.cuda.max_memory_allocated()
print(json.dumps({"measured": peak - base}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("tokens,seqs,ckpt", [(2048, 8, 0), (2048, 8, 1)])
def test_estimate_matches_measured_peak(tokens, seqs, ckpt):
    """Two Learner steps of a 29M-parameter model (fp32: 110 MiB of weights, 440 with grads
    and AdamW) in a fresh process; the estimate's `peak` against the measured increase of
    peak memory: VmHWM on the CPU (the process's peak resident set; ru_maxrss is inherited
    across exec from the parent on Linux, so it is not used), max_memory_allocated on CUDA. Tolerance -20% / +15%: RSS also holds what the estimate does not model (glibc
    arenas keeping freed blocks, Python objects, packing buffers: measured 3-8% above the
    estimate on these shapes), while an estimate above the measurement means a component is
    double-counted, which we want to catch sooner."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tokens), str(seqs), str(ckpt), dev],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    s = Shape.from_args(ModelArgs(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                                  num_layers=4, num_heads=8, num_kv_heads=2))
    est = memory.learner_bytes(s, tokens, master_bytes=4, checkpointing=bool(ckpt),
                               reference_attention=True, seq_len=tokens // seqs)
    ratio = est["peak"] / measured
    print(f"tokens={tokens} ckpt={ckpt} {dev}: estimate {est['peak'] / 2**20:.0f} MiB, "
          f"measured {measured / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert 0.80 <= ratio <= 1.15, (est, measured)
