"""``qwen25_32b_maze`` with LoRA on one 8 x H100 node: rank-16 adapters (alpha 32) on every projection of a
frozen bf16 Qwen2.5-32B-Instruct, learning rate 1e-5 (LoRA takes a larger step than full fine-tuning's 1e-6),
micro-batches of 4 rows per GPU, and a decode mesh tensor-parallel over the 8 GPUs with 128 slots. By
``python -m experiments.plan --config=qwen25_32b_maze_lora --topology=8xH100`` the train step and the decode
fit with the decode's collectives at about 4% of its weight bytes per step (bench/RESULTS.md)."""
from experiments.configs import qwen25_32b_maze

ARCHITECTURE = "qwen2.5-32b"


def get_config():
    c = qwen25_32b_maze.get_config()
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.model.param_dtype = "bfloat16"
    c.step.learning_rate = 1e-5
    c.step.num_microbatches = 32
    c.rollout.decode_slots = 128
    return c
