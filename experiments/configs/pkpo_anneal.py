"""PKPO with k-annealing (Walder & Karkhanis 2025, who report that annealing k during training improves both
pass@1 and pass@k): a large k early (exploration), then k linearly down to 1 (pass@1). k = 8 for the first
quarter of the steps, 8 -> 1 over the middle half, 1 in the last quarter; each distinct k compiles the step
once (8 times here)."""
from experiments.configs import base


def get_config():
    c = base.get_config()
    steps = c.train.steps
    c.step.estimator = "pkpo"
    c.step.k = 8
    c.step.k_schedule = ((0, 8), (steps // 4, 8), (3 * steps // 4, 1))
    return c
