"""RS-GRPO, risk-seeking (arXiv 2509.24261): A = (1/beta)(exp(beta R) / mean exp(beta R) - 1), beta = 2
(override with --config.step.estimator_options.beta=...), on the CPU default setting."""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "rs_grpo"
    c.step.k = 1
    c.step.estimator_options = ConfigDict({"beta": 2.0})
    return c
