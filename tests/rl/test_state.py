"""The resume state (tao_fast/rl/state.py ResumeState): JSON round trip and where it resumes."""
import json
import random

from tao_fast.rl.state import ResumeState


def test_round_trip_through_json_keeps_the_rng_stream():
    rng = random.Random(7)
    rng.random()
    st = ResumeState(round=2, step=3, learner_steps=13, order=[4, 1], python_rng=rng.getstate(),
                     metrics_lines=13, checkpoint="/runs/x/checkpoint-round1")
    back = ResumeState.from_json(json.loads(json.dumps({**st.to_json(), "optimizer": {}})))
    assert back == st
    again = random.Random()
    again.setstate(back.python_rng)
    assert again.random() == rng.random()


def test_next_position():
    st = ResumeState(round=1, step=3, learner_steps=3, order=[5, 6], python_rng=(), metrics_lines=3)
    assert st.next_position(steps_per_round=5) == (1, 4, [5, 6])  # mid-round: the next step
    assert st.next_position(steps_per_round=3) == (2, 1, [])  # the round was complete
