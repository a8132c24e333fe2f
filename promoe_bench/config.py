"""The run configuration: command-line values parsed once, validated, frozen, and passed down.

Every default lives here. The emulated link's defaults are derived in README.md ("The emulated link").
"""

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .workloads import Workload

# Emulated host-to-device link for --device cpu. Derived so that, for the built-in model on a 2-core
# CPU, one expert's copy takes about 2.06x one layer's decode compute, as in the paper's setup
# (17.3 MB at 23.9 GB/s = 0.72 ms per expert, against 9.8 ms / 28 layers = 0.35 ms per layer); here
# full_gpu decodes in about 5.5 ms over 6 layers (README: The emulated link).
DEFAULT_LINK_GBPS = 0.05
DEFAULT_LINK_LATENCY_US = 20.0
# On CUDA, the share of the device's memory kept free of experts for activations, the KV cache and the
# caching allocator's slack, when --device-memory does not say how much the experts may take.
DEVICE_RESERVE = 0.10


def flag_workload(prompt_len: int | None = None, gen_len: int | None = None, batch_size: int | None = None,
                  num_requests: int | None = None, seed: int | None = None) -> Workload:
    """The workload of a run given no --workload: random token ids of one length (the issue-2 default)."""
    def given(value, default):
        return default if value is None else value

    batch, length = given(batch_size, 1), given(prompt_len, 64)
    return Workload(name="flags", description="random token ids sized by --prompt-len / --gen-len",
                    source="synthetic", num_requests=given(num_requests, batch), min_prompt_tokens=length,
                    max_prompt_tokens=length, output_tokens=given(gen_len, 32), batch_size=batch, seed=given(seed, 0))


@dataclass(frozen=True)
class RunConfig:
    model: str = "builtin"
    strategies: str = "all"
    cache_rate: float = 0.5
    gpu_memory: int | None = None  # bytes for the expert cache; overrides cache_rate when given
    device_memory: int | None = None  # bytes the experts may take on the device (default: CUDA's free memory)
    device: str = "auto"
    dtype: str = "auto"
    link_gbps: float = DEFAULT_LINK_GBPS
    link_latency_us: float = DEFAULT_LINK_LATENCY_US
    workload: Workload = dataclasses.field(default_factory=flag_workload)
    repeats: int = 3
    warmup: int = 1
    baseline: str = "lru"
    predictors: Path | None = None  # learned predictors' folder; default: beside the model
    record_trace: Path | None = None  # write the workload's routing log (routing_log.py) here
    out: Path = Path("runs/latest")
    overwrite: bool = False

    def __post_init__(self):
        if not 0 < self.cache_rate <= 1:
            raise UsageError(f"--cache-rate must be in (0, 1], got {self.cache_rate}")
        for flag, value in (("--gpu-memory", self.gpu_memory), ("--device-memory", self.device_memory)):
            if value is not None and value <= 0:
                raise UsageError(f"{flag} must be a positive number of bytes, got {value}")
        for flag, value, low in (
            ("--repeats", self.repeats, 1),
            ("--warmup", self.warmup, 0),
        ):
            if value < low:
                raise UsageError(f"{flag} must be at least {low}, got {value}")
        if self.link_gbps <= 0 or self.link_latency_us < 0:
            raise UsageError("--link-gbps must be positive and --link-latency-us not negative")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.record_trace is not None and (self.record_trace.is_dir() or not self.record_trace.parent.is_dir()):
            raise UsageError(f"--record-trace {self.record_trace}: give a file in an existing folder")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device} asked for a GPU, but torch sees no CUDA device here")
        return torch.device(self.device)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


def cache_capacity(num_experts: int, top_k: int, num_layers: int, expert_bytes: int,
                   cache_rate: float, gpu_memory: int | None) -> int:
    """Cache slots per layer: the byte budget split evenly over layers, or a fraction of each layer's
    experts; rounded down, so the cache never holds more than asked."""
    if gpu_memory is not None:
        per_layer = gpu_memory // expert_bytes // num_layers
        asked = f"--gpu-memory {gpu_memory} B ({per_layer} experts of {expert_bytes} B per layer)"
    else:
        per_layer = math.floor(cache_rate * num_experts + 1e-9)
        asked = f"cache rate {cache_rate} of {num_experts} experts ({per_layer} per layer)"
    if per_layer < top_k:
        raise UsageError(f"cache too small: {asked} cannot hold one layer's top-{top_k} experts")
    return min(per_layer, num_experts)
