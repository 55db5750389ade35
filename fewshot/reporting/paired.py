"""Results scored on the same fixed test episodes, compared episode by episode: the mean paired
difference with its 95% CI, and the episodes each won.

Episode i is a function of the dataset, split, test classes, way, shot, query, episode seed and i
alone (evaluation.protocol.test_episodes), so two results that record the same of these were
scored on the same tasks, whatever their methods, checkpoints or batch-norm modes. The per-episode
differences then leave out how hard each episode is, which both unpaired intervals carry: a
difference the unpaired intervals cannot tell from chance may be clear when paired."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fewshot.evaluation.protocol import PER_EPISODE, TEST_EPISODES, mean_ci95

Result = Mapping[str, Any]

# What identifies the episodes (the keys of a result's TEST_EPISODES), as a refusal names them.
FIELDS = {
    "dataset": "the dataset differs",
    "split": "the split differs",
    "classes_sha256": "the test classes differ (SHA-256 of their names)",
    "way": "way differs",
    "shot": "shot differs",
    "query": "query differs",
    "seed": "the episode seed differs",
    "ids": "the episode ids differ",
}

NO_PER_EPISODE = "no per-episode accuracies (written before evaluate.py kept them)"


@dataclass(frozen=True)
class PairedDifference:
    """A's accuracy minus B's on the same episodes: the mean ± its 95% CI, and who won each."""

    mean: float
    ci95: float
    won: int  # episodes A scored higher on
    lost: int  # episodes B scored higher on
    tied: int

    @property
    def episodes(self) -> int:
        return self.won + self.lost + self.tied

    def percent(self) -> str:
        """The mean difference ± its CI in percentage points, signed: `+1.20 ± 0.80`."""
        return f"{100 * self.mean:+.2f} ± {100 * self.ci95:.2f}"

    def counts(self) -> str:
        """`won/lost/tied`, A's view."""
        return f"{self.won}/{self.lost}/{self.tied}"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """A − B from the accuracies [n] of the same episodes in the same order: the mean of the
    per-episode differences ± 1.96·sd/√n (sd with n − 1, as mean_ci95 gives accuracies), and
    the episodes A scored higher on, lower on, and the same."""
    if len(a) != len(b):
        raise ValueError(f"paired accuracies need the same episodes: {len(a)} vs {len(b)}")
    differences = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    mean, ci95 = mean_ci95(differences)
    won, lost = int((differences > 0).sum()), int((differences < 0).sum())
    return PairedDifference(mean, ci95, won, lost, len(differences) - won - lost)


def has_per_episode(result: Result | None) -> bool:
    """Whether `result` keeps the accuracy of each episode and what identifies the episodes."""
    return result is not None and PER_EPISODE in result and TEST_EPISODES in result


def why_not_paired(result: Result, reference: Result) -> str | None:
    """Why `result` cannot be paired with `reference`, in one line naming the first field of
    the episodes that differs; None where both were scored on the same episodes."""
    if not has_per_episode(result):
        return NO_PER_EPISODE
    if not has_per_episode(reference):
        return f"the reference has {NO_PER_EPISODE}"
    mine, theirs = result[TEST_EPISODES], reference[TEST_EPISODES]
    for key, differs in FIELDS.items():
        if mine.get(key) != theirs.get(key):
            here, there = _shown(key, mine.get(key)), _shown(key, theirs.get(key))
            return f"{differs}: {here} here, {there} in the reference"
    for who, r in (("its", result), ("the reference's", reference)):
        stored, ids = len(r[PER_EPISODE]), _count(r[TEST_EPISODES].get("ids"))
        if stored != ids or stored < 2:
            return f"{who} file holds {stored} per-episode accuracies for {ids} episode ids"
    return None


def compared(result: Result, reference: Result) -> PairedDifference | str:
    """`result` − `reference` on their episodes, or why they cannot be paired."""
    reason = why_not_paired(result, reference)
    if reason is not None:
        return reason
    return paired_difference(result[PER_EPISODE], reference[PER_EPISODE])


def reference_index(results: Sequence[Result | None]) -> int | None:
    """The reference each other result is paired with: the first that keeps per-episode
    accuracies (None where none does)."""
    return next((i for i, r in enumerate(results) if has_per_episode(r)), None)


def _count(ids: Any) -> int | None:
    try:
        return ids["stop"] - ids["start"]
    except (TypeError, KeyError):
        return None


def _shown(key: str, value: Any) -> str:
    """A field's value in a refusal: episode ids as `0..599`."""
    if key == "ids" and _count(value) is not None:
        return f"{value['start']}..{value['stop'] - 1}"
    return str(value)


def paired_line(noun: str, reference: str | None, chosen: str) -> str:
    """The line above a table that pairs each `noun` with the `reference` (`chosen`: how it
    was chosen), saying what the paired columns hold."""
    if reference is None:
        return f"No {noun} keeps per-episode accuracies: none is paired.\n"
    return (
        f"Paired with the reference, {noun} `{reference}` ({chosen}), on the same episodes: "
        f"Δ = {noun} − reference, the mean over episodes ± 95% CI (1.96·sd/√n of the "
        f"per-episode differences); won/lost/tied: the episodes the {noun} scored higher on, "
        "lower on, the same. Only results of the same dataset, split, test classes, way, "
        "shot, query, episode seed and episode ids are paired.\n"
    )
