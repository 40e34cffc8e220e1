"""Pass@1 (GRPO) baseline on the CPU default setting (population std, token-mean clip-higher loss)."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    c.step.estimator = "grpo"
    c.step.k = 1
    return c
