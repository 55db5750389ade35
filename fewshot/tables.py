"""Tables of runs, written as Markdown (to read) and CSV (to load), each file whole or not at all."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from fewshot.data.files import atomic_path

Row = dict[str, object]


def override_columns(overrides: Sequence[dict[str, str]]) -> tuple[list[str], dict[str, str]]:
    """Split the keys of several jobs' overrides into those that vary between jobs (the
    table's columns, in order of first use) and those every job shares (key -> value)."""
    keys = list(dict.fromkeys(key for job in overrides for key in job))
    if len(overrides) < 2:
        return keys, {}
    common = {
        key: overrides[0][key]
        for key in keys
        if all(key in job and job[key] == overrides[0][key] for job in overrides)
    }
    return [key for key in keys if key not in common], common


def markdown(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """A Markdown table; `None` cells print as empty, `|` inside a cell is escaped."""

    def cell(value: object) -> str:
        return "" if value is None else str(value).replace("|", r"\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(
    path: str | Path,
    md_columns: Sequence[str],
    md_rows: Sequence[Row],
    csv_columns: Sequence[str],
    csv_rows: Sequence[Row],
    preamble: str = "",
) -> tuple[Path, Path]:
    """Write `path` (.md, `preamble` then the table) and the same path with .csv; return both.

    Markdown shows rounded percentages for people; the CSV keeps every column at full
    precision for programs.
    """
    md_path = Path(path).with_suffix(".md")
    csv_path = md_path.with_suffix(".csv")
    with atomic_path(md_path) as tmp:
        tmp.write_text(preamble + markdown(md_columns, md_rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(csv_columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(csv_rows)
    with atomic_path(csv_path) as tmp:
        tmp.write_text(text.getvalue())
    return md_path, csv_path
