"""The CPU default: tiny character-level model on mazes, SFT warm start, Pass@k Training (analytical, k=4)
with the paper's clip-higher token-mean loss."""
from experiments.configs import base


def get_config():
    return base.get_config()
