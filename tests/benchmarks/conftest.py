"""pytest-benchmark: the benchmarks compute as a run does, and every saved benchmark file says on which
device and with how many compute threads."""

import pytest
import torch

from promoe_bench.quiet import compute_threads, torch_threads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMPUTE_THREADS = compute_threads(DEVICE)  # read before the fixture below lowers torch's count


@pytest.fixture(scope="session", autouse=True)
def threads_of_a_run():
    """On the CPU one core is the emulated link's copy worker's, as in `promoe-bench run`."""
    with torch_threads(COMPUTE_THREADS):
        yield


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["compute_threads"] = COMPUTE_THREADS
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                               "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:
        machine_info["gpu"] = "none: the CPU with the emulated host-to-device link"
