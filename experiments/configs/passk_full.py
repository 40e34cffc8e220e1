"""Pass@k Training with full sampling (Alg. 1): disjoint groups of k, leftovers get 0."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "passk_full"
    return c
