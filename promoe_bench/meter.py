"""The hardware counters of one strategy run, per measured phase (prefill, decode): PCIe bytes the GPU
received, GPU memory, energy, host RSS, and the bytes the link itself moved.

A sampler runs for the whole run (NVML and RSS on CUDA, RSS on the CPU); begin() and end() take a
synchronous snapshot each and reduce the window between them to one row. Start it: besides the peaks,
its reads are what catch each wrap of a 32-bit PCIe counter and what the throughput fallback integrates.
begin() and end() are called between generation steps, never inside a timed one. A value this machine
cannot measure is None in the row (NaN in a table), never 0, and `missing` says why.
"""

import time

import psutil
import torch

from .nvml import COUNTER_MARGIN, FIELD_COUNTERS, THROUGHPUT_SAMPLES, Missing, NvmlDevice, Sampler, open_device

FIELDS = ("phase", "tokens", "seconds", "pcie_h2d_bytes", "pcie_h2d_gbps", "nvml_peak_memory_bytes",
          "torch_max_allocated_bytes", "torch_max_reserved_bytes", "energy_j", "energy_per_token_j",
          "peak_rss_bytes", "link_bytes", "link_gbps")
NVML_METRICS = ("pcie_h2d_bytes", "pcie_h2d_gbps", "nvml_peak_memory_bytes", "energy_j", "energy_per_token_j")
TORCH_METRICS = ("torch_max_allocated_bytes", "torch_max_reserved_bytes")


def integrate_rate(samples: list[dict], key: str, start: float, end: float) -> float | None:
    """Bytes moved between perf_counter times start and end, from samples of a rate in bytes/s: each
    sample's rate holds since the sample before it (the first since `start`), the last one's until `end`.
    None when no sample falls in the window."""
    points = [(s["t"], s[key]) for s in samples if key in s and start <= s["t"] <= end]
    if not points:
        return None
    total, previous = 0.0, start
    for t, rate in points:
        total += rate * (t - previous)
        previous = t
    return total + points[-1][1] * (end - previous)


def _peak(samples: list[dict], key: str) -> int | None:
    return max((s[key] for s in samples if key in s), default=None)


