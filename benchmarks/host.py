"""What a benchmark ran on: CPU model and cores, reported next to every number."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def host_info() -> dict[str, Any]:
    """CPU model (from /proc/cpuinfo where present), core counts and the Python version."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "python": platform.python_version(),
    }
