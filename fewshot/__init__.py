"""fewshot: episodic meta-learning (MAML, Meta-LSTM) configured by Hydra, run by Lightning."""
