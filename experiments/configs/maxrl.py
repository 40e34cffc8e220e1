"""MaxRL (arXiv 2602.02710): A = (R - mean R) / mean R per prompt, on the CPU default setting."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "maxrl"
    c.step.k = 1
    return c
