"""pytest-benchmark: which device the figures come from, in every saved benchmark file."""

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                               "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    else:
        machine_info["gpu"] = "none: the CPU with the emulated host-to-device link"
