"""Entropy-adaptive: the half of the prompts with the highest mean token entropy use Pass@1, the rest Pass@k.
The per-prompt entropy is computed in-graph by the train step (recomputed old-policy forward)."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "entropy_adaptive"
    c.step.old_logprobs = "recompute"
    return c
