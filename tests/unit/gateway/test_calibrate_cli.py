"""``slmgate calibrate`` end to end on literal labels: a rule fitted, written, scored on held-out
labels, and an existing rule scored with ``--score-rule``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gateway.cli import main


def write_labels(path: Path, n: int, seed: int) -> None:
    """Tool answers whose success follows ``lp_q10`` (noisy), plus JSON answers following
    ``lp_min``; a free-text row the bundled rule has no model for."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lp = rng.uniform(-3.0, 0.0)
        ok = lp + rng.gauss(0.0, 0.6) > -1.5
        rows.append({"kind": "tools", "success": ok, "signals": {
            "lp_q10": lp, "lp_q25": lp / 2, "lp_q50": lp / 4, "lp_min": lp * 2, "valid": 1.0,
            "mean_prob": 0.5, "log_tokens": 3.0}})  # fmt: skip
        rows.append({"kind": "json", "success": ok, "signals": {
            "lp_min": lp, "lp_q10": lp / 2, "valid": 1.0, "mean_prob": 0.5}})  # fmt: skip
    rows.append({"kind": "text", "success": True, "signals": {"mean_prob": 0.9}})
    rows.append({"kind": "text", "success": False, "signals": {"mean_prob": 0.2}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_fit_holdout_and_score_an_existing_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cal, held, rule, out = (tmp_path / n for n in ("cal.jsonl", "held.jsonl", "r.json", "o.json"))
    write_labels(cal, 120, 1)
    write_labels(held, 120, 2)
    assert main(["calibrate", "--labels", str(cal), "--target-fallback-rate", "0.2",
                 "--deferral-out", str(rule), "--holdout", str(held),
                 "--score-rule", str(rule), "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    fitted, scored = report["holdout"], report["scored_rule"]["holdout"]
    assert scored == fitted  # the same rule, read back from its file, scores the same
    assert fitted["tools"]["rule_auroc"] > 0.75  # success follows lp_q10: the rule finds it
    assert fitted["json"]["rule_auroc"] > 0.75
    printed = capsys.readouterr().out
    assert f"rule {rule} ({rule}):" in printed
    assert "held out tools: 120 rows, rule AUROC" in printed


def test_the_bundled_rule_is_scored_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = tmp_path / "held.jsonl"
    write_labels(held, 40, 3)
    assert main(["calibrate", "--labels", str(held), "--target-fallback-rate", "0.2",
                 "--holdout", str(held), "--score-rule", "default"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "rule default (" in printed
    assert "held out text: 2 rows, no model for this kind in the rule" in printed
    assert "held out json: 40 rows, rule AUROC" in printed


def test_score_rule_needs_held_out_labels(tmp_path: Path) -> None:
    held = tmp_path / "held.jsonl"
    write_labels(held, 10, 4)
    with pytest.raises(SystemExit):
        main(["calibrate", "--labels", str(held), "--target-fallback-rate", "0.2",
              "--score-rule", "default"])  # fmt: skip


def test_the_pre_router_is_scored_on_held_out_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests whose success follows their prompt length: the fitted pre-router ranks them."""
    rng = random.Random(5)

    def rows(n: int) -> str:
        out = []
        for _ in range(n):
            chars = rng.uniform(3.0, 9.0)
            ok = chars + rng.gauss(0.0, 0.7) < 6.0  # short prompts: the small model does it
            out.append({"kind": "tools", "success": ok, "signals": {"mean_prob": 0.5},
                        "features": {"log_prompt_chars": chars, "tools": 1.0}})  # fmt: skip
        return "".join(json.dumps(r) + "\n" for r in out)

    cal, held, pre, out = (tmp_path / n for n in ("c.jsonl", "h.jsonl", "p.json", "o.json"))
    cal.write_text(rows(150))
    held.write_text(rows(150))
    assert main(["calibrate", "--labels", str(cal), "--target-fallback-rate", "0.2",
                 "--pre-out", str(pre), "--holdout", str(held), "--json", str(out)],
                ) == 0  # fmt: skip
    report = json.loads(out.read_text())["pre_holdout"]
    assert report["rows"] == 150
    assert report["auroc"] > 0.8
    assert 0.0 <= report["to_large"] <= 1.0
    assert report["success_rate"] == sum(
        json.loads(line)["success"] for line in held.read_text().splitlines()) / 150
    assert "pre-router held out: 150 rows, AUROC" in capsys.readouterr().out
