"""What produced a run: machine, software versions, git state, command line."""

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import torch


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def capture(device: torch.device) -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    info = {
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "versions": {p: _version(p) for p in ("promoe-bench", "torch", "transformers", "safetensors")},
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return info
