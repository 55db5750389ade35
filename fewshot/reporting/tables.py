"""Reports of many runs (a sweep's summary, an evaluation table, results beside the papers'): one
row model, its cells, and the tables written as Markdown (to read) and CSV (to load), each file
whole or not at all."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.evaluation.protocol import inner_loop_summary
from fewshot.experiments.runs import Run
from fewshot.files import atomic_path

Cells = Mapping[str, object]


@dataclass
class Row:
    """One run in a report: what its result.json records or what evaluate.py measured on it."""

    name: str = ""
    overrides: dict[str, str] = field(default_factory=dict)
    status: str = "incomplete"
    val_acc: float | None = None
    step: int | None = None
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # evaluate.py's, by episodes
    protocol: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def recorded(cls, run: Run, name: str) -> Row:
        """The outcome a run recorded in its folder (incomplete if it recorded none)."""
        result = run.read_result() or {}
        return cls(
            name,
            run.override_values(),
            result.get("status", "incomplete"),
            result.get("val/acc"),
            result.get("step"),
            error=result.get("error"),
        )

    @classmethod
    def evaluated(
        cls, name: str, overrides: dict[str, str], results: Sequence[dict[str, Any]]
    ) -> Row:
        """evaluate.py's results of one checkpoint; val/acc and step are the checkpoint's."""
        first = results[0]
        return cls(
            name,
            overrides,
            "evaluated",
            first.get("val/acc_best"),
            first.get("trained_steps"),
            {r["episodes"]: r for r in results},
            first["protocol"],
        )

    def rank(self) -> tuple[bool, float]:
        """Sort key: best val/acc first (runs are chosen on validation), rows without one last."""
        return self.val_acc is None, -(self.val_acc or 0.0)

    @property
    def val_acc_percent(self) -> str | None:
        return percent(self.val_acc)

    def test_acc(self, episodes: int) -> str | None:
        """Test accuracy ± its 95% CI on `episodes` episodes, in percent."""
        result = self.results.get(episodes)
        if result is None:
            return None
        return f"{100 * result['test/acc']:.2f} ± {100 * result['test/acc_ci95']:.2f}"

    @property
    def batch_norm(self) -> str | None:
        """The batch norm of meta-training and of the test, `train/test`."""
        p = self.protocol
        return f"{p.get('batch_norm_train')}/{p.get('batch_norm')}" if p else None

    @property
    def inner_loop(self) -> str | None:
        return inner_loop_summary(self.protocol) if self.protocol else None

    @property
    def checkpoint(self) -> str | None:
        return next(iter(self.results.values()), {}).get("checkpoint")


def percent(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}"


def override_keys(rows: Sequence[Row]) -> list[str]:
    """Every override key of the rows, in order of first use: the CSV's columns."""
    return list(dict.fromkeys(key for row in rows for key in row.overrides))


def override_columns(rows: Sequence[Row]) -> tuple[list[str], dict[str, str]]:
    """Split the rows' override keys into those that vary between rows (the Markdown table's
    columns, in order of first use) and those every row shares (key -> value)."""
    keys = override_keys(rows)
    if len(rows) < 2:
        return keys, {}
    first = rows[0].overrides
    common = {
        key: first[key]
        for key in keys
        if all(key in row.overrides and row.overrides[key] == first[key] for row in rows)
    }
    return [key for key in keys if key not in common], common


def common_overrides_line(common: Mapping[str, str], noun: str) -> str:
    """The preamble's line naming the overrides every row shares; "" if none."""
    if not common:
        return ""
    return f"Overrides of every {noun}: " + " ".join(f"`{k}={v}`" for k, v in common.items()) + "\n"


def markdown(columns: Sequence[str], rows: Sequence[Cells]) -> str:
    """A Markdown table; `None` cells print as empty, `|` inside a cell is escaped."""

    def cell(value: object) -> str:
        return "" if value is None else str(value).replace("|", r"\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(
    path: str | Path,
    md_columns: Sequence[str],
    md_rows: Sequence[Cells],
    csv_columns: Sequence[str],
    csv_rows: Sequence[Cells],
    preamble: str = "",
    epilogue: str = "",
) -> Path:
    """Write `path` (.md, `preamble`, the table, `epilogue`) and the same path with .csv; return
    the .md.

    Markdown shows rounded percentages for people; the CSV keeps every column at full
    precision for programs.
    """
    md_path = Path(path).with_suffix(".md")
    with atomic_path(md_path) as tmp:
        tmp.write_text(preamble + markdown(md_columns, md_rows) + epilogue)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(csv_columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(csv_rows)
    with atomic_path(md_path.with_suffix(".csv")) as tmp:
        tmp.write_text(text.getvalue())
    return md_path


SEED = "seed"  # the override that makes runs of one setting differ only by chance


@dataclass
class SeedGroup:
    """Runs of one setting that differ only by `seed`: the unit results are reported in, as the
    mean ± std over seeds (std with n - 1, the spread of one more seed's result)."""

    overrides: dict[str, str]  # every override but the seed
    rows: list[Row]

    @property
    def seeds(self) -> list[str]:
        return [row.overrides.get(SEED, "") for row in self.rows]

    def val_acc(self) -> tuple[float | None, float | None, int]:
        return mean_std([r.val_acc for r in self.rows if r.val_acc is not None])

    def test_acc(self, episodes: int) -> tuple[float | None, float | None, int]:
        results = (r.results.get(episodes) for r in self.rows)
        return mean_std([r["test/acc"] for r in results if r is not None])


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n); std is None for fewer than two values, both None for none."""
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
    return mean, std, n


def mean_std_percent(stats: tuple[float | None, float | None, int]) -> str | None:
    """`mean ± std (n=k)` in percent; `mean (n=1)` without a spread; None without values."""
    mean, std, n = stats
    if mean is None:
        return None
    spread = "" if std is None else f" ± {100 * std:.2f}"
    return f"{100 * mean:.2f}{spread} (n={n})"


def seed_groups(rows: Sequence[Row]) -> list[SeedGroup]:
    """The rows grouped by every override but `seed`, in order of first appearance; empty unless
    some rows differ by seed (a sweep without a seed axis has nothing to aggregate)."""
    if len({row.overrides.get(SEED) for row in rows}) < 2:
        return []
    groups: dict[tuple, SeedGroup] = {}
    for row in rows:
        setting = {k: v for k, v in row.overrides.items() if k != SEED}
        key = tuple(sorted(setting.items()))
        groups.setdefault(key, SeedGroup(setting, [])).rows.append(row)
    return list(groups.values())
