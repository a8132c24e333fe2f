"""Workloads: what is asked of the model, so that every strategy of a run gets exactly the same requests.

A workload is a TOML file (the shipped ones are in workloads/; see `load_workload`) naming a prompt source,
the prompt-length limits, how many requests, how many tokens to generate, the batch size and the seed.
`build_requests` turns it into token-id lists, the same ones for a given seed on every call.
"""

import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .toml_fields import read_fields

SOURCES = ("prompts", "sharegpt", "alpaca", "synthetic")
OVERFLOWS = ("truncate", "skip")  # a prompt over max_prompt_tokens: keep its first max tokens, or drop it
REPO_WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"
HUMAN_ROLES = ("human", "user")
_FILE_KIND = {"prompts": "a prompt", "sharegpt": "a ShareGPT", "alpaca": "an Alpaca"}
_EXPECTED = {"prompts": "objects with a non-empty 'text'",
             "sharegpt": "objects whose 'conversations' list has a human or user turn with text",
             "alpaca": "objects with a non-empty 'instruction'"}


class _FieldError(UsageError):
    """A field's value is wrong; `detail` is the message without the workload's name, for the file's loader."""

    def __init__(self, name, detail: str):
        super().__init__(f"workload {name}: {detail}")
        self.detail = detail


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    source: str  # one of SOURCES
    num_requests: int
    min_prompt_tokens: int  # shorter prompts are dropped
    max_prompt_tokens: int  # longer ones are truncated or dropped, by `overflow`
    output_tokens: int
    batch_size: int
    seed: int
    overflow: str = "truncate"
    path: Path | None = None  # the data file; None for synthetic; source "prompts" defaults to the shipped set
    categories: tuple[str, ...] | None = None  # source "prompts" only; None means every category

    def __post_init__(self):
        if isinstance(self.path, str):
            object.__setattr__(self, "path", Path(self.path))
        if self.path is None and self.source == "prompts":  # the shipped prompt set
            object.__setattr__(self, "path", shipped_dir() / "prompts.jsonl")
        if isinstance(self.categories, list):
            object.__setattr__(self, "categories", tuple(self.categories))
        detail = self._problem()
        if detail:
            raise _FieldError(self.name, detail)

    def _problem(self) -> str | None:
        for field in ("name", "description", "source", "overflow"):
            if not isinstance(getattr(self, field), str):
                return f"field {field!r} must be a string, got {getattr(self, field)!r}"
        if not self.name:
            return "field 'name' must be a non-empty string"
        if self.source not in SOURCES:
            return f"field 'source' must be one of {', '.join(SOURCES)}, got {self.source!r}"
        if self.overflow not in OVERFLOWS:
            return f"field 'overflow' must be one of {', '.join(OVERFLOWS)}, got {self.overflow!r}"
        for field, low in (("num_requests", 1), ("min_prompt_tokens", 1), ("output_tokens", 1),
                           ("batch_size", 1), ("seed", 0), ("max_prompt_tokens", self.min_prompt_tokens)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                bound = f"{low}" if field != "max_prompt_tokens" else f"min_prompt_tokens ({low})"
                return f"field {field!r} must be an integer >= {bound}, got {value!r}"
        if self.path is not None and not isinstance(self.path, Path):
            return f"field 'path' must be a string, got {self.path!r}"
        if self.source == "synthetic" and self.path is not None:
            return "field 'path' is not used by source 'synthetic' (it reads no file)"
        if self.source in ("sharegpt", "alpaca") and self.path is None:
            return f"field 'path' is required for source {self.source!r} ({_FILE_KIND[self.source]} JSON or JSONL file)"
        if self.categories is not None:
            if self.source != "prompts":
                return f"field 'categories' is only for source 'prompts', not {self.source!r}"
            if (not isinstance(self.categories, tuple) or not self.categories
                    or not all(isinstance(c, str) for c in self.categories)):
                return f"field 'categories' must be a non-empty list of strings, got {self.categories!r}"
        return None

    def with_overrides(self, **values) -> "Workload":
        """A copy with every value that is not None replaced (command-line flags), validated again."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def with_path(self, path: str | Path) -> "Workload":
        """A copy reading the given data file (`--workload-file`), which must exist."""
        if self.source == "synthetic":
            raise UsageError(f"workload {self.name} is synthetic and reads no file; drop --workload-file")
        if not Path(path).is_file():
            raise UsageError(f"workload file {path} does not exist or is not a file")
        return dataclasses.replace(self, path=Path(path))


def shipped_dir() -> Path:
    """The shipped workloads: installed as package data in promoe_bench/_workloads, or, in a source
    checkout, the repository's top-level workloads/ folder."""
    installed = Path(__file__).resolve().parent / "_workloads"
    return installed if installed.is_dir() else REPO_WORKLOADS


def shipped_workloads() -> dict[str, Workload]:
    """Every shipped workload, by name, sorted."""
    loaded = [_load_file(path, shipped=True) for path in shipped_dir().glob("*.toml")]
    return {w.name: w for w in sorted(loaded, key=lambda w: w.name)}


def load_workload(name_or_path: str) -> Workload:
    """A shipped workload by name (`chat`), or a workload TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.name != name_or_path:  # a file name, or a path with a folder
        if not path.is_file():
            raise UsageError(f"workload file {name_or_path} does not exist")
        return _load_file(path, shipped=path.resolve().parent == shipped_dir().resolve())
    candidate = shipped_dir() / f"{name_or_path}.toml"
    if not candidate.is_file():
        names = ", ".join(sorted(p.stem for p in shipped_dir().glob("*.toml")))
        raise UsageError(f"unknown workload {name_or_path!r}; shipped workloads: {names}; or give a .toml file's path")
    return _load_file(candidate, shipped=True)


def _load_file(path: Path, shipped: bool) -> Workload:
    raw = read_fields(path, Workload)
    given = raw.get("path")
    if isinstance(given, str):
        raw["path"] = path.parent / given  # relative to the TOML file's folder
    try:
        workload = Workload(**raw)
    except _FieldError as e:
        raise UsageError(f"{path}: {e.detail}") from None
    # A shipped workload's data may come later (--workload-file); build_requests says so if it never does.
    if given is not None and not shipped and not workload.path.is_file():
        raise UsageError(f"{path}: field 'path' names {workload.path}, which does not exist or is not a file")
    return workload


def build_requests(workload: Workload, tokenize: Callable[[str], list[int]] | None,
                   vocab_size: int) -> list[list[int]]:
    """The requests' token ids, in order; the same lists for the same workload on every call.

    Text prompts are shuffled with the seed, tokenized in that order, dropped below min_prompt_tokens and
    truncated or dropped above max_prompt_tokens, until num_requests survive; if fewer survive, they are
    used again in the same order.
    """
    w = workload
    if w.source == "synthetic":
        rng = random.Random(w.seed)
        return [[rng.randrange(vocab_size) for _ in range(rng.randint(w.min_prompt_tokens, w.max_prompt_tokens))]
                for _ in range(w.num_requests)]
    if tokenize is None:
        raise UsageError(f"workload {w.name} needs a tokenizer, and the model has none; use a synthetic workload")
    texts = _read_texts(w)
    random.Random(w.seed).shuffle(texts)
    chosen = []
    for text in texts:
        ids = list(tokenize(text))
        if len(ids) < w.min_prompt_tokens or (len(ids) > w.max_prompt_tokens and w.overflow == "skip"):
            continue
        ids = ids[:w.max_prompt_tokens]
        if any(not 0 <= i < vocab_size for i in ids):
            raise UsageError(f"workload {w.name}: the tokenizer gave a token id outside the model's "
                             f"vocabulary of {vocab_size}; is it the model's own tokenizer?")
        chosen.append(ids)
        if len(chosen) == w.num_requests:
            break
    if not chosen:
        limits = (f"between {w.min_prompt_tokens} and {w.max_prompt_tokens} tokens (overflow 'skip')"
                  if w.overflow == "skip" else f"at least {w.min_prompt_tokens} tokens")
        raise UsageError(f"workload {w.name}: none of the {len(texts)} prompts in {w.path} has {limits}; "
                         f"change min_prompt_tokens/max_prompt_tokens")
    return [list(chosen[i % len(chosen)]) for i in range(w.num_requests)]


def _read_texts(w: Workload) -> list[str]:
    path = w.path
    if not path.is_file():
        raise UsageError(f"workload {w.name} needs {_FILE_KIND[w.source]} file: pass --workload-file PATH "
                         f"({path} does not exist)")
    try:
        records = _records(path, path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read as UTF-8 text: {e}") from None
    texts = [t for t in (_prompt_of(w, path, where, r) for where, r in records) if t and t.strip()]
    if not texts and w.categories is not None and records:
        present = ", ".join(sorted({str(r.get("category")) for _, r in records}))
        raise UsageError(f"{path}: no prompt in categories {', '.join(w.categories)} (field 'categories' of "
                         f"workload {w.name}); the file has: {present}")
    if not texts:
        raise UsageError(f"{path}: no usable prompt among its {len(records)} records; expected {_EXPECTED[w.source]}")
    return texts


def _records(path: Path, text: str) -> list[tuple[str, object]]:
    """(where, record) of a JSON list ("record 3", from 1) or a JSONL file ("line 3")."""
    if text.lstrip().startswith("["):
        try:
            return [(f"record {n}", r) for n, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: line {number} is not valid JSON: {e.msg}") from None
    return records


def _prompt_of(w: Workload, path: Path, where: str, record) -> str | None:
    """The record's prompt, or None when it has none (skipped); a malformed record is an error."""
    if w.source == "prompts":
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"{path}: {where}: expected an object with a 'text' string")
        return record["text"] if w.categories is None or record.get("category") in w.categories else None
    if w.source == "alpaca":
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise UsageError(f"{path}: {where}: expected an object with an 'instruction' string")
        extra = record.get("input")
        return record["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        raise UsageError(f"{path}: {where}: expected an object with a 'conversations' list")
    for turn in turns:  # the first human turn; ShareGPT writes from/value, OpenAI-style files role/content
        if isinstance(turn, dict) and turn.get("from", turn.get("role")) in HUMAN_ROLES:
            value = turn.get("value", turn.get("content"))
            return value if isinstance(value, str) else None
    return None
