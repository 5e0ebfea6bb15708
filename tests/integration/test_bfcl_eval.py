"""``slmgate eval bfcl`` against the live gateway: two BFCL items on the small model, scored by
BFCL's checker."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bfcl_eval as be

pytestmark = pytest.mark.slow

KEY = "sk-test-slmgate"


def test_two_simple_python_items_on_slm(server: str, tmp_path: Path) -> None:
    argv = ["--base-url", server, "--api-key", KEY, "--policies", "slm", "--categories",
            "simple_python", "--limit", "2", "--max-tokens", "64", "--run-id", "it", "--quiet",
            "--json", str(tmp_path / "bfcl.json")]  # fmt: skip
    args = be.parse_args(argv)
    report = be.evaluate(args, server)
    records = [be.record_from_dict(r) for r in report["records"]]
    assert [(r.category, r.id, r.policy) for r in records] == [
        ("simple_python", "simple_python_0", "slm"),
        ("simple_python", "simple_python_1", "slm"),
    ]
    for r in records:
        assert r.request_error is False, r.error
        assert isinstance(r.success, bool)
        assert r.latency_s > 0
        assert r.task_id == f"bfcl-simple_python-{r.id}-slm-it"
        assert r.tier == "slm"
        assert r.completion_tokens is not None
        assert 0 < r.completion_tokens <= 64
        # the checker ran: a failure carries BFCL's reason, a success none
        assert (r.error_type is None) == r.success
        if r.calls:
            assert r.executable_local is not None
    summary = report["summaries"][0]
    assert summary["items"] == 2
    assert summary["accuracy"] == sum(r.success for r in records) / 2
    assert summary["request_errors"] == 0
