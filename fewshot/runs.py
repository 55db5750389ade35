"""The on-disk contract of a run: its folder, the config and overrides Hydra recorded there, the
outcome train.py records (result.json), its best and last checkpoints, evaluate.py's result files,
the job folders of a sweep, and the best score a checkpoint holds."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fewshot.data.files import write_json

HYDRA = ".hydra"  # Hydra's record of a job: config.yaml, hydra.yaml, overrides.yaml
RESULT = "result.json"  # {"status": "completed" | "failed", "val/acc", "step", "error", ...}
CHECKPOINTS = "checkpoints"
BEST = "best.ckpt"  # the best val/acc so far
LAST = "last.ckpt"  # the latest validation or the end of training: what a run resumes from
EVAL = "eval"  # evaluate.py's result files


@dataclass
class Run:
    """A run's folder and the files fewshot and Hydra keep in it."""

    dir: Path

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)  # a str from Hydra or the command line

    @classmethod
    def of_checkpoint(cls, ckpt: str | Path) -> Run:
        """The run a checkpoint at `<run>/checkpoints/<name>.ckpt` belongs to."""
        return cls(Path(ckpt).resolve().parent.parent)

    @property
    def config_dir(self) -> Path:
        return self.dir / HYDRA

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / BEST

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / LAST

    def name_in(self, folder: str | Path) -> str:
        """The run's name in a table of `folder`'s runs: its path relative to the folder."""
        return str(self.dir.relative_to(folder))

    def overrides(self) -> list[str] | None:
        """The command-line overrides the run was started with, as typed; None if not recorded."""
        path = self.config_dir / "overrides.yaml"
        if not path.is_file():
            return None
        return [str(item) for item in OmegaConf.load(path)]

    def override_values(self) -> dict[str, str]:
        """The recorded overrides as key -> value as typed (`""` for one without a value)."""
        pairs = (item.split("=", 1) for item in self.overrides() or [])
        return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}

    def read_result(self) -> dict[str, Any] | None:
        """The outcome the run recorded, or None if it has not recorded one."""
        try:
            return json.loads((self.dir / RESULT).read_text())
        except (OSError, ValueError):  # absent, or not ours: as if never recorded
            return None

    def write_result(self, result: dict[str, Any]) -> None:
        write_json(self.dir / RESULT, result)


def sweep_jobs(sweep_dir: str | Path) -> list[Run]:
    """The job folders of a sweep (those Hydra wrote `.hydra/overrides.yaml` in), by job number."""
    found = [p.parent.parent for p in Path(sweep_dir).glob(f"**/{HYDRA}/overrides.yaml")]
    ordered = sorted(
        (d for d in found if d != Path(sweep_dir)),
        key=lambda d: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(d))],
    )
    return [Run(d) for d in ordered]


def eval_result_path(ckpt: str | Path, episodes: int, seed: int, task: str = "") -> Path:
    """Where evaluate.py writes a checkpoint's result: `<run>/eval/<ckpt><task>_<n>ep_seed<seed>.json`
    (`task`: task_suffix's)."""
    name = f"{Path(ckpt).stem}{task}_{episodes}ep_seed{seed}.json"
    return Run.of_checkpoint(ckpt).dir / EVAL / name


def task_suffix(overrides: Mapping[str, Any], protocol: Mapping[str, Any]) -> str:
    """`_<way>w<shot>s<query>q` when way, shot or query are overridden, `_bn-<mode>` when the
    test-time batch norm is, else "": a result on another task or under another batch-norm mode
    gets its own file instead of replacing the run's result."""
    suffix = ""
    if any(overrides.get(key) is not None for key in ("way", "shot", "query")):
        suffix += f"_{protocol['way']}w{protocol['shot']}s{protocol['query']}q"
    if overrides.get("algo.batch_norm_test") is not None:
        suffix += f"_bn-{protocol['batch_norm']}"
    return suffix


def best_val_acc(checkpoint: dict[str, Any]) -> float | None:
    """The run's best val/acc when the checkpoint was written (the state of the ModelCheckpoint
    that monitors val/acc); None before the first validation."""
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("monitor") == "val/acc":
            score = state.get("best_model_score")
            return None if score is None else float(score)
    return None


def run_dir_of(ckpt_path: str | None, default: str) -> str:
    """The run that `<run>/checkpoints/last.ckpt` belongs to, so that resuming continues the
    run's own checkpoints and TensorBoard events; `default` for a fresh run, a checkpoint outside
    a run directory, or an earlier one (best.ckpt), which starts a new run rather than overwrite
    the later state of its own. Used as a resolver in hydra.run.dir."""
    if ckpt_path is None:
        return default
    path = Path(ckpt_path).expanduser().absolute()
    run = Run(path.parent.parent)
    return str(run.dir) if path == run.last_ckpt and run.config_dir.is_dir() else default


def config_subdir(run_dir: str) -> str | None:
    """Where Hydra records this job's config: `.hydra`, or `.hydra/resumed_<time>` when the run
    directory already has one, so that resuming keeps the original run's config and overrides;
    None (not recorded) in the other processes of a run that srun or torchrun started, which
    compose the same config at the same time. Used as a resolver in hydra.output_subdir."""
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) > 0:
        return None
    if not (Run(run_dir).config_dir / "config.yaml").is_file():
        return HYDRA
    return f"{HYDRA}/resumed_{datetime.now():%Y-%m-%d_%H-%M-%S}"
