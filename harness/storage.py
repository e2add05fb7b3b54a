"""Run directories: results.jsonl (one record a line, fsynced), environment.json, reports/latest."""

from __future__ import annotations

import json
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.environment import Environment
from harness.records import Record

if TYPE_CHECKING:
    import pandas as pd

RESULTS_FILE = "results.jsonl"
ENVIRONMENT_FILE = "environment.json"
LATEST = "latest"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


class RunWriter:
    """Creates a run dir and appends records durably, one combination at a time."""

    def __init__(self, reports_dir: Path, env: Environment, run_id: str | None = None) -> None:
        reports_dir.mkdir(parents=True, exist_ok=True)
        run_id = run_id or new_run_id()
        path, suffix = reports_dir / run_id, 2
        while run_id is not None and path.exists() and (path / RESULTS_FILE).exists():
            path, suffix = reports_dir / f"{run_id}-{suffix}", suffix + 1
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.run_id = path.name
        self.env = env
        env_data = env.to_dict() | {"run_id": self.run_id, "started_at": utc_now()}
        (path / ENVIRONMENT_FILE).write_text(json.dumps(env_data, indent=2) + "\n")
        self._point_latest(reports_dir)

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    def logs_dir(self) -> Path:
        logs = self.path / "logs"
        logs.mkdir(exist_ok=True)
        return logs

    def _point_latest(self, reports_dir: Path) -> None:
        link = reports_dir / LATEST
        tmp = reports_dir / f".{LATEST}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(self.run_id, tmp)
        os.replace(tmp, link)

    def append(self, record: Record) -> None:
        """Stamp the record with this run and write it to disk before returning."""
        record.run_id = self.run_id
        record.env_id = self.env.env_id
        record.hardware_id = self.env.hardware_id
        record.finished_at = record.finished_at or utc_now()
        line = json.dumps(record.to_dict(), allow_nan=True)
        with open(self.results_path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def results_file(path: Path | str) -> Path:
    """Accept a run dir, a results.jsonl, or reports/latest."""
    path = Path(path)
    return path / RESULTS_FILE if path.is_dir() else path


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """Records of one run; a damaged line is skipped with a warning naming file and line."""
    file = results_file(path)
    if not file.exists():
        warnings.warn(f"{file}: no such results file (is the run dir right?)", stacklevel=2)
        return []
    records = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                warnings.warn(f"{file}:{number}: skipped a damaged line ({exc.msg})", stacklevel=2)
                continue
            if not isinstance(data, dict) or not {"model", "precision", "status"} <= data.keys():
                warnings.warn(f"{file}:{number}: skipped a line that is not a record", stacklevel=2)
                continue
            records.append(Record.from_dict(data).to_dict())
    return records


def read_environment(path: Path | str) -> dict[str, Any]:
    file = results_file(path).parent / ENVIRONMENT_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        warnings.warn(f"{file}: unreadable environment ({exc})", stacklevel=2)
        return {}


def load_results(path: Path | str) -> pd.DataFrame:
    """A run's records as a pandas DataFrame, one row per combination, all schema columns."""
    import pandas as pd

    return pd.DataFrame(read_records(path), columns=Record.field_names())
