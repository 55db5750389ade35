"""The on-disk contract of a run: its folder, the config and overrides Hydra recorded there, the
outcome train.py records (result.json), its best and last checkpoints, evaluate.py's result files,
the job folders of a sweep, and the best score a checkpoint holds."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fewshot.cli import reported_as_one_line
from fewshot.errors import ConfigError
from fewshot.files import write_json

log = logging.getLogger(__name__)

HYDRA = ".hydra"  # Hydra's record of a job: config.yaml, hydra.yaml, overrides.yaml
RESULT = "result.json"  # {"status": "completed" | "failed", "val/acc", "step", "error", ...}
CHECKPOINTS = "checkpoints"
BEST = "best.ckpt"  # the best val/acc so far
LAST = "last.ckpt"  # the latest validation or the end of training: what a run resumes from
EVAL = "eval"  # evaluate.py's result files
TENSORBOARD = "tensorboard"  # the run's TensorBoard events (build.build_trainer's logger)
LOCK = ".lock"  # held (flock) by the process that trains in the folder; names it
EARLIER = "earlier"  # earlier/<time>/: an earlier attempt's files, set aside by a fresh start


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
        # As text: they legitimately hold `${now:...}`, and a run folder from elsewhere could
        # hold `${oc.env:...}`; neither is resolved.
        try:
            items = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return [str(item) for item in items] if isinstance(items, list) else None

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

    def record(self) -> Path | None:
        """The first sign that the folder holds a run: Hydra's record of its config, its
        checkpoints, its result or its TensorBoard events; None for a folder that holds none."""
        for path in (self.config_dir / "config.yaml", self.checkpoints, self.dir / RESULT):
            if path.exists():
                return path
        return next(iter(sorted((self.dir / TENSORBOARD).glob("**/events.out.tfevents.*"))), None)

    def set_aside(self) -> Path | None:
        """Move what an earlier attempt trained in the folder (its checkpoints, TensorBoard
        events, evaluation results, and the result it recorded) into `earlier/<time>/`, so that an
        attempt starting over overwrites and mixes none of it; return that folder, or None where
        there was nothing to move. Hydra's records (`.hydra/`) and the log stay: they are kept per
        attempt already."""
        trained = [self.dir / name for name in (CHECKPOINTS, TENSORBOARD, EVAL)]
        if not any(path.exists() for path in trained):
            return None
        aside = self.dir / EARLIER / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
        aside.mkdir(parents=True)
        for path in [*trained, self.dir / RESULT]:
            if path.exists():
                path.rename(aside / path.name)
        return aside


def sweep_jobs(sweep_dir: str | Path) -> list[Run]:
    """The job folders of a sweep (those Hydra wrote `.hydra/overrides.yaml` in), by job number."""
    found = [p.parent.parent for p in Path(sweep_dir).glob(f"**/{HYDRA}/overrides.yaml")]
    ordered = sorted(
        (d for d in found if d != Path(sweep_dir)),
        key=lambda d: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(d))],
    )
    return [Run(d) for d in ordered]


def eval_result_path(ckpt: str | Path, episodes: int, seed: int, task: str = "") -> Path:
    """Where evaluate.py writes a checkpoint's result (`task`: task_suffix's).

    A checkpoint in a run's `checkpoints/` folder: `<run>/eval/<stem><task>_<n>ep_seed<seed>.json`
    (`best_600ep_seed0.json`). Any other checkpoint: beside itself, by its whole file name
    (`<folder>/<file><task>_<n>ep_seed<seed>.json`), which no other file of that folder has;
    named by its stem in its parent's `eval/`, two `best.ckpt` of sibling folders would share it.
    """
    path = Path(ckpt).resolve()
    tail = f"{task}_{episodes}ep_seed{seed}.json"
    if path.parent.name == CHECKPOINTS:
        return Run.of_checkpoint(path).dir / EVAL / f"{path.stem}{tail}"
    return path.parent / f"{path.name}{tail}"


# evaluate.py's overrides that change the number a checkpoint scores: each is part of the name
# of an evaluation that differs from the run's own in it (the protocol entry it is recorded as,
# how it is written). The others say where or how the same evaluation runs and are left out:
# data.root (where the data is; the split's classes are those of the same release wherever it
# lies) and algo.compile (the same passes, compiled, which round as another device's would).
NAMED_OVERRIDES: dict[str, tuple[str, str]] = {
    "algo.inner_steps_test": ("inner_steps_test", "_steps-{}"),
    "algo.batch_norm_test": ("batch_norm", "_bn-{}"),
    "trainer.precision": ("precision", "_{}"),
}
_TASK_KEYS = ("way", "shot", "query")


def task_suffix(
    overrides: Mapping[str, Any],
    protocol: Mapping[str, Any],
    own: Mapping[str, Any] | None = None,
) -> str:
    """The part of an evaluation file's name that says how its test differs from the run's own:
    `_<way>w<shot>s<query>q` for another task, `_steps-<k>` for another algo.inner_steps_test,
    `_bn-<mode>` for another algo.batch_norm_test, `_<precision>` for another trainer.precision,
    in that order; "" for the run's own test. With the episodes and the seed in the rest of the
    name, two evaluations that can score differently never share a file.

    `overrides`: evaluate.py's (dotted key -> value; None: the run's own); `protocol`: the
    evaluation's values (as evaluation.protocol records them); `own`: the run's own values by
    dotted key, so that an override equal to it names nothing (without it, every override does).
    """
    own = own or {}
    changed = {
        key
        for key, value in overrides.items()
        if value is not None and (key not in own or value != own[key])
    }
    suffix = ""
    if changed & set(_TASK_KEYS):
        suffix += f"_{protocol['way']}w{protocol['shot']}s{protocol['query']}q"
    for key, (entry, form) in NAMED_OVERRIDES.items():
        if key in changed:
            suffix += form.format(protocol[entry])
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
    compose the same config at the same time. Used as a resolver in hydra.output_subdir.

    A run refused entry to a folder (entry_refusal) is refused before Hydra records anything, so
    the folder's own record is never overwritten and no `resumed_<time>` is left by it."""
    if process_rank() > 0:
        return None
    if not (Run(run_dir).config_dir / "config.yaml").is_file():
        return HYDRA
    return f"{HYDRA}/resumed_{datetime.now():%Y-%m-%d_%H-%M-%S}"


