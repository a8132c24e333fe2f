"""A fake NVML module for tests: the real pynvml's constants, ctypes structures and error classes, with
device functions that answer from FakeGpu objects instead of a driver.

Each function has the real one's name and parameters (tests/test_nvml.py checks), returns what the real
one returns (ctypes structures, str for strings, int for numbers) and fails the same way: NVMLError(code),
which the real class turns into its subclass (NVMLError_NotSupported, ...). Field counters are stored in
the ctypes member their valueType names, so a 32-bit counter wraps as the hardware's does, or at the narrower
width `counter_bits` gives (a driver reporting a 32-bit counter as 64-bit).
"""

from collections import Counter
from dataclasses import dataclass, field

import pynvml as real

NOT_SUPPORTED = real.NVML_ERROR_NOT_SUPPORTED
UINT, ULONGLONG = real.NVML_VALUE_TYPE_UNSIGNED_INT, real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
RX, TX = real.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, real.NVML_FI_DEV_PCIE_COUNT_TX_BYTES


class FakeClock:
    """perf_counter for promoe_bench.nvml (monkeypatch its `time`): reads take no time, and time moves only
    when a test moves it."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


@dataclass
class FakeGpu:
    """One GPU's state; tests change it between calls (counters advance, fields go missing)."""

    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    name: str = "NVIDIA H100 80GB HBM3"
    pci: tuple[int, int, int] = (0, 0x1B, 0)  # domain, bus, device
    memory_total: int = 80 * 2**30
    memory_reserved: int = 2**29
    memory_used: int = 2**30  # as nvmlMemory_v2 counts it; v1's used includes the reserved memory
    rx_bytes: int = 0  # the PCIe field counters, before the counter width truncates them
    tx_bytes: int = 0
    counter_type: int = ULONGLONG  # the valueType the driver reports for both PCIe fields
    counter_bits: int | None = None  # where the PCIe counters wrap when narrower than counter_type says
    rx_kb_per_s: int = 0  # nvmlDeviceGetPcieThroughput
    tx_kb_per_s: int = 0
    power_mw: int = 350_000
    energy_mj: int = 10_000_000
    sm_clock_mhz: int = 1980
    memory_clock_mhz: int = 2619
    pcie_generation: int = 5
    pcie_generation_max: int = 5
    pcie_width: int = 16
    pcie_width_max: int = 16
    errors: dict[str, int] = field(default_factory=dict)  # function name -> NVML error code it raises
    missing_fields: set[int] = field(default_factory=set)  # field ids answering NOT_SUPPORTED


class FakeNvml:
    """Stands in for the pynvml module: pass it where code takes `nvml`."""

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None, driver: str = "550.54.15",
                 cuda_driver: int = 12040):
        for name in dir(real):  # constants, error classes, structure versions, exactly as the real module
            if name.startswith(("NVML_", "NVMLError", "nvmlMemory_v")):
                setattr(self, name, getattr(real, name))
        self.gpus, self.init_error, self.driver, self.cuda_driver = gpus, init_error, driver, cuda_driver
        self.initialized = 0  # NVML counts nvmlInit calls against nvmlShutdown calls
        self.calls: Counter[str] = Counter()

    def _check(self, function: str, handle: FakeGpu | None = None) -> None:
        self.calls[function] += 1
        if self.initialized <= 0:
            raise real.NVMLError(real.NVML_ERROR_UNINITIALIZED)
        if handle is not None and function in handle.errors:
            raise real.NVMLError(handle.errors[function])

    def nvmlInit(self):
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self):
        self._check("nvmlShutdown")
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self):
        self._check("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        self._check("nvmlSystemGetCudaDriverVersion")
        return self.cuda_driver

    def nvmlDeviceGetCount(self):
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle):
        self._check("nvmlDeviceGetUUID", handle)
        return handle.uuid

    def nvmlDeviceGetName(self, handle):
        self._check("nvmlDeviceGetName", handle)
        return handle.name

    def nvmlDeviceGetPciInfo(self, handle):
        self._check("nvmlDeviceGetPciInfo", handle)
        info = real.nvmlPciInfo_t()
        info.domain, info.bus, info.device = handle.pci
        info.busId = (real.NVML_DEVICE_PCI_BUS_ID_FMT % handle.pci[:3]).encode()  # bytes, as ctypes gives
        return info

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if not version:
            self._check("nvmlDeviceGetMemoryInfo", handle)
            memory = real.c_nvmlMemory_t()
            memory.used = handle.memory_used + handle.memory_reserved
        else:
            self._check("nvmlDeviceGetMemoryInfo_v2", handle)
            memory = real.c_nvmlMemory_v2_t()
            memory.version, memory.reserved, memory.used = version, handle.memory_reserved, handle.memory_used
        memory.total = handle.memory_total
        memory.free = handle.memory_total - handle.memory_used - handle.memory_reserved
        return memory

    def nvmlDeviceGetFieldValues(self, handle, fieldIds):
        self._check("nvmlDeviceGetFieldValues", handle)
        values = (real.c_nvmlFieldValue_t * len(fieldIds))()
        for value, field_id in zip(values, fieldIds, strict=True):
            value.fieldId = field_id
            if field_id in handle.missing_fields or field_id not in (RX, TX):
                value.nvmlReturn = NOT_SUPPORTED
                continue
            value.nvmlReturn = real.NVML_SUCCESS
            value.valueType = handle.counter_type
            member = {UINT: "uiVal", ULONGLONG: "ullVal"}[handle.counter_type]
            raw = handle.rx_bytes if field_id == RX else handle.tx_bytes
            # ctypes keeps the low bits of a too-large int: the counter wraps at its width
            setattr(value.value, member, raw if handle.counter_bits is None else raw % 2**handle.counter_bits)
        return values

    def nvmlDeviceGetPcieThroughput(self, device, counter):
        self._check("nvmlDeviceGetPcieThroughput", device)
        return device.rx_kb_per_s if counter == real.NVML_PCIE_UTIL_RX_BYTES else device.tx_kb_per_s

    def nvmlDeviceGetPowerUsage(self, handle):
        self._check("nvmlDeviceGetPowerUsage", handle)
        return handle.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self._check("nvmlDeviceGetTotalEnergyConsumption", handle)
        return handle.energy_mj

    def nvmlDeviceGetClockInfo(self, handle, type):  # the real parameter's name
        self._check("nvmlDeviceGetClockInfo", handle)
        return handle.sm_clock_mhz if type == real.NVML_CLOCK_SM else handle.memory_clock_mhz

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):
        self._check("nvmlDeviceGetCurrPcieLinkGeneration", handle)
        return handle.pcie_generation

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle):
        self._check("nvmlDeviceGetMaxPcieLinkGeneration", handle)
        return handle.pcie_generation_max

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
        self._check("nvmlDeviceGetCurrPcieLinkWidth", handle)
        return handle.pcie_width

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle):
        self._check("nvmlDeviceGetMaxPcieLinkWidth", handle)
        return handle.pcie_width_max
