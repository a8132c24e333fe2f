"""PhaseMeter: one row of hardware counters per measured phase, None and a reason for what this machine
cannot measure, never 0. CUDA is faked (torch.cuda's memory calls, a fake NVML, a fake clock)."""

import time
from types import SimpleNamespace

import pytest
import torch

from promoe_bench import nvml as nvml_module
from promoe_bench.links import EmulatedLink, LinkCounters
from promoe_bench.meter import FIELDS, PhaseMeter, integrate_rate

from .fake_nvml import NOT_SUPPORTED, RX, FakeClock, FakeGpu, FakeNvml

CUDA0 = torch.device("cuda", 0)
UUID = "GPU-bbbbbbbb-0000-0000-0000-000000000000"


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as the meter uses it, for cuda:0 whose NVML UUID is UUID; returns the peak memory stats."""
    peaks = SimpleNamespace(allocated=3 * 2**30, reserved=4 * 2**30, resets=0)

    def reset(device):
        peaks.resets += 1

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(uuid=UUID[4:]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks.reserved)
    return peaks


def fake_link(nbytes: int = 0) -> SimpleNamespace:
    return SimpleNamespace(counters=LinkCounters(bytes=nbytes))


def gpus(**ours) -> tuple[FakeNvml, FakeGpu]:
    gpu = FakeGpu(uuid=UUID, **ours)
    return FakeNvml([FakeGpu(uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000"), gpu]), gpu


def test_on_the_cpu_the_meter_measures_rss_and_the_link_and_says_why_the_rest_is_missing():
    link = EmulatedLink(gbps=50, latency_us=0)
    src, dst = torch.ones(2**18), torch.empty(2**18)  # 1 MiB
    with PhaseMeter(torch.device("cpu"), link) as meter:
        link.complete(link.issue(dst, src))  # before the phase: not counted
        meter.begin("decode")
        link.complete(link.issue(dst, src))
        link.complete(link.issue(dst, src))
        row = meter.end(tokens=2)
    assert list(row) == list(FIELDS)
    assert row["phase"] == "decode" and row["tokens"] == 2
    assert row["link_bytes"] == 2 * 2**20 == link.counters.bytes - 2**20
    assert row["link_gbps"] == pytest.approx(row["link_bytes"] / row["seconds"] / 1e9)
    assert row["peak_rss_bytes"] > 0
    for metric in ("pcie_h2d_bytes", "pcie_h2d_gbps", "nvml_peak_memory_bytes", "energy_j", "energy_per_token_j",
                   "torch_max_allocated_bytes", "torch_max_reserved_bytes"):
        assert row[metric] is None, metric
        assert meter.missing[metric] == "the device is the CPU"
    assert all("rss_bytes" in s for s in meter.samples)


def test_with_nvml_the_meter_computes_pcie_and_energy_from_the_counters(monkeypatch, fake_cuda):
    clock = FakeClock()
    monkeypatch.setattr(nvml_module, "time", clock)
    fake, gpu = gpus(rx_bytes=5_000, energy_mj=1_000_000, memory_used=2**30)
    link = fake_link(nbytes=123)
    meter = PhaseMeter(CUDA0, link, fake)  # the sampler is not started: the two snapshots are the window
    meter.begin("prefill")
    gpu.rx_bytes += 4_000_000_000  # the GPU received 4 GB
    gpu.tx_bytes += 10**9  # and sent 1 GB, which is not host-to-device
    gpu.energy_mj += 500_000  # 500 J
    gpu.memory_used = 5 * 2**30
    link.counters.bytes += 3_000_000_000
    clock.now += 2.0
    row = meter.end(tokens=100)
    meter.close()
    assert row["seconds"] == 2.0
    assert (row["pcie_h2d_bytes"], row["pcie_h2d_gbps"]) == (4_000_000_000, 2.0)
    assert (row["energy_j"], row["energy_per_token_j"]) == (500.0, 5.0)
    assert row["nvml_peak_memory_bytes"] == 5 * 2**30
    assert (row["torch_max_allocated_bytes"], row["torch_max_reserved_bytes"]) == (3 * 2**30, 4 * 2**30)
    assert fake_cuda.resets == 1  # torch's peaks are the phase's own
    assert (row["link_bytes"], row["link_gbps"]) == (3_000_000_000, 1.5)
    assert meter.missing == {} and fake.initialized == 0


def test_unsupported_energy_is_none_with_a_reason_never_zero(fake_cuda):
    fake, _ = gpus(errors={"nvmlDeviceGetTotalEnergyConsumption": NOT_SUPPORTED})
    meter = PhaseMeter(CUDA0, fake_link(), fake)
    meter.begin("decode")
    row = meter.end(tokens=1)
    assert row["energy_j"] is None and row["energy_per_token_j"] is None
    assert meter.missing == {"energy_j": "NVML: Not Supported", "energy_per_token_j": "NVML: Not Supported"}
    assert row["pcie_h2d_bytes"] == 0  # measured, and nothing moved


def test_without_nvml_on_cuda_the_nvml_metrics_are_missing_with_nvmls_reason(fake_cuda):
    fake = FakeNvml([], init_error=4)  # NVML_ERROR_NO_PERMISSION
    meter = PhaseMeter(CUDA0, fake_link(), fake)
    meter.begin("decode")
    row = meter.end(tokens=1)
    assert row["pcie_h2d_bytes"] is None and row["torch_max_allocated_bytes"] == 3 * 2**30
    assert meter.missing["pcie_h2d_bytes"] == "NVML: Insufficient Permissions"
    assert "torch_max_allocated_bytes" not in meter.missing


def test_the_throughput_fallback_integrates_the_sampled_rate(fake_cuda):
    fake, _ = gpus(missing_fields={RX}, rx_kb_per_s=1000)  # 1000 KiB/s throughout
    with PhaseMeter(CUDA0, fake_link(), fake, interval_s=0.001) as meter:
        meter.begin("decode")
        began = len(meter.samples)
        deadline = time.perf_counter() + 5
        while sum("pcie_h2d_bytes_per_s" in s for s in meter.samples[began:]) < 2 and time.perf_counter() < deadline:
            time.sleep(0.001)
        row = meter.end(tokens=1)
    assert row["pcie_h2d_bytes"] == pytest.approx(1000 * 1024 * row["seconds"], rel=1e-9)
    assert "pcie_h2d_bytes" not in meter.missing


def test_the_throughput_fallback_without_a_sample_in_the_phase_is_missing(fake_cuda):
    fake, _ = gpus(missing_fields={RX}, rx_kb_per_s=1000)
    meter = PhaseMeter(CUDA0, fake_link(), fake)  # not started: no sampler, no rates
    meter.begin("decode")
    row = meter.end(tokens=1)
    assert row["pcie_h2d_bytes"] is None and row["pcie_h2d_gbps"] is None
    assert "no sample" in meter.missing["pcie_h2d_bytes"]


def test_integrate_rate_holds_each_rate_since_the_sample_before():
    samples = [{"t": 1.0, "r": 100.0}, {"t": 3.0, "r": 10.0}, {"t": 4.0}, {"t": 9.0, "r": 1e9}]
    # 100 over [0, 1], 10 over [1, 3], then 10 carried to the end at 5; the sample at 9 is outside
    assert integrate_rate(samples, "r", 0.0, 5.0) == 100 + 20 + 20
    assert integrate_rate(samples, "r", 4.5, 5.0) is None


def test_nvml_failing_mid_run_ends_nvml_not_the_run(fake_cuda):
    fake, gpu = gpus()
    meter = PhaseMeter(CUDA0, fake_link(), fake)
    meter.begin("decode")
    gpu.errors["nvmlDeviceGetMemoryInfo_v2"] = 15  # NVML_ERROR_GPU_IS_LOST
    row = meter.end(tokens=1)
    assert row["pcie_h2d_bytes"] is None and row["peak_rss_bytes"] > 0
    assert meter.missing["pcie_h2d_bytes"] == "NVML stopped answering: NVMLError_GpuIsLost: GPU is lost"


def test_samples_cover_the_run_in_time_order_snapshots_included(monkeypatch, fake_cuda):
    clock = FakeClock()
    monkeypatch.setattr(nvml_module, "time", clock)
    fake, gpu = gpus()
    meter = PhaseMeter(CUDA0, fake_link(), fake)
    for phase in ("prefill", "decode"):
        meter.begin(phase)
        gpu.rx_bytes += 10
        clock.now += 1.0
        meter.end(tokens=1)
        clock.now += 0.5
    times = [s["t"] for s in meter.samples]
    assert times == [100.0, 101.0, 101.5, 102.5]
    assert [s["pcie_h2d_bytes"] for s in meter.samples] == [0, 10, 10, 20]
    assert {s["memory_used_bytes"] for s in meter.samples} == {gpu.memory_used}


def test_a_phase_whose_pcie_counter_moved_more_than_the_link_allows_is_missing_with_why(monkeypatch, fake_cuda):
    clock = FakeClock()
    monkeypatch.setattr(nvml_module, "time", clock)
    fake, gpu = gpus(counter_bits=32, rx_bytes=2**32 - 1000)  # a 32-bit counter its driver calls 64-bit
    meter = PhaseMeter(CUDA0, fake_link(), fake)  # PCIe 5.0 x16: 63.0 GB/s
    meter.begin("prefill")
    gpu.rx_bytes += 3000  # wraps: read as 64 bits, 2**64 - 2**32 + 3000 bytes in a second
    clock.now += 1.0
    prefill = meter.end(tokens=10)
    meter.begin("decode")
    gpu.rx_bytes += 5000
    clock.now += 1.0
    decode = meter.end(tokens=1)
    meter.close()
    assert (prefill["pcie_h2d_bytes"], prefill["pcie_h2d_gbps"]) == (None, None)  # not 1.8e19, not 0
    assert (decode["pcie_h2d_bytes"], decode["pcie_h2d_gbps"]) == (5000, 5e-6)
    why = ("1 PCIe counter read dropped: the counter moved more than the link's peak (63.0 GB/s, with a 2x margin) "
           "allows in the time between reads")
    assert meter.missing == {"pcie_h2d_bytes": why, "pcie_h2d_gbps": why}
