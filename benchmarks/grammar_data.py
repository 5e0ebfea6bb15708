"""JSONSchemaBench data and table helpers shared by the grammar benchmark's parts (pure,
unit-tested)."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

SUBSETS = ("Github_trivial", "Github_easy", "Glaiveai2K", "Snowplow", "WashingtonPost")
PROMPT = "Produce a JSON object for this schema: {schema}"

Schema = dict[str, Any] | bool
Named = tuple[str, Schema]  # ("Subset/file.json", schema)


def default_data_dir() -> Path:
    """``$SLMGATE_BENCH_DATA``, else ``shared/data/jsonschemabench`` in or beside the checkout."""
    env = os.environ.get("SLMGATE_BENCH_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [p / "shared" / "data" / "jsonschemabench" for p in here.parents[1:3]]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def load_subsets(root: Path, names: tuple[str, ...] | None = None) -> dict[str, list[Named]]:
    """``{subset: [(subset/file, schema), ...]}`` sorted by file name (a stable order)."""
    if not root.is_dir():
        raise FileNotFoundError(f"no JSONSchemaBench data at {root} (see --data)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    out: dict[str, list[Named]] = {}
    for folder in folders:
        if names is not None and folder.name not in names:
            continue
        files = sorted(folder.glob("*.json"))
        out[folder.name] = [(f"{folder.name}/{f.name}", json.loads(f.read_text())) for f in files]
    return out


def sample_schemas(subsets: dict[str, list[Named]], n: int, seed: int = 0) -> list[Named]:
    """A fixed sample of up to ``n`` schemas: each subset shuffled with one seeded RNG (subsets
    in name order), then drawn round-robin so every subset is represented."""
    rng = random.Random(seed)
    pools = {name: rng.sample(items, len(items)) for name, items in sorted(subsets.items())}
    out: list[Named] = []
    while len(out) < n and any(pools.values()):
        for pool in pools.values():
            if pool and len(out) < n:
                out.append(pool.pop(0))
    return out


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table: text left-aligned, numbers right-aligned, ``None`` as "-"."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    texts = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        cols = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in cols).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(t) for t in texts)])


def keyword_of(message: str) -> str:
    """The keyword an ``UnsupportedSchemaError`` message names ("(unknown)" when none)."""
    match = re.search(r"keyword '([^']+)'", message)
    return match.group(1) if match else "(unknown)"


def prompt_for(schema: Schema) -> tuple[dict[str, Any], ...]:
    return ({"role": "user", "content": PROMPT.format(schema=json.dumps(schema))},)
