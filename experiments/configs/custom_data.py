"""Your own verl-schema dataset and (optionally) your own verifier, with the paper's accelerator settings:
--config.model.hf_path=DIR --config.task.options.train_files=train.parquet
--config.task.options.test_files=test.parquet [--config.task.options.score_fn=my_pkg.rewards:compute_score]
Without score_fn, rows are scored by data_source prefix (maze, countdown, otherwise math-verify). A score_fn
whose rewards are not in [0, 1] declares its range: --config.task.options.reward_range="(-1.0, 1.0)"."""
from experiments.configs import qwen25_7b_math


def get_config():
    c = qwen25_7b_math.get_config()
    c.task.name = "verl"
    c.task.options = {"train_files": "", "test_files": "", "score_fn": "", "reward_range": (0.0, 1.0)}
    return c
