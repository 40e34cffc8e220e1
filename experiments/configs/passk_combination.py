"""Combination of Pass@k and Pass@1 advantages weighted by accuracy (Eq. 18)."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "combination"
    return c
