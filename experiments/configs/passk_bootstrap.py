"""Pass@k Training with bootstrap sampling (Alg. 2): N_group = N_rollout groups, the paper's sum (Eq. 6)."""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "passk_bootstrap"
    c.step.estimator_options = ConfigDict({"reduce": "sum"})
    return c
