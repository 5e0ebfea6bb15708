"""The pure parts of the vLLM tier: restart decisions, busy-time shares, spec counters, specs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from decoding.models import ModelSpec, launch_defaults
from decoding.share_clock import ShareClock
from decoding.vllm_backend import SpecCounters, parse_spec_counters, spec_stats_of
from decoding.vllm_launch import Action, LaunchSpec, ServerState, next_action, restart_delay

SPEC = LaunchSpec(model="builtin:smollm2-135m-instruct", unhealthy_restart_s=30.0)


def test_restart_delay_doubles_from_base_up_to_cap() -> None:
    assert [restart_delay(n, 1.0, 10.0) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert restart_delay(-1, 0.5, 10.0) == 0.5


@pytest.mark.parametrize(
    ("state", "alive", "healthy", "unhealthy_for", "expected"),
    [
        (ServerState.STARTING, True, False, 500.0, Action.WAIT),  # loading: start deadline only
        (ServerState.STARTING, True, True, 0.0, Action.MARK_READY),
        (ServerState.READY, True, True, 0.0, Action.WAIT),
        (ServerState.READY, True, False, 0.0, Action.MARK_UNHEALTHY),
        (ServerState.UNHEALTHY, True, False, 29.0, Action.WAIT),
        (ServerState.UNHEALTHY, True, False, 30.0, Action.KILL),  # hung: kill, then restart
        (ServerState.UNHEALTHY, True, True, 0.0, Action.MARK_READY),  # it came back
        (ServerState.READY, False, False, 0.0, Action.RESTART),
        (ServerState.STARTING, False, False, 0.0, Action.RESTART),
    ],
)
def test_next_action(
    state: ServerState, alive: bool, healthy: bool, unhealthy_for: float, expected: Action
) -> None:
    assert next_action(state, alive, healthy, unhealthy_for, SPEC) is expected


def test_launch_spec_argv_and_interpreter(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    spec = LaunchSpec(model="m", python=str(tmp_path), port=9, args=("--enforce-eager",))
    assert spec.interpreter() == str(tmp_path / "bin" / "python")
    assert spec.argv("/models/x", "x", 9) == [
        str(tmp_path / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/models/x", "--served-model-name", "x", "--host", "127.0.0.1",
        "--port", "9", "--enforce-eager",
    ]  # fmt: skip
    home = LaunchSpec(model="~/models/x", python="~/venv")
    assert (home.model, home.python) == (os.path.expanduser("~/models/x"),
                                         os.path.expanduser("~/venv"))  # fmt: skip
    with pytest.raises(ValueError, match="port"):
        LaunchSpec(model="m", port=70000)
    with pytest.raises(ValueError, match="> 0"):
        LaunchSpec(model="m", restart_backoff_s=0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_share_clock_splits_overlapping_time_evenly() -> None:
    now = FakeClock()
    clock = ShareClock(now)
    a = clock.begin()  # t=0: A alone until t=4
    now.t = 4.0
    b = clock.begin()  # t=4..10: A and B share
    now.t = 10.0
    share_a = clock.end(a)
    now.t = 12.0  # B alone for 2 s
    share_b = clock.end(b)
    assert share_a == pytest.approx(4.0 + 3.0)
    assert share_b == pytest.approx(3.0 + 2.0)
    assert share_a + share_b == pytest.approx(12.0)  # the server's busy time, billed once
    now.t = 20.0  # idle time is nobody's
    c = clock.begin()
    now.t = 21.0
    assert clock.end(c) == pytest.approx(1.0)
    assert clock.in_flight == 0


METRICS = """\
# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="qwen"} 9.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="qwen"} 1.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="qwen"} 36.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="qwen"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="1"} 2.0
vllm:num_requests_running{engine="0"} 0.0
"""


def test_parse_spec_counters_sums_engines_and_ignores_other_series() -> None:
    assert parse_spec_counters(METRICS) == SpecCounters(
        drafts=10.0, drafted=36.0, accepted=6.0, per_position=(4.0, 2.0)
    )
    assert parse_spec_counters('vllm:num_requests_running{engine="0"} 0.0\n') is None


def test_spec_stats_of_one_request() -> None:
    # 8 drafts of 4 tokens over the request: 4 had all 4 accepted, 0 had 3, 0 had 2, ...
    after = SpecCounters(drafts=17, drafted=68, accepted=22, per_position=(10, 8, 6, 4))
    before = SpecCounters(drafts=9, drafted=36, accepted=6, per_position=(6, 4, 2, 0))
    stats = spec_stats_of(after.minus(before), completion_tokens=21, method="ngram")
    assert (stats.drafter, stats.drafted, stats.accepted, stats.steps) == ("vllm:ngram", 32, 16, 5)
    # 4 steps accepted 4 (emitted 5); the fifth step emitted one token
    assert stats.histogram == (1, 0, 0, 0, 4)
    assert stats.mean_accepted_length == pytest.approx(21 / 5)


def test_vllm_model_spec_checks() -> None:
    launched = ModelSpec.from_mapping({
        "name": "v", "kind": "vllm", "device": "cpu",
        "launch": {"model": "builtin:qwen2.5-coder-0.5b-instruct", "args": ["--enforce-eager"]},
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 4},
    })  # fmt: skip
    assert launched.launch is not None
    assert launched.launch.args == ("--enforce-eager",)
    assert launched.served_model_name() == "qwen2.5-coder-0.5b-instruct"
    assert launched.compute_price_per_hour("cpu", 2) == pytest.approx(2 * 0.0504)
    defaults = launch_defaults(launched)
    assert "--enable-prompt-tokens-details" in defaults
    assert defaults[defaults.index("--tool-call-parser") + 1] == "hermes"
    spec_json = defaults[defaults.index("--speculative-config") + 1]
    assert json.loads(spec_json) == {"method": "ngram", "num_speculative_tokens": 4}
    assert defaults[defaults.index("--gpu-memory-utilization") + 1] == "0.25"

    remote = ModelSpec("r", kind="vllm", base_url="http://gpu:8000/v1", remote_model="m",
                       price_per_gpu_hour=2.5)  # fmt: skip
    assert remote.resolved_device() == "cuda"  # a server reached by URL: priced as a GPU
    assert remote.compute_price_per_hour(remote.resolved_device(), 64) == 2.5
    assert ModelSpec("r", kind="vllm", base_url="http://x/v1", remote_model="m",
                     price_in_per_mtok=0.1).compute_price_per_hour("cuda", 1) is None  # fmt: skip

    with pytest.raises(ValueError, match="base_url or launch"):
        ModelSpec("v", kind="vllm", remote_model="m")
    with pytest.raises(ValueError, match="base_url or launch"):
        ModelSpec("v", kind="vllm", base_url="http://x/v1", launch=LaunchSpec(model="/tmp"))
    with pytest.raises(ValueError, match="unknown builtin"):
        ModelSpec("v", kind="vllm", launch=LaunchSpec(model="builtin:nope"))
    with pytest.raises(ValueError, match="neither builtin"):
        ModelSpec("v", kind="vllm", launch=LaunchSpec(model="/no/such/dir"))
    with pytest.raises(ValueError, match="need kind vllm"):
        ModelSpec("o", kind="openai", base_url="http://x/v1", remote_model="m",
                  launch=LaunchSpec(model="/tmp"))  # fmt: skip
    with pytest.raises(ValueError, match="price_per_core_hour"):
        ModelSpec("o", kind="openai", base_url="http://x/v1", remote_model="m",
                  price_per_gpu_hour=1.0)  # fmt: skip
