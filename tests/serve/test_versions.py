"""--model RUN_DIR: the newest complete round is served, a new round is switched to while the
server runs, and a request in flight during the switch finishes on the old one."""
import json
import threading

import httpx
import openai
import pytest

from tao_fast.config import ConfigError
from tao_fast.serve.versions import ModelSwitcher, Version, initial_version, rounds


def make_run(tmp_path, tiny_model, tools, n_rounds=1):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  path: {tiny_model}\n")
    for n in range(1, n_rounds + 1):
        tools.copy_model(tiny_model, run / f"checkpoint-round{n}")
    return run


def test_newest_complete_round_and_bad_model_args(tmp_path, tiny_model, tools):
    run = make_run(tmp_path, tiny_model, tools, n_rounds=2)
    (run / "checkpoint-round3").mkdir()
    (run / "checkpoint-round3" / "config.json").write_text("{}")  # no weights: incomplete
    (run / "checkpoint-round9.tmp-abc").mkdir()  # tune's temporary name: never a round
    assert [n for n, _ in rounds(run)] == [1, 2]
    v, watch = initial_version(str(run))
    assert (v.name, v.round, watch) == ("checkpoint-round2", 2, run)
    assert v.fingerprint.startswith("checkpoint-round2-") and len(v.fingerprint) == 26
    base = tmp_path / "fresh"
    base.mkdir()
    (base / "config.yaml").write_text(f"model:\n  path: {tiny_model}\n")
    assert initial_version(str(base))[0].name == "base"  # no round yet: the run's model
    with pytest.raises(FileNotFoundError, match="does not exist"):
        initial_version(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a model directory"):
        initial_version(str(tmp_path / "empty"))


class FakeBackend:
    def __init__(self):
        self.closed = threading.Event()

    def close(self):
        self.closed.set()


def test_switcher_closes_the_old_backend_after_its_last_request():
    old, new = FakeBackend(), FakeBackend()
    sw = ModelSwitcher(old, Version("checkpoint-round1", "x", 1))
    entry = sw.acquire()
    sw.switch(new, Version("checkpoint-round2", "y", 2))
    assert sw.current.backend is new and not old.closed.is_set()
    with sw.use() as e:
        assert e.backend is new
    sw.release(entry)
    assert old.closed.wait(5) and not new.closed.is_set()


def test_new_round_is_served_and_in_flight_request_finishes(start, tiny_model, tmp_path, tools):
    run_dir = make_run(tmp_path, tiny_model, tools)
    run = start(model=str(run_dir), log_dir=str(tmp_path / "logs"), poll_s=0.2)
    c = openai.OpenAI(base_url=run.base_url, api_key="x", max_retries=0, timeout=60)
    assert c.models.list().data[0].version == "checkpoint-round1"
    old = run.svc.models.current
    gate, entered = threading.Event(), threading.Event()
    inner = old.backend.batcher.run_batch

    def held(key, prompts):  # the round-1 generation waits until round 2 is being served
        entered.set()
        gate.wait(60)
        return inner(key, prompts)

    old.backend.batcher.run_batch = held
    result = {}
    msg = [{"role": "user", "content": "in flight"}]
    t = threading.Thread(target=lambda: result.setdefault("r", c.chat.completions.create(
        model="m", messages=msg, max_tokens=4)))
    t.start()
    assert entered.wait(30)
    tools.copy_model(tiny_model, run_dir / "checkpoint-round2")
    tools.wait_for(lambda: c.models.list().data[0].version == "checkpoint-round2",
                   what="round 2 served")
    assert old.retired and old.refs == 1 and old.backend.engine is not None  # still in use
    r2 = c.chat.completions.create(model="m", messages=msg, max_tokens=4)
    assert r2.system_fingerprint.startswith("checkpoint-round2-")
    gate.set()
    t.join(30)
    assert result["r"].system_fingerprint.startswith("checkpoint-round1-")
    tools.wait_for(lambda: old.backend.engine is None, what="round 1 closed")
    h = run.health()
    assert h["model"]["version"] == "checkpoint-round2" and h["model"]["first_answer_s"] > 0
    assert h["switches"][-1]["first_answer_s"] == pytest.approx(h["model"]["first_answer_s"],
                                                                abs=1e-3)
    tools.wait_for(lambda: run.health()["log"]["written"] == 2, what="2 records")
    recs = tools.read_log(tmp_path / "logs")
    assert sorted(r["model_version"] for r in recs) == ["checkpoint-round1", "checkpoint-round2"]
    assert httpx.get(run.url + "/health").json()["status"] == "ok"
    json.dumps(h)


def test_a_lora_round_is_a_version_served_as_base_plus_adapter(tmp_path, tiny_model, tools):
    """A model.lora run's checkpoint-roundN is a PEFT adapter (no config.json): a complete
    round, loaded by the torch backend with its base merged, and given to vLLM's server as
    --model BASE --lora-modules NAME=ADAPTER."""
    from tao_fast.checkpoint import save_checkpoint
    from tao_fast.config import LoraConfig, ModelConfig
    from tao_fast.models import load_model
    from tao_fast.serve.vllm_server import VllmServer

    run = make_run(tmp_path, tiny_model, tools, n_rounds=1)
    model, tok, _ = load_model(ModelConfig(path=str(tiny_model), lora=LoraConfig(rank=4)))
    save_checkpoint(model, tok, run / "checkpoint-round2", base_model=str(tiny_model))
    assert not (run / "checkpoint-round2" / "config.json").exists()
    v, _ = initial_version(str(run))
    assert (v.name, v.round) == ("checkpoint-round2", 2)
    assert v.fingerprint.startswith("checkpoint-round2-")
    served, _, base_dir = load_model(v.path)  # the torch backend's load: base + adapter merged
    assert str(base_dir) == str(tiny_model) and served.lora_config is None
    server = VllmServer(v.path, served_name="tuned")
    server.port = 8000
    args = server.command()
    assert args[args.index("--model") + 1] == str(tiny_model)
    assert args[args.index("--lora-modules") + 1] == f"tuned={v.path}"
    assert args[args.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in args
    assert args[args.index("--served-model-name") + 1] == "tuned-base"
