"""The paper's maze setting with its second main model, Qwen2.5-32B-Instruct, trained in full on 16 x H100
(two 8-GPU nodes): ``qwen25_7b_maze``'s hyper-parameters, training FSDP over all 16 GPUs, and a decode mesh of
its own (``rollout.decode_mesh="-1,1,8"``): the sampler's bf16 copy is tensor-parallel over the 8 GPUs of a
node and data-parallel across the nodes, so no decode step gathers a weight across nodes; 256 decode slots.
By ``python -m experiments.plan --config=qwen25_32b_maze --topology=16xH100`` the train step and the decode fit
(bench/RESULTS.md). Set the checkpoint with --config.model.hf_path=/path/to/Qwen2.5-32B-Instruct."""
from experiments.configs import qwen25_7b_maze

ARCHITECTURE = "qwen2.5-32b"  # what experiments.plan plans without the checkpoint


def get_config():
    c = qwen25_7b_maze.get_config()
    c.rollout.decode_mesh = "-1,1,8"
    c.rollout.decode_slots = 256
    return c