def process_rank() -> int:
    """This process's rank among the processes of one run that srun, torchrun or Lightning's
    `ddp` started: 0 for the first, or the only one."""
    return max(int(os.environ.get(name, 0)) for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def requeued() -> bool:
    """Whether SLURM requeued this job (preempted, or timed out and requeued by submitit): it
    continues its own run in its own folder."""
    return int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0


def continues(run_dir: str | Path, ckpt_path: str | Path | None) -> bool:
    """Whether resuming from `ckpt_path` continues the run in `run_dir`, from its own last.ckpt."""
    if ckpt_path is None:
        return False
    return Path(ckpt_path).expanduser().resolve() == Run(run_dir).last_ckpt.resolve()


def entry_refusal(run_dir: str | Path, ckpt_path: str | Path | None) -> str | None:
    """Why a run started now may not write into `run_dir`, or None where it may.

    A folder that holds a run (Run.record) is entered only to continue that run: resuming from
    its own last.ckpt (`ckpt_path=<run>/checkpoints/last.ckpt`, which also picks the folder),
    SLURM requeueing the job, or as a process of the run other than the first (srun's tasks,
    torchrun's and Lightning's `ddp` processes share the folder of the first, which checked it).
    A new run, or one resumed from another checkpoint (the run's best.ckpt, another run's), would
    overwrite the run's checkpoints and result and mix its TensorBoard events. A sweep's job
    folders are entered under sweep.recorded_job's rules instead: a job finished with the same
    config is reused, any other starts over once its earlier files are set aside (Run.set_aside).
    """
    if process_rank() > 0 or requeued() or continues(run_dir, ckpt_path):
        return None
    run = Run(run_dir)
    record = run.record()
    if record is None:
        return None
    if run.last_ckpt.is_file():
        way_in = f"resume it with ckpt_path={run.last_ckpt}, or choose another hydra.run.dir"
    else:
        way_in = "it has no last.ckpt to resume from: choose another hydra.run.dir"
    return (
        f"hydra.run.dir={run_dir} already holds a run ({record}): a new run there would "
        f"overwrite its checkpoints and result and mix its TensorBoard events; {way_in}"
    )


_LOCKS: dict[str, IO[str]] = {}  # run folder -> the lock file this process holds in it


def lock_run(run_dir: str | Path) -> None:
    """Hold the run folder's lock (its `.lock` file) until unlock_run or the end of this
    process; raise ConfigError naming the process that holds it already.

    flock, not a marker file: the kernel releases the lock of a process that dies, so a crashed
    run never keeps its folder from being resumed. A file rather than the folder itself: on NFS,
    flock becomes a byte-range lock, which needs a file open for writing.
    """
    folder = os.path.abspath(run_dir)
    if folder in _LOCKS:  # taken by RunFolderGuard before Hydra wrote into the folder
        return
    try:
        handle = open(os.path.join(folder, LOCK), "a+")  # noqa: SIM115 (held past this call)
    except OSError as err:
        raise ConfigError(f"hydra.run.dir={folder} cannot be written ({err.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(
            f"{folder} is in use: a run is training in it ({holder}); wait for it to end "
            "(then resume it with ckpt_path=<run>/checkpoints/last.ckpt), or choose another "
            "hydra.run.dir"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _LOCKS[folder] = handle


def unlock_run(run_dir: str | Path) -> None:
    handle = _LOCKS.pop(os.path.abspath(run_dir), None)
    if handle is not None:
        handle.close()  # releases the lock


@contextmanager
def locked_run(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock for the block (lock_run): in the first process of the run
    only, which the others share the folder with."""
    if process_rank() > 0:
        yield
        return
    lock_run(run_dir)
    try:
        yield
    finally:
        unlock_run(run_dir)


def made_folder(folder: str | Path, key: str) -> Path:
    """`folder`, created if absent; ConfigError in one line naming `key` where it cannot be: it
    is a file, lies under one, or its parent is not writable."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{key}={folder} is a file, not a folder: choose another {key}") from None
    except NotADirectoryError:
        file = next((p for p in folder.parents if p.exists()), folder.parent)
        raise ConfigError(
            f"{key}={folder} lies under a file ({file}), not a folder: choose another {key}"
        ) from None
    except OSError as err:
        raise ConfigError(f"{key}={folder} cannot be created ({err.strerror})") from None
    return folder


class RunFolderGuard(Callback):
    """Hydra callback (conf/train.yaml): before Hydra writes anything into a run's folder,
    refuse in one line a folder that cannot be one (made_folder) and a run that may not enter it
    (entry_refusal), and take the folder's lock (lock_run), which train.py holds while it trains.
    A sweep's job folders are checked by the job itself (train.py, sweep.recorded_job)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The folder run_job creates next: Hydra resolves `${now:...}` once per config.
        run_dir = config.hydra.run.dir
        with reported_as_one_line():
            made_folder(run_dir, "hydra.run.dir")
            if process_rank() > 0:
                return
            refusal = entry_refusal(run_dir, config.get("ckpt_path"))
            if refusal is not None:
                raise ConfigError(refusal)
            lock_run(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with reported_as_one_line():
            made_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
