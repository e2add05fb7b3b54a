"""Run directories: results.jsonl (one record a line, fsynced), environment.json, reports/latest."""

from __future__ import annotations

import json
import os
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.environment import Environment
from harness.errors import UsageError
from harness.records import Record

if TYPE_CHECKING:
    import pandas as pd

RESULTS_FILE = "results.jsonl"
ENVIRONMENT_FILE = "environment.json"
COMMAND_FILE = "command.json"  # the `harness run` arguments, so --resume can repeat them
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

    @classmethod
    def reopen(cls, path: Path, env: Environment) -> RunWriter:
        """Continue an existing run dir (`harness run --resume`): a half-written last line is cut
        off with a warning, so new records start on a line of their own."""
        path = Path(path)
        if not (path / ENVIRONMENT_FILE).is_file():
            raise UsageError(f"--resume {path}: not a run dir (no {ENVIRONMENT_FILE}); give the dir a run wrote")
        writer = cls.__new__(cls)
        writer.path, writer.run_id, writer.env = path, path.name, env
        if writer.results_path.exists():
            repair_results(writer.results_path)
        env_file = path / ENVIRONMENT_FILE
        data = json.loads(env_file.read_text())
        if data.get("env_id") not in (None, env.env_id):
            warnings.warn(
                f"{env_file}: resumed in another environment ({env.env_id}, started in {data['env_id']}); "
                "each record keeps the env_id it ran in",
                stacklevel=2,
            )
        data["resumed_at"] = [*data.get("resumed_at", []), utc_now()]
        env_file.write_text(json.dumps(data, indent=2) + "\n")
        writer._point_latest(path.parent)
        return writer

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


def repair_results(file: Path) -> None:
    """Cut a half-written last line (a writer killed mid-line) off `file`, with a warning."""
    data = file.read_bytes()
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    if not tail.strip():
        return
    try:
        complete = isinstance(json.loads(tail), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        complete = False
    with open(file, "r+b") as handle:
        if complete:  # the record is whole, only its newline is missing
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
        else:
            handle.truncate(cut)
            number = data.count(b"\n") + 1
            warnings.warn(f"{file}:{number}: ignored a half-written last line ({len(tail)} bytes)", stacklevel=2)
        handle.flush()
        os.fsync(handle.fileno())


def combo_key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    """(model, framework, precision, device): what identifies a combination within one run."""
    return record["model"], record["framework"], record["precision"], record["device"]


def write_command(run_dir: Path, argv: list[str]) -> None:
    """Keep the `harness run` arguments beside the results (what --resume repeats)."""
    (run_dir / COMMAND_FILE).write_text(json.dumps({"argv": argv}, indent=2) + "\n")


def read_command(run_dir: Path) -> list[str] | None:
    file = Path(run_dir) / COMMAND_FILE
    if not file.is_file():
        return None
    return [str(a) for a in json.loads(file.read_text())["argv"]]


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run dirs named by `paths`: a run dir or results file stays as it is; a folder that holds
    run dirs (a night of CI artifacts, a history) expands to every run dir below it, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir() or (path / RESULTS_FILE).exists():
            found.append(path)
            continue
        below: dict[Path, Path] = {}
        for file in sorted(path.rglob(RESULTS_FILE)):  # a `latest` link finds a run twice: keep one
            below.setdefault(file.parent.resolve(), file.parent)
        found.extend(sorted(below.values()) or [path])
    return list(dict.fromkeys(found))


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
    records, names = [], Record.field_names()
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
            record = Record.from_dict(data)  # every schema field, defaults where missing
            records.append({name: getattr(record, name) for name in names})  # shallow: asdict's deep copy is slow
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
