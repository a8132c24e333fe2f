"""NVML through nvidia-ml-py's `pynvml` module: which GPU a torch device is, what it can report, and one
sample of its counters; and a sampler thread that takes such samples at an interval.

Nothing here needs a GPU. `open_device` returns Missing, with the reason, on the CPU, without the package
or without the NVML library; every counter is probed once when a device opens, and one the GPU cannot
report is left out of samples, its reason kept in `supported()`.

Directions are the GPU's: NVML counts PCIe bytes at the device, so RX ("PCIe receive bytes", nvml.h on
NVML_FI_DEV_PCIE_COUNT_RX_BYTES and NVML_PCIE_UTIL_RX_BYTES) is what the GPU receives: host-to-device
copies. TX is device-to-host.
"""

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .pcie import pcie_peak_bytes_per_s

FIELD_COUNTERS = "field counters"  # cumulative byte counters (nvmlDeviceGetFieldValues), exact
THROUGHPUT_SAMPLES = "throughput samples"  # KB/s over a 20 ms window per call (nvmlDeviceGetPcieThroughput)
# NVML documents the throughput in "KB/s" without saying which K; taken as KiB like nvitop does.
THROUGHPUT_UNIT_BYTES = 1024
COUNTERS = ("memory_used", "pcie_h2d", "power", "energy", "sm_clock", "memory_clock")  # what read() samples
DESCRIBE_KEYS = ("name", "uuid", "pci_bus_id", "driver_version", "cuda_driver_version", "memory_total_bytes",
                 "pcie_generation", "pcie_generation_max", "pcie_width", "pcie_width_max")
# How far past the link's peak a PCIe counter may move between two reads before the move is taken as impossible
# (a wrap at the wrong width, a reset, a jump) and dropped. The counters may count the link's protocol bytes
# as well as the payload (packet headers, acknowledgements, flow control, replays: tens of percent at most),
# so 2x never drops a real transfer, while a false 64-bit wrap (1.8e19 bytes) is still millions of times over
# the bound even for reads a minute apart.
COUNTER_MARGIN = 2


@dataclass(frozen=True)
class Missing:
    """A value this machine cannot measure, and why; recorded instead of the value, never as 0."""

    reason: str


@dataclass(frozen=True)
class Identity:
    """What names one GPU to both torch and NVML: its UUID in NVML's "GPU-..." form and, when torch
    reports it, its PCI (domain, bus, device)."""

    uuid: str | None
    pci: tuple[int, int, int] | None = None


def normal_uuid(uuid: str) -> str:
    """NVML's form of a GPU UUID: torch prints the same hex digits without the "GPU-" prefix."""
    return "GPU-" + uuid.strip().lower().removeprefix("gpu-")


