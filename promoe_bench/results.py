"""The run folder: run.json plus CSV tables, written so that nothing is ever half-written.

A run is assembled in a hidden sibling folder; each file lands there by atomic rename, and the folder
replaces `out` by rename when the run ends. An interrupted or failed run still lands, with run.json
saying `"status": "incomplete"` and why, and holding the strategies that finished.

Files: run.json (schema_version, status, config, environment, model, strategies), requests.csv,
steps.csv, layers.csv, phases.csv (hardware counters per phase), samples.csv (the counters' samples),
statistics.csv (spread and confidence over repeats), summary.csv, and timeline/<n>.csv.gz: the
timeline (promoe_bench/timeline.py) of the n-th strategy run, one gzipped file each, written once when
that strategy finishes (the timeline is by far the largest table: rewriting it whole after every
strategy would cost more than the run).
"""

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from . import timeline
from .errors import UsageError

SCHEMA_VERSION = 2  # 2: timeline/, phases.csv, samples.csv, statistics.csv
TABLES = ("requests", "steps", "layers", "phases", "samples", "statistics", "summary")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_gzip_csv(path: Path, frame: pd.DataFrame) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False, compression={"method": "gzip", "compresslevel": 1, "mtime": 0})
    os.replace(tmp, path)


class RunWriter:
    def __init__(self, out: Path, overwrite: bool):
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise UsageError(
                f"--out {out} already holds files (a previous run?); pass --overwrite or pick another folder")
        self.out = out
        self.staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def table(self, name: str, frame: pd.DataFrame) -> None:
        assert name in TABLES, name
        _atomic_write(self.staging / f"{name}.csv", frame.to_csv(index=False))

    def timeline(self, index: int, frame: pd.DataFrame) -> None:
        folder = self.staging / "timeline"
        folder.mkdir(exist_ok=True)
        _atomic_gzip_csv(folder / f"{index}.csv.gz", frame)

    def metadata(self, run: dict) -> None:
        _atomic_write(self.staging / "run.json", json.dumps({"schema_version": SCHEMA_VERSION, **run}, indent=2))

    def publish(self) -> Path:
        """Move the staged run into place, replacing what --overwrite allowed to be replaced."""
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return self.out


def load_run(folder: Path) -> tuple[dict, dict[str, pd.DataFrame]]:
    """run.json and the tables of a run folder, with a clear error for anything that is not one."""
    folder = Path(folder)
    meta_path = folder / "run.json"
    if not meta_path.is_file():
        raise UsageError(f"{folder} is not a promoe-bench run folder (no run.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{meta_path} is not valid JSON: {error}") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(
            f"{folder} has schema version {meta.get('schema_version')}; this promoe-bench reads {SCHEMA_VERSION}")
    tables = {}
    for name in TABLES:
        path = folder / f"{name}.csv"
        if path.is_file():
            tables[name] = _read_csv(path)
    return meta, tables


def load_timeline(folder: Path) -> pd.DataFrame:
    """Every timed event of a run folder, its strategies in run order."""
    shards = sorted((Path(folder) / "timeline").glob("*.csv.gz"), key=lambda p: int(p.name.split(".")[0]))
    if not shards:
        raise UsageError(f"{folder} has no timeline (made by promoe-bench run since schema version 2)")
    return timeline.typed(pd.concat([_read_csv(shard) for shard in shards], ignore_index=True))


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, low_memory=False)  # one type per column, not per chunk of rows read
    except (ValueError, OSError, EOFError) as error:  # pandas' parser errors are ValueErrors
        raise UsageError(f"{path} is not a readable table: {error}") from None
