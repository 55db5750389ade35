"""fewshot's Hydra plugins (Hydra loads plugins only from the hydra_plugins namespace): the
launchers of conf/hydra/launcher/ and the Optuna sweeper whose study continues after a restart."""

from hydra_plugins.fewshot_cluster.launchers import ParallelLauncher, SlurmLauncher
from hydra_plugins.fewshot_cluster.study import ContinuedStudySweeper

__all__ = ["ContinuedStudySweeper", "ParallelLauncher", "SlurmLauncher"]
