"""Exceeding Pass@k (Eq. 17): the analytical Pass@k advantage scaled by f(N_pos)."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "exceed"
    return c
