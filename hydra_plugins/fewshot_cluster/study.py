"""Optuna's sweeper with a study that outlives the command: stored where `storage` says (the
sweep folder's optuna.db in conf/sweep/optuna_lr.yaml), re-running the same command continues
it toward `n_trials`, numbering trials on, and never re-runs a finished trial."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # without the `sweep` extra, sweep=optuna_lr names the install command
    OptunaSweeper = None


def sqlite_folder(storage: str | None) -> Path | None:
    """The folder of a `sqlite:///<path>` storage (SQLite creates the file, not its folder)."""
    prefix = "sqlite:///"
    if storage is None or not str(storage).startswith(prefix):
        return None
    return Path(str(storage)[len(prefix) :]).parent


if OptunaSweeper is not None:
    import optuna

    class _ContinuedStudy(OptunaSweeperImpl):
        def sweep(self, arguments: list[str]) -> None:
            folder = sqlite_folder(self.storage)
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                directions=self._get_directions(),
                load_if_exists=True,
            )
            trials = study.get_trials(deepcopy=False)
            done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
            finished = sum(t.state in done for t in trials)
            for trial in trials:  # asked by a sweep that was stopped before it could tell
                if not trial.state.is_finished():
                    study._storage.set_trial_state(trial._trial_id, optuna.trial.TrialState.FAIL)
            if trials:
                log.info(
                    "study %s continues: %d of %d trials finished, %d to go",
                    self.study_name,
                    finished,
                    self.n_trials,
                    max(0, self.n_trials - finished),
                )
                # A seeded sampler would otherwise draw its first trials' parameters again.
                self.sampler.reseed_rng()
            self.n_trials = max(0, self.n_trials - finished)
            # Job folders are numbered as trials are: trial k's job is <sweep>/k in every run.
            self._first_job = len(trials)
            super().sweep(arguments)

        def _process_searchspace_config(self) -> None:
            super()._process_searchspace_config()
            self.job_idx = self._first_job  # super().sweep starts numbering here

    class ContinuedStudySweeper(OptunaSweeper):
        """hydra/sweeper=optuna whose study continues where a stopped or finished run left it."""

        def __init__(self, **settings: Any) -> None:
            self.sweeper = _ContinuedStudy(**settings)
