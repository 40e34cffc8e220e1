"""PKPO (Walder & Karkhanis 2025): unbiased pass@k gradient weights with the sloo_minus_one baseline."""
from ml_collections import ConfigDict

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "pkpo"
    c.step.estimator_options = ConfigDict({"baseline": "sloo_minus_one"})
    return c