class PhaseMeter:
    """start(), then begin(phase) / end(tokens) -> row around each measured phase, then close()."""

    def __init__(self, device: torch.device, link, nvml=None, interval_s: float = 0.01):
        self.device, self.link = device, link
        self.cuda = device.type == "cuda"
        self.gpu: NvmlDevice | Missing = open_device(device, nvml)
        self.missing: dict[str, str] = {}  # metric -> why it cannot be measured here
        if not self.cuda:
            self.missing.update(dict.fromkeys(TORCH_METRICS, "the device is the CPU"))
        self._note_gpu()
        self._process = psutil.Process()
        self._sampler = Sampler(self._read, interval_s)
        self._snapshots: list[dict] = []
        self._open: tuple | None = None  # (phase, snapshot, link bytes, sampler index) between begin and end
        self._pcie_dropped = 0  # PCIe counter moves dropped as impossible (WrappingCounter) inside the phases

    def _note_gpu(self) -> None:
        if isinstance(self.gpu, Missing):
            self.missing.update(dict.fromkeys(NVML_METRICS, self.gpu.reason))
            return
        supported = self.gpu.supported()
        for counter, metrics in (("pcie_h2d", ("pcie_h2d_bytes", "pcie_h2d_gbps")),
                                 ("memory_used", ("nvml_peak_memory_bytes",)),
                                 ("energy", ("energy_j", "energy_per_token_j"))):
            if supported[counter] != "supported":
                self.missing.update(dict.fromkeys(metrics, supported[counter]))

    def _read(self, throughput: bool = True) -> dict:
        sample = self.gpu.read(throughput) if isinstance(self.gpu, NvmlDevice) else {"t": time.perf_counter()}
        sample["rss_bytes"] = self._process.memory_info().rss
        sample["link_bytes"] = self.link.counters.bytes  # the link's own count: the CPU's stand-in for PCIe
        return sample

    def _snapshot(self) -> dict:
        """A sample taken now, on the caller's thread; the PCIe throughput query (20 ms) is left to the
        sampler. An NVML failure here ends NVML for the run rather than the run."""
        try:
            sample = self._read(throughput=False)
        except Exception as error:  # the GPU fell off the bus, the driver went away: measure what is left
            if not isinstance(self.gpu, NvmlDevice):
                raise
            self.gpu.close()
            self.gpu = Missing(f"NVML stopped answering: {type(error).__name__}: {error}")
            self._note_gpu()
            sample = self._read()
        self._snapshots.append(sample)
        return sample

    def start(self) -> None:
        self._sampler.start()

    def begin(self, phase: str) -> None:
        assert self._open is None, f"phase {self._open and self._open[0]} has not ended"
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the previous phase's copies count there, not here
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open = (phase, self._snapshot(), self.link.counters.bytes, len(self._sampler.samples))

    def end(self, tokens: int) -> dict:
        """The row of the phase since begin(): host wall seconds (only for the rates), the counters'
        differences and peaks over the window's samples, and None for what cannot be measured."""
        assert self._open is not None, "end() without begin()"
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the phase's copies have landed before the counters are read
        last = self._snapshot()
        phase, first, link_start, index = self._open
        self._open = None
        start, stop = first["t"], last["t"]
        seconds = stop - start
        window = [first, *(s for s in self._sampler.samples[index:] if start <= s["t"] <= stop), last]
        if self._sampler.error is not None:
            self.missing["samples"] = f"sampling stopped: {self._sampler.error}"

        h2d = self._h2d_bytes(first, last, window)
        energy = last["energy_j"] - first["energy_j"] if "energy_j" in first and "energy_j" in last else None
        link_bytes = self.link.counters.bytes - link_start
        return {
            "phase": phase,
            "tokens": tokens,
            "seconds": seconds,
            "pcie_h2d_bytes": h2d,
            "pcie_h2d_gbps": _gbps(h2d, seconds),
            "nvml_peak_memory_bytes": _peak(window, "memory_used_bytes"),
            "torch_max_allocated_bytes": torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
            "torch_max_reserved_bytes": torch.cuda.max_memory_reserved(self.device) if self.cuda else None,
            "energy_j": energy,
            "energy_per_token_j": energy / tokens if energy is not None and tokens > 0 else None,
            "peak_rss_bytes": _peak(window, "rss_bytes"),
            "link_bytes": link_bytes,
            "link_gbps": _gbps(link_bytes, seconds),
        }

    def _h2d_bytes(self, first: dict, last: dict, window: list[dict]) -> float | None:
        if isinstance(self.gpu, Missing):
            return None
        if self.gpu.pcie_source == FIELD_COUNTERS:
            dropped = last["pcie_h2d_dropped"] - first["pcie_h2d_dropped"]
            if dropped:
                # What the link carried in a dropped interval is unknown (anything from 0 to the bound), so the
                # phase's total would be short by an unknown amount: it is left out rather than shown low with
                # a note that a table of phases does not carry.
                self._pcie_dropped += dropped
                reads = f"{self._pcie_dropped} PCIe counter read{'s' if self._pcie_dropped > 1 else ''}"
                why = (f"{reads} dropped: the counter moved more than the link's peak "
                       f"({self.gpu.pcie_peak_bytes_per_s / 1e9:.1f} GB/s, with a {COUNTER_MARGIN}x margin) allows "
                       "in the time between reads")
                self.missing.update(dict.fromkeys(("pcie_h2d_bytes", "pcie_h2d_gbps"), why))
                return None
            return last["pcie_h2d_bytes"] - first["pcie_h2d_bytes"]
        if self.gpu.pcie_source == THROUGHPUT_SAMPLES:
            moved = integrate_rate(window, "pcie_h2d_bytes_per_s", first["t"], last["t"])
            if moved is None:
                self.missing.setdefault("pcie_h2d_bytes", "a phase shorter than the throughput sampling period "
                                        "had no sample (the sampler was not started, or each query takes 20 ms)")
            return moved
        return None

    @property
    def samples(self) -> list[dict]:
        """Every sample of the run, the snapshots included, in time order (`t` in perf_counter seconds):
        the counter tracks of a timeline (GPU memory, PCIe, RSS)."""
        return sorted([*self._sampler.samples, *self._snapshots], key=lambda s: s["t"])

    def close(self) -> None:
        self._sampler.stop()
        if self._sampler.error is not None:
            self.missing["samples"] = f"sampling stopped: {self._sampler.error}"
        if isinstance(self.gpu, NvmlDevice):
            self.gpu.close()
            self.gpu = Missing("the meter is closed")

    def __enter__(self) -> "PhaseMeter":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _gbps(nbytes: float | None, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if nbytes is not None and seconds > 0 else None
