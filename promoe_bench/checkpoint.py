"""Load a Hugging Face MoE checkpoint: non-expert weights through transformers, experts into the store.

transformers' own loader reads everything except the experts: a `key_mapping` renames expert tensors so
it skips them. Each layer's experts are then read from the safetensors files straight into that layer's
store buffer, one layer at a time, after the placeholder tensors transformers allocated for that layer
are released. So the host never holds two copies of the experts: peak memory is about one checkpoint
plus one layer (measured in LoadReport).
"""

import contextlib
import inspect
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .builtin_model import builtin_checkpoint
from .errors import UsageError
from .expert_store import ExpertLayout, ExpertStore
from .families import MoELayer, check_family, find_moe_layers

# Expert tensors renamed so transformers' loader treats them as unexpected and never reads them.
_SKIP_EXPERTS = {r"^(.*)\.experts\.(.*)$": r"promoe_offloaded.\1.\2"}
_EXPERT_KEY = re.compile(r"layers\.(?P<layer>\d+)\.[^.]+\.experts\.(?P<rest>.+)$")
_PER_EXPERT = re.compile(r"(?P<expert>\d+)\.(?P<matrix>gate_proj|w1|up_proj|w3|down_proj|w2)\.(?P<kind>weight|bias)$")
_FUSED = re.compile(r"(?P<matrix>gate_up_proj|down_proj)(?P<bias>_bias)?$")
_CHUNK_OF = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}


@dataclass(frozen=True)
class LoadReport:
    checkpoint_bytes: int
    rss_before_bytes: int
    peak_rss_bytes: int
    seconds: float

    @property
    def peak_over_checkpoint(self) -> float:
        """Extra resident memory at the loading peak, as a multiple of the checkpoint's size."""
        return (self.peak_rss_bytes - self.rss_before_bytes) / self.checkpoint_bytes


@dataclass
class LoadedModel:
    model: nn.Module
    config: object
    layers: list[MoELayer]
    store: ExpertStore
    top_k: int
    path: Path
    report: LoadReport
    tokenizer: object | None  # the checkpoint's own, when it ships one

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    @property
    def pad_id(self) -> int:
        """Id that fills left padding (masked out, so any id works; the tokenizer's when it has one)."""
        if self.tokenizer is not None:
            return self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
        return 0


