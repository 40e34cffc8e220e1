"""Sequential transfer (paper Section 3): Pass@k Training (analytical, k=4), then Pass@1 training, in one run."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    half = c.train.steps // 2
    c.train.stages = (
        {"steps": half, "step": {"estimator": "passk_analytic", "k": 4}},
        {"steps": c.train.steps - half, "step": {"estimator": "grpo", "k": 1}},
    )
    return c
