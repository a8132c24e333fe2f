"""A TOML file read into the fields of a dataclass, with one-line errors that name the file and the field."""

import dataclasses
import tomllib
from pathlib import Path

from .errors import UsageError


def read_fields(path: Path, cls) -> dict:
    """The file's keys, each a field of `cls`, every field without a default among them."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            raise UsageError(f"{path}: unknown field {key!r}; valid fields: {', '.join(fields)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in raw:
            raise UsageError(f"{path}: missing required field {key!r} (required: {', '.join(required)})")
    return raw
