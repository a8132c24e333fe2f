"""`promoe-bench doctor`: what this machine offers a benchmark, as lines of text.

torch and its CUDA build, the device and its memory, NVML and the counters it reports, the measured
host-to-device bandwidth (pinned and pageable on CUDA; on the CPU the emulated link's defaults and the
memcpy speed that bounds it), and the supported model families. A few seconds at most.
"""

import math
import time

import numpy
import torch

from .config import DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US
from .families import SUPPORTED_FAMILIES
from .nvml import Missing, open_device

CUDA_COPY_BYTES = 256 * 2**20
HOST_COPY_BYTES = 64 * 2**20
REPS = 3  # timed copies after one warm-up; the best is reported (the others lost time to something else)


def report(device: torch.device) -> list[str]:
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    lines = [f"torch {torch.__version__}, {build}", _device_line(device), *_nvml_lines(device)]
    if device.type == "cuda":
        pinned, pageable = cuda_h2d_gbps(device, pinned=True), cuda_h2d_gbps(device, pinned=False)
        lines.append(f"host-to-device copy ({CUDA_COPY_BYTES >> 20} MiB, best of {REPS}): "
                     f"pinned {pinned:.1f} GB/s, pageable {pageable:.1f} GB/s")
    else:
        lines.append(f"emulated link (--device cpu defaults): {DEFAULT_LINK_GBPS} GB/s, "
                     f"{DEFAULT_LINK_LATENCY_US} us per copy")
        lines.append(f"host memcpy ({HOST_COPY_BYTES >> 20} MiB, best of {REPS}): {host_memcpy_gbps():.1f} GB/s "
                     f"(the fastest --link-gbps this machine can emulate)")
    lines.append(f"model families: {', '.join(SUPPORTED_FAMILIES)}")
    return lines


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"device: {device} {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"compute capability {props.major}.{props.minor}")
    why = "torch sees no CUDA device" if torch.version.cuda else "this torch cannot use a GPU"
    return f"device: cpu ({why})"


def _nvml_lines(device: torch.device) -> list[str]:
    gpu = open_device(device)
    if isinstance(gpu, Missing):
        lines = [f"NVML: not used ({gpu.reason})"]
        if device.type != "cuda":
            lines.append(f"NVML on this machine: {_nvml_presence()}")
        return lines
    try:
        values, _ = gpu.describe()
        link = (f"PCIe gen {values.get('pcie_generation', '?')} (max {values.get('pcie_generation_max', '?')}) "
                f"x{values.get('pcie_width', '?')} (max x{values.get('pcie_width_max', '?')})")
        lines = [f"NVML: driver {values.get('driver_version', '?')}, CUDA driver "
                 f"{values.get('cuda_driver_version', '?')}, {link}"]
        source = gpu.pcie_source
        lines += [f"  {counter:<13} {state}" for counter, state in gpu.supported().items()]
        if isinstance(source, str):
            lines.append(f"  PCIe bytes from {source}")
    finally:
        gpu.close()
    return lines


def _nvml_presence() -> str:
    """Whether NVML sees GPUs, although torch will not use one (a CPU build of torch on a GPU machine)."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return f"unavailable ({error})"
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    return f"{count} GPU(s), which this torch does not use" if count else "no GPU"


def cuda_h2d_gbps(device: torch.device, pinned: bool) -> float:
    """Host-to-device bandwidth of one CUDA_COPY_BYTES copy, timed with CUDA events on the current stream."""
    src = torch.empty(CUDA_COPY_BYTES, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(CUDA_COPY_BYTES, dtype=torch.uint8, device=device)
    best = math.inf
    with torch.cuda.device(device):
        for rep in range(1 + REPS):  # warm-up, then timed
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=pinned)
            end.record()
            end.synchronize()
            if rep:
                best = min(best, start.elapsed_time(end) / 1e3)  # ms
    return CUDA_COPY_BYTES / best / 1e9


def host_memcpy_gbps() -> float:
    """The single-threaded memcpy the emulated link copies with (numpy.copyto), HOST_COPY_BYTES at a time."""
    src = numpy.ones(HOST_COPY_BYTES, dtype=numpy.uint8)
    dst = numpy.empty_like(src)
    best = math.inf
    for rep in range(1 + REPS):
        start = time.perf_counter()
        numpy.copyto(dst, src)
        if rep:
            best = min(best, time.perf_counter() - start)
    return HOST_COPY_BYTES / best / 1e9
