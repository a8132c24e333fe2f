"""NVML without a GPU: the device a torch device is, what it reports, wrapping counters, the sampler,
the GPU environment of a run folder, and `promoe-bench doctor`."""

import inspect
import sys
import time
from types import SimpleNamespace

import pynvml
import pytest
import torch
from click.testing import CliRunner

from promoe_bench import nvml as nvml_module
from promoe_bench.cli import main
from promoe_bench.config import DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US
from promoe_bench.families import SUPPORTED_FAMILIES
from promoe_bench.nvml import (
    FIELD_COUNTERS,
    THROUGHPUT_SAMPLES,
    Identity,
    Missing,
    NvmlDevice,
    Sampler,
    WrappingCounter,
    counter_delta,
    open_device,
    torch_identity,
)
from promoe_bench.pcie import pcie_peak_bytes_per_s
from promoe_bench.provenance import gpu_environment

from .fake_nvml import NOT_SUPPORTED, RX, TX, UINT, FakeClock, FakeGpu, FakeNvml

CUDA0 = torch.device("cuda", 0)
FIRST = FakeGpu(uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000", pci=(0, 0x1B, 0))
SECOND_UUID = "GPU-bbbbbbbb-0000-0000-0000-000000000000"


def two_gpus(**second) -> tuple[FakeNvml, FakeGpu]:
    gpu = FakeGpu(uuid=SECOND_UUID, pci=(0, 0x9A, 0), name="NVIDIA H200", **second)
    return FakeNvml([FakeGpu(uuid=FIRST.uuid, pci=FIRST.pci), gpu]), gpu


def opened(**second) -> tuple[NvmlDevice, FakeNvml, FakeGpu]:
    """The second of two fake GPUs, opened as torch's cuda:0 (CUDA and NVML number GPUs differently)."""
    fake, gpu = two_gpus(**second)
    device = open_device(CUDA0, fake, Identity(SECOND_UUID))
    assert isinstance(device, NvmlDevice), device
    return device, fake, gpu


def clocked(monkeypatch, **second) -> tuple[NvmlDevice, FakeGpu, FakeClock]:
    """opened(), on a fake clock: the PCIe counters are bounded by the time between reads."""
    clock = FakeClock()
    monkeypatch.setattr(nvml_module, "time", clock)
    device, _, gpu = opened(**second)
    return device, gpu, clock


def test_the_fake_has_the_real_pynvml_functions_and_parameters():
    fake = FakeNvml([])
    functions = [name for name in vars(FakeNvml) if name.startswith("nvml")]
    assert len(functions) >= 19
    for name in functions:
        real = inspect.signature(getattr(pynvml, name))
        assert list(inspect.signature(getattr(fake, name)).parameters) == list(real.parameters), name
    assert fake.NVMLError is pynvml.NVMLError and fake.nvmlMemory_v2 == pynvml.nvmlMemory_v2


def test_the_device_is_chosen_by_uuid_not_by_index():
    device, _, gpu = opened()
    values, _ = device.describe()
    assert values["uuid"] == SECOND_UUID and values["name"] == "NVIDIA H200"
    assert device.handle is gpu


def test_the_device_is_found_by_pci_address_when_torch_gives_no_uuid():
    fake, gpu = two_gpus()
    device = open_device(CUDA0, fake, Identity(None, pci=(0, 0x9A, 0)))
    assert device.handle is gpu


def test_torch_identity_is_the_uuid_in_nvml_form(monkeypatch):
    props = SimpleNamespace(uuid="BBBBBBBB-0000-0000-0000-000000000000", name="x")  # torch prints no prefix
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert torch_identity(CUDA0) == Identity(SECOND_UUID, None)
    fake, gpu = two_gpus()
    assert open_device(CUDA0, fake).handle is gpu  # the identity defaults to torch's


def test_the_cpu_has_no_nvml_device():
    assert open_device(torch.device("cpu"), FakeNvml([FakeGpu()])) == Missing("the device is the CPU")


def test_without_nvidia_ml_py_nvml_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert open_device(CUDA0, identity=Identity(SECOND_UUID)) == Missing("nvidia-ml-py is not installed")


def test_an_nvml_init_failure_is_missing_with_nvmls_message():
    fake = FakeNvml([FakeGpu()], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert open_device(CUDA0, fake, Identity(SECOND_UUID)) == Missing("NVML: NVML Shared Library Not Found")


def test_no_matching_gpu_is_missing_and_releases_nvml():
    fake, _ = two_gpus()
    device = open_device(CUDA0, fake, Identity("GPU-cccccccc-0000-0000-0000-000000000000"))
    assert isinstance(device, Missing) and "GPU-cccccccc" in device.reason
    assert fake.initialized == 0


def test_pcie_field_counters_count_what_the_gpu_receives_as_host_to_device():
    device, _, gpu = opened()
    assert device.pcie_source == FIELD_COUNTERS
    gpu.rx_bytes += 1000  # received by the GPU: host-to-device
    gpu.tx_bytes += 7
    sample = device.read()
    assert (sample["pcie_h2d_bytes"], sample["pcie_d2h_bytes"]) == (1000, 7)
    assert device.supported()["pcie_h2d"] == "supported"


def test_a_missing_rx_field_falls_back_to_throughput_samples():
    device, fake, gpu = opened(missing_fields={RX}, rx_kb_per_s=2000)
    assert device.pcie_source == THROUGHPUT_SAMPLES
    assert device.read()["pcie_h2d_bytes_per_s"] == 2000 * 1024
    calls = fake.calls["nvmlDeviceGetPcieThroughput"]
    assert "pcie_h2d_bytes_per_s" not in device.read(throughput=False)  # snapshots skip the 20 ms query
    assert fake.calls["nvmlDeviceGetPcieThroughput"] == calls


def test_without_counters_or_throughput_pcie_is_missing_with_both_reasons():
    device, _, _ = opened(missing_fields={RX, TX}, errors={"nvmlDeviceGetPcieThroughput": NOT_SUPPORTED})
    assert device.pcie_source == Missing("NVML: field counters: Not Supported; throughput: Not Supported")
    assert device.supported()["pcie_h2d"] == device.pcie_source.reason
    assert not any(key.startswith("pcie") for key in device.read())


def test_a_32_bit_counter_that_wraps_keeps_counting(monkeypatch):
    device, gpu, clock = clocked(monkeypatch, counter_type=UINT, rx_bytes=2**32 - 100)  # PCIe 5.0 x16: 63 GB/s
    assert device.read()["pcie_h2d_bytes"] == 0
    gpu.rx_bytes = 2**32 + 50  # the hardware's 32 bits read 50
    clock.now += 0.001
    assert device.read()["pcie_h2d_bytes"] == 150  # 100 to the wrap, 50 after it
    gpu.rx_bytes += 2**32 - 1  # a wrap less a byte, 4.3 GB in 80 ms: 54 GB/s, which the link can carry
    clock.now += 0.08
    sample = device.read()
    assert (sample["pcie_h2d_bytes"], sample["pcie_h2d_dropped"]) == (150 + 2**32 - 1, 0)
    assert device.counter_bits == 32


def test_a_32_bit_counter_reported_as_64_bit_that_wraps_is_dropped_not_counted_as_1_8e19_bytes(monkeypatch):
    device, gpu, clock = clocked(monkeypatch, counter_bits=32, rx_bytes=2**32 - 100)  # valueType: 64-bit
    device.read()
    gpu.rx_bytes += 150  # the hardware's 32 bits read 50, which as 64 bits is 2**64 - 2**32 + 150 bytes on
    clock.now += 0.01
    sample = device.read()
    assert (sample["pcie_h2d_bytes"], sample["pcie_h2d_dropped"]) == (0, 1)  # the interval adds nothing
    gpu.rx_bytes += 1000
    clock.now += 0.01
    sample = device.read()
    assert (sample["pcie_h2d_bytes"], sample["pcie_h2d_dropped"]) == (1000, 1)  # counting goes on from 50


def test_a_counter_move_within_twice_the_links_peak_counts_and_one_beyond_it_is_dropped(monkeypatch):
    # the widest, newest link the slot allows, not the one the idle GPU has dropped to (1.0 x16: 4 GB/s)
    device, gpu, clock = clocked(monkeypatch, pcie_generation_max=4, pcie_width_max=8, pcie_generation=1)
    assert device.pcie_peak_bytes_per_s == pytest.approx(15.75e9, rel=1e-3)  # 4.0 x8
    device.read()
    gpu.rx_bytes += 3_100_000_000  # 31 GB/s over 0.1 s: within twice the peak (protocol bytes count too)
    clock.now += 0.1
    assert device.read()["pcie_h2d_bytes"] == 3_100_000_000
    gpu.rx_bytes += 3_200_000_000  # 32 GB/s: more than the link can carry
    clock.now += 0.1
    sample = device.read()
    assert (sample["pcie_h2d_bytes"], sample["pcie_h2d_dropped"]) == (3_100_000_000, 1)
    gpu.rx_bytes = 0  # a 64-bit counter that resets reads as 2**64 bytes less what it had counted
    clock.now += 0.1
    sample = device.read()
    assert (sample["pcie_h2d_bytes"], sample["pcie_h2d_dropped"]) == (3_100_000_000, 2)


def test_the_time_a_counter_may_move_runs_from_the_previous_read_starting_to_this_one_ending():
    counter = WrappingCounter(peak_bytes_per_s=1000.0)  # with the 2x margin: 2000 bytes a second
    counter.update(0, 64, began=0.0, ended=0.5)  # a slow read: the hardware latched anywhere in it
    assert counter.update(2900, 64, began=1.0, ended=1.5) == 2900  # latched up to 1.5 s apart: 3000 bytes
    assert counter.update(2900 + 2100, 64, began=2.0, ended=2.0) == 2900  # 1 s apart at most: 2000 bytes
    assert counter.dropped == 1


def test_the_links_peak_comes_from_its_generation_and_width_else_pcie_6_x16():
    assert pcie_peak_bytes_per_s(1, 1) == pytest.approx(0.25e9)  # 2.5 GT/s, 8b/10b
    assert pcie_peak_bytes_per_s(3, 16) == pytest.approx(15.754e9, rel=1e-4)  # 8 GT/s, 128b/130b
    assert pcie_peak_bytes_per_s(5, 16) == pytest.approx(63.015e9, rel=1e-4)
    assert pcie_peak_bytes_per_s(6, 16) == 128e9
    assert pcie_peak_bytes_per_s(None, 16) == pcie_peak_bytes_per_s(5, None) == pcie_peak_bytes_per_s(7, 16) == 128e9
    device, _, _ = opened(errors={"nvmlDeviceGetMaxPcieLinkWidth": NOT_SUPPORTED})
    assert device.pcie_peak_bytes_per_s == 128e9


def test_counter_delta_guesses_the_width_when_unknown():
    assert counter_delta(10, 25, 32) == 15
    assert counter_delta(2**32 - 100, 50, None) == 150  # below 2**32: a 32-bit counter
    assert counter_delta(2**40, 5, None) == 2**64 - 2**40 + 5  # above: a 64-bit one
    assert counter_delta(2**64 - 1, 0, 64) == 1


def test_unsupported_energy_is_absent_with_its_reason_never_zero():
    device, fake, _ = opened(errors={"nvmlDeviceGetTotalEnergyConsumption": NOT_SUPPORTED})
    assert device.supported()["energy"] == "NVML: Not Supported"
    assert "energy_j" not in device.read() and "power_w" in device.read()
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 1  # probed once, never read


def test_memory_used_comes_from_v2_or_else_v1():
    device, _, gpu = opened()
    assert device.read()["memory_used_bytes"] == gpu.memory_used
    older, _, gpu = opened(errors={"nvmlDeviceGetMemoryInfo_v2": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND})
    assert older.read()["memory_used_bytes"] == gpu.memory_used + gpu.memory_reserved  # v1 counts reserved
    assert older.supported()["memory_used"] == "supported"


def test_read_converts_units():
    device, _, _ = opened(power_mw=350_500, energy_mj=1_234_567)
    sample = device.read()
    assert (sample["power_w"], sample["energy_j"]) == (350.5, 1234.567)
    assert (sample["sm_clock_mhz"], sample["memory_clock_mhz"]) == (1980, 2619)


def test_describe_gives_values_and_reasons():
    device, _, _ = opened(errors={"nvmlDeviceGetCurrPcieLinkWidth": NOT_SUPPORTED})
    values, reasons = device.describe()
    assert values["pci_bus_id"] == "00000000:9A:00.0"
    assert (values["driver_version"], values["cuda_driver_version"]) == ("550.54.15", "12.4")
    assert (values["pcie_generation"], values["pcie_width_max"]) == (5, 16)
    assert "pcie_width" not in values and reasons == {"pcie_width": "NVML: Not Supported"}


def test_the_sampler_keeps_samples_until_stopped():
    count = iter(range(10**6))
    sampler = Sampler(lambda: {"t": time.perf_counter(), "n": next(count)}, interval_s=0.001)
    sampler.start()
    deadline = time.perf_counter() + 5
    while len(sampler.samples) < 3 and time.perf_counter() < deadline:
        time.sleep(0.001)
    samples = sampler.stop()
    assert [s["n"] for s in samples[:3]] == [0, 1, 2] and sampler.error is None
    assert len(sampler.stop()) == len(samples)  # stopped: no more samples


def test_a_failing_read_stops_the_sampler_and_is_recorded_not_raised():
    reads = iter([{"t": 1.0}, {"t": 2.0}])

    def read():
        return next(reads)  # the third read raises StopIteration

    sampler = Sampler(read, interval_s=0.0)
    sampler.start()
    deadline = time.perf_counter() + 5
    while sampler.error is None and time.perf_counter() < deadline:
        time.sleep(0.001)
    assert sampler.stop() == [{"t": 1.0}, {"t": 2.0}]
    assert sampler.error.startswith("StopIteration")


def test_the_gpu_environment_on_the_cpu_says_why_it_is_missing():
    assert gpu_environment(torch.device("cpu")) == {"missing": {"gpu": "the device is the CPU"}}


def test_the_gpu_environment_joins_torch_and_nvml(monkeypatch):
    props = SimpleNamespace(name="NVIDIA H200", total_memory=141 * 2**30, major=9, minor=0,
                            uuid=SECOND_UUID.removeprefix("GPU-"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    fake, gpu = two_gpus(errors={"nvmlDeviceGetTotalEnergyConsumption": NOT_SUPPORTED,
                                 "nvmlDeviceGetCurrPcieLinkGeneration": NOT_SUPPORTED})
    env = gpu_environment(CUDA0, fake)
    assert (env["name"], env["uuid"], env["compute_capability"]) == ("NVIDIA H200", SECOND_UUID, "9.0")
    assert (env["driver_version"], env["cuda_driver_version"], env["pcie_width"]) == ("550.54.15", "12.4", 16)
    assert env["missing"] == {"pcie_generation": "NVML: Not Supported"}
    assert env["nvml_counters"]["energy"] == "NVML: Not Supported" and env["pcie_source"] == FIELD_COUNTERS
    assert fake.initialized == 0  # NVML released
    without = gpu_environment(CUDA0, FakeNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert without["missing"]["driver_version"] == "NVML: Driver Not Loaded" and without["name"] == "NVIDIA H200"


def test_doctor_on_the_cpu_prints_the_link_settings_and_the_families():
    result = CliRunner().invoke(main, ["doctor", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"torch {torch.__version__}")
    assert "device: cpu" in lines[1]
    assert "NVML: not used (the device is the CPU)" in lines
    assert f"emulated link (--device cpu defaults): {DEFAULT_LINK_GBPS} GB/s, {DEFAULT_LINK_LATENCY_US} us " \
           f"per copy" in lines
    memcpy = next(line for line in lines if line.startswith("host memcpy"))
    assert float(memcpy.split("): ")[1].split(" GB/s")[0]) > 0
    assert lines[-1] == f"model families: {', '.join(SUPPORTED_FAMILIES)}"


def test_samples_are_timed_with_perf_counter():
    # the meter's windows compare sample times with perf_counter; read() must use the same clock
    device, _, _ = opened()
    before = time.perf_counter()
    assert before <= device.read()["t"] <= time.perf_counter()
