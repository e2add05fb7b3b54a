"""Compatibility across software stacks: a row per combination, a column per stack × hardware.

A stack is a run's $HARNESS_STACK name (the nightly tox envs set it), else its library versions
(harness.report.frame.stack_name). Runs of different stacks on the same hardware never merge.
"""

from __future__ import annotations

import pandas as pd

from harness.report.formats import Block, Bullets, Heading, Text
from harness.report.tables import Table, cell

COMBO = ["model", "framework", "precision", "device"]
NOT_RUN = "-"


def outcome(row: pd.Series) -> str:
    """ok, failed (kind) or skipped (the reason is in the per-hardware compatibility matrix)."""
    return "skipped" if row["status"] == "skipped" else cell(row)


def platforms(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(stack, hardware_id, column name) per stack × hardware, sorted by stack then hardware."""
    pairs = frame.drop_duplicates(["stack", "hardware_id"]).sort_values(["stack", "hardware_label", "hardware_id"])
    ambiguous = pairs.groupby(["stack", "hardware_label"])["hardware_id"].transform("nunique") > 1
    names = []
    for (_, row), twin in zip(pairs.iterrows(), ambiguous, strict=True):
        hardware = f"{row['hardware_label']} [{row['hardware_id']}]" if twin else str(row["hardware_label"])
        names.append((str(row["stack"]), str(row["hardware_id"]), f"{row['stack']} @ {hardware}"))
    return names


def stacks_matrix(frame: pd.DataFrame) -> Table:
    """Rows: combinations (sorted as the report sorts precisions); columns: stack @ hardware."""
    columns = platforms(frame)
    cells = {(*map(str, r[COMBO]), str(r["stack"]), str(r["hardware_id"])): outcome(r) for _, r in frame.iterrows()}
    combos = frame.sort_values(["model", "framework", "device", "precision_rank", "precision"]).drop_duplicates(COMBO)
    rows = []
    for _, combo in combos.iterrows():
        key = tuple(str(combo[c]) for c in COMBO)
        rows.append([*key, *(cells.get((*key, stack, hw), NOT_RUN) for stack, hw, _ in columns)])
    return Table("", [*COMBO, *(name for _, _, name in columns)], rows)


def stacks_section(frame: pd.DataFrame) -> list[Block]:
    """The matrix across stacks, with what each stack pins; empty when the runs hold one stack."""
    if frame["stack"].nunique() < 2:
        return []
    pins = frame.drop_duplicates("stack").sort_values("stack")
    return [
        Heading("Compatibility across stacks"),
        Text(f"Cells: ok, failed (kind), skipped, or {NOT_RUN} where that stack and hardware did not run it."),
        Bullets([f"{r['stack']}: {r['stack_versions'] or 'versions unknown'}" for _, r in pins.iterrows()]),
        stacks_matrix(frame),
    ]
