"""What the benchmark ran on: CPU, cores, memory, GPU, library versions, torch threads, load."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

__all__ = ["machine_info"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _wrk_version() -> str | None:
    if not shutil.which("wrk"):
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    text = (out.stdout or out.stderr or "wrk").splitlines()[0]
    return text.split(" [")[0].strip()


def machine_info() -> dict[str, Any]:
    """A description of this machine and software, for the results file."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gb": round(props.total_memory / 1024**3, 1),
               "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": _mem_total_gb(),
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "versions": {m: _version(m) for m in ("zuko", "fastapi", "starlette", "uvicorn", "uvloop", "httptools",
                                               "orjson", "numpy", "pydantic")},
        "wrk": _wrk_version(),
        "load_average_at_start": list(os.getloadavg()),
    }
