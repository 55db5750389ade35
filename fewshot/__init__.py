"""fewshot: few-shot meta-learning (the MAML family, Meta-LSTM) configured by Hydra, run by Lightning."""
