"""The grammar benchmark's pure helpers and its compile loop on a toy vocabulary: no model."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from benchmarks import grammar_bench as gb
from benchmarks import grammar_compile_bench as cb
from decoding.grammar import GrammarCompiler
from tests.unit.decoding.toy_grammar import toy_compiler

VOCAB = ["</s>", *list('{}[]":, abcdefghijklmnopqrstuvwxyz0123456789_-.\n'), '{"', '":', '"}']


def subsets_of(sizes: dict[str, int]) -> dict[str, list[gb.Named]]:
    return {
        name: [(f"{name}/{i:03d}.json", {"title": f"{name}{i}"}) for i in range(n)]
        for name, n in sizes.items()
    }


# ---- percentile -------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy_linear() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert gb.percentile(values, 0) == 1.0
    assert gb.percentile(values, 50) == 3.0
    assert gb.percentile(values, 100) == 5.0
    assert gb.percentile(values, 95) == pytest.approx(4.8)
    assert gb.percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    assert gb.percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)


def test_percentile_edge_cases() -> None:
    assert gb.percentile([], 50) is None
    assert gb.percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError, match=r"must be in \[0, 100\]"):
        gb.percentile([1.0], 101)


# ---- schema sampling --------------------------------------------------------------------------


def test_sample_is_deterministic_and_seed_dependent() -> None:
    subsets = subsets_of({"A": 50, "B": 30, "C": 10})
    first = gb.sample_schemas(subsets, 12, seed=3)
    assert first == gb.sample_schemas(subsets, 12, seed=3)
    assert [n for n, _ in first] != [n for n, _ in gb.sample_schemas(subsets, 12, seed=4)]
    # Insertion order of the subsets does not matter, only their names.
    reordered = dict(reversed(list(subsets.items())))
    assert first == gb.sample_schemas(reordered, 12, seed=3)


def test_sample_draws_round_robin_without_repeats() -> None:
    subsets = subsets_of({"A": 50, "B": 30, "C": 2})
    sample = gb.sample_schemas(subsets, 9, seed=0)
    prefixes = [name.split("/")[0] for name, _ in sample]
    assert prefixes[:6] == ["A", "B", "C", "A", "B", "C"]
    assert prefixes[6:] == ["A", "B", "A"]  # C is exhausted
    assert len({name for name, _ in sample}) == 9
    assert len(subsets["A"]) == 50  # inputs untouched


def test_sample_larger_than_data_returns_everything_once() -> None:
    subsets = subsets_of({"A": 3, "B": 2})
    sample = gb.sample_schemas(subsets, 100, seed=1)
    assert sorted(n for n, _ in sample) == sorted(n for v in subsets.values() for n, _ in v)
    assert gb.sample_schemas(subsets, 0) == []


def test_load_subsets_reads_sorted_files(tmp_path: Path) -> None:
    for subset, files in {"S1": ["b.json", "a.json"], "S2": ["z.json"]}.items():
        (tmp_path / subset).mkdir()
        for f in files:
            (tmp_path / subset / f).write_text(json.dumps({"type": "string", "f": f}))
    loaded = gb.load_subsets(tmp_path)
    assert [n for n, _ in loaded["S1"]] == ["S1/a.json", "S1/b.json"]
    assert loaded["S2"][0][1] == {"type": "string", "f": "z.json"}
    assert list(gb.load_subsets(tmp_path, ("S2",))) == ["S2"]
    with pytest.raises(FileNotFoundError):
        gb.load_subsets(tmp_path / "missing")


# ---- formatting -------------------------------------------------------------------------------


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    table = gb.format_table(["name", "n", "ms"], [["alpha", 3, 1.5], ["b", 120, None]])
    lines = table.splitlines()
    assert lines[0] == "name     n    ms"
    assert lines[1] == "-----  ---  ----"
    assert lines[2] == "alpha    3  1.50"
    assert lines[3] == "b      120     -"


def test_format_table_without_rows() -> None:
    assert gb.format_table(["a", "bb"], []).splitlines() == ["a  bb", "-  --"]


def test_keyword_of_unsupported_message() -> None:
    assert gb.keyword_of("unsupported JSON schema keyword '$ref' at #/x: ...") == "$ref"
    assert gb.keyword_of("something else") == "(unknown)"


def test_prompt_embeds_the_schema() -> None:
    (message,) = gb.prompt_for({"type": "integer"})
    assert message == {
        "role": "user",
        "content": 'Produce a JSON object for this schema: {"type": "integer"}',
    }


# ---- compile loop on a toy tokenizer ----------------------------------------------------------


@pytest.fixture(params=["xgrammar", "llguidance", "auto"])
def compiler(request: pytest.FixtureRequest) -> GrammarCompiler:
    return toy_compiler(request.param, VOCAB, cache_size=2)


def test_bench_compile_counts_each_outcome(compiler: GrammarCompiler) -> None:
    schemas: list[Any] = [
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        {"type": "integer"},
        {"$ref": "https://example.com/other.json"},  # unsupported: external reference
        {"type": "array", "enum": ["a"]},  # unsatisfiable
        {"type": 5},  # invalid schema
    ]
    subsets = {"X": [(f"X/{i}.json", s) for i, s in enumerate(schemas)], "Y": [("Y/0", True)]}
    engine = compiler.default_engine
    rows = cb.bench_compile(compiler, subsets, limit=None, engine=engine, deadline_s=30)
    x = rows["X"]
    counts = {k: x[k] for k in ("total", *cb.OUTCOMES)}
    assert counts == {"total": 5, "compiled": 2, "timeout": 0, "unsupported": 1,
                      "unsatisfiable": 1, "invalid": 1, "other": 0}  # fmt: skip
    assert x["unsupported_keywords"] == {"$ref": 1}
    assert x["compile_ms_p50"] is not None
    assert x["compile_ms_p50"] > 0
    assert x["success_rate"] == pytest.approx(0.4)
    assert x["slowest"][0] in {"X/0.json", "X/1.json"}
    assert rows["ALL"]["total"] == 6
    assert rows["ALL"]["compiled"] == 3
    assert rows["ALL"]["compiled_names"] == ["X/0.json", "X/1.json", "Y/0"]
    expected_engine = "xgrammar" if engine == "xgrammar" else "llguidance"
    assert rows["ALL"]["engines"] == {expected_engine: 3}
    assert compiler.misses == 0
    assert compiler.hits == 0
    limited = cb.bench_compile(compiler, subsets, limit=1, engine=engine)
    assert limited["X"]["total"] == 1
    assert limited["ALL"]["total"] == 2
    table = cb.compile_table(rows)
    assert table.splitlines()[2].split()[:8] == ["X", "5", "2", "0", "1", "1", "1", "0"]


def test_a_compile_past_the_deadline_counts_as_timeout() -> None:
    class Slow:
        def _compile_uncached(self, constraint: Any, param: str, engine: str) -> Any:
            time.sleep(0.5)
            raise AssertionError("never read: the bench stopped waiting")

    stats = cb.CompileStats()
    with ThreadPoolExecutor(1) as pool:
        cb.compile_one(Slow(), {"type": "string"}, stats, "S/0", "auto", 0.05, pool)  # type: ignore[arg-type]
    assert stats.summary()["timeout"] == 1
    assert stats.times_ms == []


def test_union_row_compares_auto_with_the_named_engines() -> None:
    def arm(names: list[str]) -> dict[str, dict[str, Any]]:
        return {"ALL": {"compiled_names": names}}

    arms = {"xgrammar": arm(["a", "b"]), "llguidance": arm(["b", "c"]), "auto": arm(["a", "b"])}
    row = cb.union_row(arms)
    assert (row["union"], row["auto"]) == (3, 2)
    assert row["union_not_auto"] == ["c"]
    assert row["auto_not_union"] == []


def test_compile_one_records_other_exceptions() -> None:
    class Broken:
        def _compile_uncached(self, constraint: Any, param: str, engine: str) -> Any:
            raise RuntimeError("boom")

    stats = cb.CompileStats()
    cb.compile_one(Broken(), {"type": "string"}, stats)  # type: ignore[arg-type]
    summary = stats.summary()
    assert summary["other"] == 1
    assert summary["compile_ms_p50"] is None
    assert summary["other_errors"] == {"RuntimeError: boom": 1}


# ---- report and CLI ---------------------------------------------------------------------------


def test_render_report_sections() -> None:
    machine = {
        "cpu": "Toy CPU",
        "cores": 2,
        "torch_threads": 2,
        "torch": "2.x",
        "xgrammar": "0.2.8",
        "llguidance": "1.9.1",
        "dtype": "bfloat16",
        "device": "cpu",
    }
    arm = {"tokens": 60, "ms_per_token": 12.5, "ratio_to_unconstrained": 1.25,
           "forced_token_share": 0.5, "mask_us_median": 40.0, "mask_us_mean": 50.0,
           "mask_us_p95": 90.0}  # fmt: skip
    plain = {**arm, "ms_per_token": 10.0, "ratio_to_unconstrained": 1.0,
             "forced_token_share": None, "mask_us_median": None}  # fmt: skip
    decode = {"prompts": 2, "max_tokens": 64, "arms": {"unconstrained": plain, "auto": arm}}
    samples = [
        {"schema": "A/1", "outcome": "valid", "detail": ""},
        {"schema": "B/2", "outcome": "truncated", "detail": "hit"},
    ]
    validity = {"sampled": 2, "max_tokens": 256, "arms": {"auto": {
        "outcomes": {"valid": 1, "invalid": 0, "truncated": 1}, "valid_rate": 0.5,
        "valid_rate_of_finished": 1.0, "resamples": 0, "samples": samples}}}  # fmt: skip
    compile_rows = {"ALL": {"total": 1, "compiled": 1, "timeout": 0, "unsupported": 0,
                            "unsatisfiable": 0, "invalid": 0, "other": 0, "success_rate": 1.0,
                            "compile_ms_p50": 2.0, "compile_ms_p95": 2.0, "compile_ms_max": 2.0,
                            "incomplete": 0, "engines": {"llguidance": 1}, "slowest": ["A/1", 2.0],
                            "unsupported_keywords": {}, "other_errors": {},
                            "compiled_names": ["A/1"]}}  # fmt: skip
    text = gb.render_report(
        {"model": "m", "machine": machine, "decode": decode, "validity": validity,
         "compile": {"auto": compile_rows, "xgrammar": compile_rows},
         "compile_deadline_s": 10.0, "elapsed_s": 1.0}
    )  # fmt: skip
    assert "Toy CPU, 2 cores" in text
    assert "llguidance 1.9.1" in text
    assert "request deadline 10 s" in text
    assert "union of xgrammar: 1 compiled; auto: 1" in text
    assert "[auto] truncated B/2: hit" in text
    assert "A/1:" not in text  # valid samples are not listed
    auto_row = next(line for line in text.splitlines() if line.startswith("auto "))
    assert auto_row.split()[:4] == ["auto", "60", "12.50", "1.25"]


def test_main_with_everything_skipped_loads_no_model(tmp_path: Path) -> None:
    out = tmp_path / "r" / "bench.json"
    code = gb.main(
        ["--skip-decode", "--skip-compile", "--skip-validity", "--quiet", "--json", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"] == gb.DEFAULT_MODEL
    assert {"cpu", "cores", "torch", "dtype"} <= set(result["machine"])
    assert "compile" not in result
    assert "decode" not in result


def test_resolve_model_accepts_bare_builtin_names() -> None:
    assert gb.resolve_model("smollm2-135m-instruct") == gb.DEFAULT_MODEL
    assert gb.resolve_model(gb.DEFAULT_MODEL) == gb.DEFAULT_MODEL
    assert gb.resolve_model("/some/dir") == "/some/dir"
