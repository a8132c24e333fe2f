"""What produced a run: machine, software versions, git state, command line."""

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import torch

from .nvml import DESCRIBE_KEYS, Missing, open_device, torch_identity


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
        "gpu": gpu_environment(device),
    }
    return info


def gpu_environment(device: torch.device, nvml=None) -> dict:
    """The GPU of a run: torch's view (name, memory, compute capability, CUDA build, UUID) and NVML's
    (driver, CUDA driver, PCIe generation and width, current and max, which counters it reports).
    `missing` maps each value that could not be had to why; on the CPU, the whole GPU is missing.
    `nvml` is the pynvml module (a fake in tests)."""
    if device.type != "cuda":
        return {"missing": {"gpu": "the device is the CPU"}}
    props = torch.cuda.get_device_properties(device)
    gpu = {"name": props.name, "memory_bytes": props.total_memory,
           "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
           "uuid": torch_identity(device).uuid}
    opened = open_device(device, nvml)
    if isinstance(opened, Missing):
        gpu["missing"] = {key: opened.reason for key in DESCRIBE_KEYS if key not in gpu}
        return gpu
    try:
        values, missing = opened.describe()
        for key, value in values.items():
            gpu.setdefault(key, value)  # torch's name and UUID are kept: NVML's name the same GPU
        gpu["nvml_counters"] = opened.supported()
        source = opened.pcie_source
        gpu["pcie_source"] = source if isinstance(source, str) else None
        if isinstance(source, Missing):
            missing["pcie_source"] = source.reason
        gpu["missing"] = missing
    finally:
        opened.close()
    return gpu