def torch_identity(device: torch.device) -> Identity:
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    pci = tuple(getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    return Identity(normal_uuid(str(uuid)) if uuid is not None else None, None if None in pci else pci)


def open_device(device: torch.device, nvml=None, identity: Identity | None = None) -> "NvmlDevice | Missing":
    """The NVML device behind a torch CUDA device, or why there is none.

    Matched by UUID (or PCI address), never by index: CUDA numbers the devices it sees after
    CUDA_VISIBLE_DEVICES and, by default, fastest first; NVML numbers every GPU in PCI order.
    `nvml` is the pynvml module (a fake in tests); `identity` defaults to what torch reports.
    """
    if device.type != "cuda":
        return Missing("the device is the CPU")
    if nvml is None:
        try:
            import pynvml as nvml  # provided by nvidia-ml-py
        except ImportError:
            return Missing("nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return Missing(f"NVML: {error}")
    try:
        identity = identity or torch_identity(device)
        handle = _find(nvml, identity)
    except nvml.NVMLError as error:
        _shutdown(nvml)
        return Missing(f"NVML: {error}")
    if handle is None:
        _shutdown(nvml)
        return Missing(f"no NVML device has UUID {identity.uuid} or PCI address {identity.pci} (a MIG instance?)")
    return NvmlDevice(nvml, handle)


def _find(nvml, identity: Identity):
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError:  # a GPU this process may not query (e.g. another container's) is not ours
            continue
        if identity.uuid is not None and normal_uuid(nvml.nvmlDeviceGetUUID(handle)) == identity.uuid:
            return handle
        if identity.pci is not None:
            pci = nvml.nvmlDeviceGetPciInfo(handle)
            if (pci.domain, pci.bus, pci.device) == identity.pci:
                return handle
    return None


def _shutdown(nvml) -> None:
    try:
        nvml.nvmlShutdown()  # NVML counts nvmlInit calls; each open device holds one
    except nvml.NVMLError:
        pass


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def counter_delta(previous: int, current: int, bits: int | None) -> int:
    """How much an unsigned counter that wraps at 2**bits advanced between two reads (at most one wrap
    apart). `bits` None (width unknown): a counter last read below 2**32 is taken to wrap at 2**32, one
    above at 2**64."""
    if current >= previous:
        return current - previous
    if bits is None:
        bits = 32 if previous < 2**32 else 64
    return current + 2**bits - previous


class WrappingCounter:
    """A cumulative hardware counter made monotonic: the total it advanced since its first read.

    Reads must come less than one wrap apart: a 32-bit PCIe counter wraps every 4.3 GB, 86 ms at 50 GB/s,
    which the sampler's 10 ms keeps well inside; two reads a phase apart, without it, would not.
    A move between two reads (after unwrapping) larger than COUNTER_MARGIN x `peak_bytes_per_s` allows in the
    time between them cannot be bytes the link carried; it is dropped, not added, and counted in `dropped`.
    """

    def __init__(self, peak_bytes_per_s: float):
        self.peak_bytes_per_s = peak_bytes_per_s
        self.total = 0
        self.dropped = 0  # moves the link could not have made, left out of `total`
        self._last: tuple[int, float] | None = None  # (raw value, perf_counter seconds its read began)

    def update(self, raw: int, bits: int | None, began: float, ended: float) -> int:
        """Takes one read of the counter, which the hardware latched somewhere between perf_counter seconds
        `began` and `ended`; returns the total. The counter moved between two latches for at most the time
        from the previous read's start to this read's end, however long each read took."""
        if self._last is not None:
            last, last_began = self._last
            delta = counter_delta(last, raw, bits)
            if delta <= COUNTER_MARGIN * self.peak_bytes_per_s * (ended - last_began):
                self.total += delta
            else:  # the counter does not advance for this interval; the next delta starts from `raw`
                self.dropped += 1
        self._last = raw, began
        return self.total


class NvmlDevice:
    """One GPU through NVML. Every counter is probed once here; read() asks only those that answered."""

    def __init__(self, nvml, handle):
        self.nvml, self.handle = nvml, handle
        self._reasons: dict[str, str] = {}  # counter -> why this GPU cannot report it
        # A field value's valueType says which member of its union holds the value, so how wide the
        # counter is and where it wraps; nvml.h says only "Value can be wrapped". A driver whose valueType
        # is wider than its counter makes each wrap look like 1.8e19 bytes: the link's peak bounds that out.
        self._field_types = {nvml.NVML_VALUE_TYPE_UNSIGNED_INT: ("uiVal", 32),
                             nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: ("ulVal", 8 * ctypes.sizeof(ctypes.c_ulong)),
                             nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: ("ullVal", 64)}
        # nvml.h's field ids (older bindings lack the names; whether the driver knows them, it says per field)
        self._fields = [getattr(nvml, "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 198),
                        getattr(nvml, "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 197)]
        self.pcie_peak_bytes_per_s = self._link_peak()  # bounds how far a PCIe counter can move between reads
        peak = self.pcie_peak_bytes_per_s
        self._h2d, self._d2h = WrappingCounter(peak), WrappingCounter(peak)  # RX, TX: the GPU's directions
        self.counter_bits: int | None = None  # the width the PCIe field counters wrap at, once read
        self._lock = threading.Lock()  # the sampler thread and synchronous snapshots share the counters
        self._memory = self._probe_memory()
        self.pcie_source: str | Missing = self._probe_pcie()
        if isinstance(self.pcie_source, Missing):
            self._reasons["pcie_h2d"] = self.pcie_source.reason
        self._probe("power", nvml.nvmlDeviceGetPowerUsage, handle)
        self._probe("energy", nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        self._probe("sm_clock", nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        self._probe("memory_clock", nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM)

    def _probe(self, counter: str, query, *args, **kwargs) -> bool:
        try:
            query(*args, **kwargs)
        except self.nvml.NVMLError as error:
            self._reasons[counter] = f"NVML: {error}"
            return False
        return True

    def _link_peak(self) -> float:
        """pcie_peak_bytes_per_s of the widest, newest link this GPU in this slot can reach (the current one
        narrows while the GPU idles); what NVML will not say is left to the function's ceiling."""
        answers = []
        for query in (self.nvml.nvmlDeviceGetMaxPcieLinkGeneration, self.nvml.nvmlDeviceGetMaxPcieLinkWidth):
            try:
                answers.append(query(self.handle))
            except self.nvml.NVMLError:
                answers.append(None)
        return pcie_peak_bytes_per_s(*answers)

    def _probe_memory(self) -> dict | None:
        """Keyword arguments for nvmlDeviceGetMemoryInfo: v2 where binding and driver have it (its `used`
        leaves out the driver's reserved memory, v1's includes it), else v1; None if neither answers."""
        version = getattr(self.nvml, "nvmlMemory_v2", None)
        for kwargs in ([{"version": version}] if version is not None else []) + [{}]:
            if self._probe("memory_used", self.nvml.nvmlDeviceGetMemoryInfo, self.handle, **kwargs):
                self._reasons.pop("memory_used", None)
                return kwargs
        return None

    def _probe_pcie(self) -> str | Missing:
        nvml = self.nvml
        try:
            self._read_fields()
            return FIELD_COUNTERS
        except nvml.NVMLError as error:
            fields = f"field counters: {error}"
        try:
            nvml.nvmlDeviceGetPcieThroughput(self.handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
            return THROUGHPUT_SAMPLES
        except nvml.NVMLError as error:
            return Missing(f"NVML: {fields}; throughput: {error}")

    def _read_fields(self) -> dict:
        """The unwrapped PCIe byte totals, and how many of the RX counter's moves were dropped as impossible
        (WrappingCounter). Raises NVMLError when the RX field cannot be read; TX, which nothing here depends
        on, is left out when it cannot."""
        nvml = self.nvml
        with self._lock:  # counter updates must see reads in order
            began = time.perf_counter()
            rx, tx = nvml.nvmlDeviceGetFieldValues(self.handle, self._fields)
            ended = time.perf_counter()
            if rx.nvmlReturn != nvml.NVML_SUCCESS:
                raise nvml.NVMLError(rx.nvmlReturn)
            member, self.counter_bits = self._field_types.get(rx.valueType, ("ullVal", None))
            totals = {"pcie_h2d_bytes": self._h2d.update(getattr(rx.value, member), self.counter_bits, began, ended),
                      "pcie_h2d_dropped": self._h2d.dropped}
            if tx.nvmlReturn == nvml.NVML_SUCCESS:
                member, bits = self._field_types.get(tx.valueType, ("ullVal", None))
                totals["pcie_d2h_bytes"] = self._d2h.update(getattr(tx.value, member), bits, began, ended)
        return totals

    def supported(self) -> dict[str, str]:
        """Each counter read() samples -> "supported", or why this GPU cannot report it."""
        return {counter: self._reasons.get(counter, "supported") for counter in COUNTERS}

    def describe(self) -> tuple[dict, dict]:
        """(values, reasons): the GPU and its PCIe link, each value NVML would not give replaced by why.

        The current link generation drops while the GPU idles (power saving); the max is what this GPU in
        this slot can reach.
        """
        nvml, handle = self.nvml, self.handle
        queries = {
            "name": lambda: _text(nvml.nvmlDeviceGetName(handle)),
            "uuid": lambda: _text(nvml.nvmlDeviceGetUUID(handle)),
            "pci_bus_id": lambda: _text(nvml.nvmlDeviceGetPciInfo(handle).busId),
            "driver_version": lambda: _text(nvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": lambda: _cuda_version(nvml.nvmlSystemGetCudaDriverVersion()),
            "memory_total_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total,
            "pcie_generation": lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
            "pcie_generation_max": lambda: nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
            "pcie_width": lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
            "pcie_width_max": lambda: nvml.nvmlDeviceGetMaxPcieLinkWidth(handle),
        }
        values, reasons = {}, {}
        for key, query in queries.items():
            try:
                values[key] = query()
            except nvml.NVMLError as error:
                reasons[key] = f"NVML: {error}"
        return values, reasons

    def read(self, throughput: bool = True) -> dict:
        """One sample: `t` (perf_counter seconds, the middle of the read), `memory_used_bytes` (the whole
        GPU, every process), `pcie_h2d_bytes` / `pcie_d2h_bytes` (totals since this device opened, without the
        moves the link could not have made; `pcie_h2d_dropped` counts RX's) or `pcie_h2d_bytes_per_s`
        (throughput fallback), `power_w`, `energy_j` (since the driver loaded),
        `sm_clock_mhz`, `memory_clock_mhz`. A counter this GPU lacks is absent.

        throughput=False skips the throughput query, which blocks for its 20 ms window.
        """
        nvml, handle, unsupported = self.nvml, self.handle, self._reasons
        start = time.perf_counter()
        sample = {}
        if self._memory is not None:
            sample["memory_used_bytes"] = nvml.nvmlDeviceGetMemoryInfo(handle, **self._memory).used
        if self.pcie_source == FIELD_COUNTERS:
            sample.update(self._read_fields())
        elif self.pcie_source == THROUGHPUT_SAMPLES and throughput:
            kb_per_s = nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
            sample["pcie_h2d_bytes_per_s"] = kb_per_s * THROUGHPUT_UNIT_BYTES
        if "power" not in unsupported:
            sample["power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1e3  # mW
        if "energy" not in unsupported:
            sample["energy_j"] = nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ
        if "sm_clock" not in unsupported:
            sample["sm_clock_mhz"] = nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)
        if "memory_clock" not in unsupported:
            sample["memory_clock_mhz"] = nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)
        sample["t"] = (start + time.perf_counter()) / 2
        return sample

    def close(self) -> None:
        _shutdown(self.nvml)


def _cuda_version(version: int) -> str:
    """NVML's CUDA driver version as major.minor: 12040 -> "12.4"."""
    return f"{version // 1000}.{version % 1000 // 10}"


class Sampler:
    """Calls `read` every `interval_s` seconds on a daemon thread between start() and stop(), keeping each
    sample. It never raises into its caller: a read that fails ends sampling, and `error` says why."""

    def __init__(self, read: Callable[[], dict], interval_s: float = 0.01):
        self.read, self.interval_s = read, interval_s
        self.samples: list[dict] = []  # appended by the thread only; readers take slices
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        assert self._thread is None, "a sampler starts once"
        self._thread = threading.Thread(target=self._run, name="promoe-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.read())
            except Exception as error:  # a broken counter must not take the benchmark down with it
                self.error = f"{type(error).__name__}: {error}"
                return
            self._stop.wait(self.interval_s)

    def stop(self) -> list[dict]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # a read hung in the driver must not hang the run; the thread is a daemon
        return self.samples
