"""The strategy registry: the built-in strategies plus any that other packages declare under the entry
point group `promoe_bench.strategies` (name = "module:StrategyClass")."""

import dataclasses
import re
import typing
from importlib.metadata import entry_points

from promoe_bench.errors import UsageError

from .base import Strategy
from .full_gpu import FullGPU
from .lru import LRUCache
from .on_demand import OnDemand
from .oracle import Oracle
from .promoe import ProMoE
from .skip_gate import SkipGate
from .static import StaticCache

ENTRY_POINT_GROUP = "promoe_bench.strategies"
BUILTIN: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FullGPU, OnDemand, LRUCache, StaticCache, SkipGate, ProMoE, Oracle)
}


def available() -> dict[str, type[Strategy]]:
    strategies = dict(BUILTIN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise UsageError(f"entry point {entry.name} = {entry.value} is not a promoe_bench Strategy subclass")
        strategies[entry.name] = cls
    return strategies


def _convert(value: str, annotation, where: str):
    """Turn a command-line string into the field's type (int, float, bool, str, or X | None)."""
    options = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    for kind in options:
        try:
            if kind is bool:
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return kind(value)
        except ValueError:
            continue
    names = " or ".join(getattr(k, "__name__", str(k)) for k in options)
    raise UsageError(f"{where}: {value!r} is not a valid {names}")


def parse(spec: str) -> Strategy:
    """`name` or `name[param=value,...]` -> a configured strategy."""
    match = re.fullmatch(r"\s*([\w-]+)\s*(?:\[(.*)\])?\s*", spec)
    if not match:
        raise UsageError(f"cannot parse strategy {spec!r}: expected NAME or NAME[param=value,...]")
    name, params = match.group(1), match.group(2)
    registry = available()
    if name not in registry:
        raise UsageError(f"unknown strategy {name!r}; available: {', '.join(registry)}")
    cls = registry[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (p.strip() for p in (params or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            valid = ", ".join(sorted(fields))
            raise UsageError(f"strategy {name!r} has no parameter {item!r}; its parameters: {valid}")
        kwargs[key] = _convert(value.strip(), hints[key], f"{name}[{key}]")
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise UsageError(f"strategy {spec!r}: {error}") from None


def resolve(text: str) -> list[Strategy]:
    """`all`, or a comma-separated list of specs (commas inside [...] belong to the spec)."""
    if text.strip() == "all":
        return [cls() for cls in available().values()]
    specs, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(current)
            current = ""
        else:
            current += char
    specs.append(current)
    if not any(spec.strip() for spec in specs):
        raise UsageError("no strategy given")
    return [parse(spec) for spec in specs]
