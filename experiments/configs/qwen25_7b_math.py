"""Math RLVR on accelerators in the paper's hyper-parameters: Qwen2.5-7B-Instruct (local directory), a
verl-schema dataset from local Parquet/JSONL, math-verify scoring, Pass@k Training (analytical, k=4).
Set --config.model.hf_path=... --config.task.options.train_files=... --config.task.options.test_files=..."""
from experiments.configs import qwen25_7b_maze

ARCHITECTURE = qwen25_7b_maze.ARCHITECTURE


def get_config():
    c = qwen25_7b_maze.get_config()
    c.task.name = "math"
    c.task.options = {"train_files": "", "test_files": ""}
    c.task.num_train = None
    c.rollout.max_new_tokens = 4096
    c.eval.num_prompts = 500
    c.eval.num_samples = 8            # the paper: 8 samples per question outside the maze task
    return c