def resolve_checkpoint(model: str) -> Path:
    """'builtin', a local folder as is, or a hub id, downloaded where the network allows."""
    if model == "builtin":
        return builtin_checkpoint()
    path = Path(model).expanduser()
    if path.is_file():
        raise UsageError(f"model path {path} is a file; give the checkpoint's folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise UsageError(f"model path {model} does not exist (give a checkpoint folder, a hub id, or 'builtin')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as error:  # the hub client raises many types; all mean "could not fetch"
        raise UsageError(f"model {model} is neither a local folder nor fetchable from the hub: {error}") from None


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{path} holds no .safetensors files (only safetensors checkpoints are supported)")
    return files


def _expert_keys(files: list[Path]) -> dict[int, list[tuple[Path, str, re.Match]]]:
    """Checkpoint expert tensors grouped by decoder layer: (file, key, match of the part after 'experts.')."""
    by_layer: dict[int, list] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                match = _EXPERT_KEY.search(key)
                if not match:
                    continue
                rest = match.group("rest")
                parsed = _PER_EXPERT.fullmatch(rest) or _FUSED.fullmatch(rest)
                if parsed is None:
                    raise UsageError(
                        f"unsupported expert tensor {key} in {file.name} (quantized experts are not supported)")
                by_layer.setdefault(int(match.group("layer")), []).append((file, key, parsed))
    return by_layer


def _layout(layer: MoELayer, dtype: torch.dtype) -> ExpertLayout:
    experts = layer.experts
    if not experts.has_gate:
        raise UsageError(f"experts without a gate projection ({type(experts).__name__}) are not supported")
    gate_up = experts.gate_up_proj  # [E, 2I, H], or [E, H, 2I] when transposed
    hidden, double_i = (gate_up.shape[1], gate_up.shape[2]) if experts.is_transposed else gate_up.shape[2:0:-1]
    return ExpertLayout(hidden, double_i // 2, experts.is_transposed, experts.has_bias, dtype)


def _split_gate_up(tensor: torch.Tensor, experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up halves of one expert's fused gate_up weight (or bias); the fused axis is the last
    one when transposed or for a bias, else the first."""
    axis = -1 if (experts.is_transposed or tensor.dim() == 1) else 0
    if experts.is_concatenated:
        return tensor.chunk(2, dim=axis)
    index = torch.arange(tensor.shape[axis])
    return tensor.index_select(axis, index[0::2]), tensor.index_select(axis, index[1::2])


def _fill_layer(buffer: torch.Tensor, layout: ExpertLayout, layer: MoELayer, keys) -> None:
    """Read one layer's experts from the checkpoint into `buffer` [E, numel]."""
    views = [layout.chunk_views(buffer[e]) for e in range(buffer.shape[0])]
    filled = torch.zeros(buffer.shape[0], 3, 2, dtype=torch.bool)  # expert, chunk, (weight, bias)
    for file in sorted({file for file, _, _ in keys}):
        with safe_open(file, framework="pt") as f:  # opened per layer: its pages leave RSS when closed
            for key_file, key, parsed in keys:
                if key_file != file:
                    continue
                groups = parsed.groupdict()
                if "expert" in groups:  # one matrix of one expert, always stored as [out, in]
                    expert, chunk = int(groups["expert"]), _CHUNK_OF[groups["matrix"]]
                    slot = 0 if groups["kind"] == "weight" else 1
                    tensor = f.get_tensor(key)
                    if slot == 0 and layout.transposed:
                        tensor = tensor.t()
                    views[expert][chunk][slot].copy_(tensor)
                    filled[expert, chunk, slot] = True
                    continue
                slot = 1 if groups["bias"] else 0
                fused = f.get_slice(key)
                for expert in range(buffer.shape[0]):
                    tensor = fused[expert]
                    if groups["matrix"] == "down_proj":
                        views[expert][2][slot].copy_(tensor)
                        filled[expert, 2, slot] = True
                    else:
                        gate, up = _split_gate_up(tensor, layer.experts)
                        views[expert][0][slot].copy_(gate)
                        views[expert][1][slot].copy_(up)
                        filled[expert, :2, slot] = True
    missing = ~filled[:, :, 0]
    if layout.has_bias:
        missing |= ~filled[:, :, 1]
    if missing.any():
        raise UsageError(f"checkpoint lacks expert tensors for {layer.name} (incomplete or unsupported layout)")


@contextlib.contextmanager
def _experts_left_uninitialized(model_class):
    """transformers random-initialises weights missing from the checkpoint, and the skipped experts are
    missing: that would write (and make resident) a full copy of the experts. Its initialiser skips
    modules marked `_is_hf_initialized`, so mark the family's experts classes while loading."""
    classes = [cls for _, cls in inspect.getmembers(sys.modules[model_class.__module__], inspect.isclass)
               if hasattr(cls, "_apply_gate") and "_is_hf_initialized" not in vars(cls)]
    for cls in classes:
        cls._is_hf_initialized = True
    try:
        yield
    finally:
        for cls in classes:
            del cls._is_hf_initialized


def _release_expert_params(experts: nn.Module) -> None:
    """Swap the placeholders transformers allocated for the experts for empty tensors."""
    for name, param in list(experts.named_parameters(recurse=False)):
        setattr(experts, name, nn.Parameter(param.new_empty(0, device="cpu"), requires_grad=False))


def _reset_peak_rss() -> None:
    """Restart the kernel's resident-memory high-water mark (Linux 4.0+), so the peak is the load's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    """VmHWM where /proc has it: unlike ru_maxrss, it is not inherited from the parent process."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def load_checkpoint(model: str, device: torch.device, dtype: str = "auto") -> LoadedModel:
    path = resolve_checkpoint(model)
    try:
        raw_config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read {path / 'config.json'}: {error}") from None
    if not isinstance(raw_config, dict):
        raise UsageError(f"{path / 'config.json'} is not a JSON object")
    check_family(raw_config, str(path))
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        raise UsageError(f"cannot read the config of {path}: {str(error).splitlines()[0]}") from None
    torch_dtype = _resolve_dtype(dtype, config)
    files = _safetensors_files(path)
    checkpoint_bytes = sum(os.path.getsize(f) for f in files)

    model_class = AutoModelForCausalLM._model_mapping[type(config)]  # imports the family's code: not load memory
    _reset_peak_rss()
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the skipped experts as unexpected: expected
    hf_logging.disable_progress_bar()
    try:
        with _experts_left_uninitialized(model_class):
            hf_model = model_class.from_pretrained(path, dtype=torch_dtype, key_mapping=_SKIP_EXPERTS)
    finally:
        hf_logging.set_verbosity(verbosity)
    layers = find_moe_layers(hf_model)
    if not layers:
        raise UsageError(f"{path} is not a Mixture-of-Experts model: no experts module was found")
    layout = _layout(layers[0], torch_dtype)
    store = ExpertStore(layout, len(layers), layers[0].experts.num_experts, pin=device.type == "cuda")
    keys = _expert_keys(files)
    for layer in layers:
        if layer.decoder_layer not in keys:
            raise UsageError(f"checkpoint {path} has no expert tensors for {layer.name}")
        _release_expert_params(layer.experts)
        _fill_layer(store.allocate_layer(layer.index), layout, layer, keys[layer.decoder_layer])
    report = LoadReport(checkpoint_bytes, rss_before, _peak_rss(), time.perf_counter() - start)

    hf_model.to(device).eval().requires_grad_(False)
    return LoadedModel(hf_model, config, layers, store, int(config.num_experts_per_tok), path, report,
                       load_tokenizer(path))


def load_tokenizer(path: Path):
    """The checkpoint's own tokenizer, or None when it ships none."""
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(path)
    return None


def _resolve_dtype(dtype: str, config) -> torch.dtype:
    if dtype == "auto":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, torch.dtype):
            return stored
        return getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else torch.float32
    return getattr(torch, dtype)
