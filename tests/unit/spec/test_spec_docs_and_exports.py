"""The worked examples in the docstrings run, and the package exports what it documents."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import spec

MODULES = [
    "spec.draft",
    "spec.hint",
    "spec.ngram_table",
    "spec.simulate",
    "spec.stand",
    "spec.suffix",
    "spec.suffix_automaton",
    "spec.traces",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} lost its worked examples"


def test_exported_members() -> None:
    assert sorted(spec.__all__) == [
        "Draft",
        "Drafter",
        "NGramTable",
        "StandConfig",
        "StandDrafter",
        "SuffixAutomaton",
        "SuffixConfig",
        "SuffixDrafter",
        "gumbel_top_k",
    ]
    for name in spec.__all__:
        assert getattr(spec, name).__module__.startswith("spec.")


def test_spec_imports_no_engine_code() -> None:
    # A fresh interpreter: other tests in this process may have imported torch already.
    code = f"import sys; import {', '.join(MODULES)}; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],  # the repository root
    ).stdout
    for forbidden in ("torch", "gateway", "router", "decoding"):
        assert f"'{forbidden}'" not in loaded
