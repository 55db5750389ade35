"""fewshot's Hydra plugins (Hydra loads plugins only from the hydra_plugins namespace): the
launchers of conf/hydra/launcher/ (launchers.py) and the Optuna sweeper whose study continues
after a restart (study.py). Each is defined only where the plugin it builds on is installed."""
