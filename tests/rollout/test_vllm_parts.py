"""The vLLM engine's choices made once, as plain functions (no vLLM needed): which KV-cache
sleep path a platform gets, and what rollout.weight_sync=auto resolves to."""
import pytest

from tao_fast.config import RolloutConfig
from tao_fast.rollout.vllm import kv, weights


@pytest.mark.parametrize("on_cpu,available,cls,path,sleep_mode", [
    (True, False, kv.CpuKvFree, "cpu-kv-free", False),
    (True, True, kv.CpuKvFree, "cpu-kv-free", False),  # the CPU backend never uses sleep mode
    (False, True, kv.CudaSleep, "cuda-kv-cache", True),
    (False, False, kv.NoSleep, "none", False)])
def test_kv_path_chosen_once(on_cpu, available, cls, path, sleep_mode):
    got = kv.choose(on_cpu, available)
    assert got is cls and got.path == path and got.sleep_mode is sleep_mode


@pytest.mark.parametrize("sync,tp,on_cpu,want", [
    ("auto", 1, False, "shared"), ("auto", 1, True, weights.CPU_AUTO_SYNC),
    ("auto", 2, False, "reload"), ("auto", 2, True, "reload"),
    ("shared", 1, True, "shared"), ("reload", 1, False, "reload"), ("reload", 2, False, "reload")])
def test_weight_sync_resolved(sync, tp, on_cpu, want):
    ro = RolloutConfig(weight_sync=sync, tensor_parallel=tp)
    assert weights.resolve_sync(ro, on_cpu) == want
