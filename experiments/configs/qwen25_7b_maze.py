"""The paper's maze setting for accelerators: Qwen2.5-7B-Instruct from a local Hugging Face directory,
Pass@k Training (analytical, k=4), lr 1e-6 with 10 warm-up steps, 128 prompts per step in 4 mini-batches of
32, N_rollout = 32, clip 0.2 / 0.28, token-mean loss, bf16 compute; eval at temperature 1.0, top-p 0.95,
32 samples per maze; rollouts by continuous batching over 512 decode slots. Set the checkpoint with
--config.model.hf_path=/path/to/Qwen2.5-7B-Instruct."""
from experiments.configs import base

ARCHITECTURE = "qwen2.5-7b"  # what experiments.plan plans without the checkpoint


def get_config():
    c = base.get_config()
    c.model.preset = "hf"
    c.model.hf_path = ""
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    # The layer scan reuses one layer's buffers for all 28: the memory plan of the unrolled stack gives every
    # layer's f32 attention scores their own slot (over 10x the temporaries per GPU; bench/RESULTS.md).
    c.model.scan_layers = True
    c.task.options.template = "instruct"
    c.task.options.train_sizes = (9, 11, 13, 15)
    c.task.options.test_sizes = (7, 9, 11, 13, 15, 17, 19, 21)
    c.task.num_train = 40000
    c.task.verifier_workers = 8
    c.rollout.prompts_per_step = 128
    c.rollout.num_samples = 32
    c.rollout.max_new_tokens = 2048
    c.rollout.sample_prompts = 0      # all 128 x 32 rows in one sampler call over 512 decode slots: the KV cache
    c.rollout.decode_slots = 512      # is 512 completions, not 4096 (fits an H100 by the plan; bench/RESULTS.md)
    c.step.learning_rate = 1e-6
    c.step.warmup_steps = 10
    c.step.num_minibatches = 4
    c.step.num_microbatches = 16
    c.step.logprob_chunk = 512        # no [rows, 2560, 152064] f32 logits (bench/RESULTS.md)
    c.step.weight_decay = 0.0
    c.step.old_logprobs = "recompute"
    c.train.steps = 400
    c.train.eval_every = 25
    c.train.checkpoint_every = 10
    c.eval.num_prompts = 775          # the paper's test split: 75 (7x7) + 7 x 100
    c.eval.num_samples = 32
    c.eval.sample_prompts = 32
    c.sft.steps = 0                   # instruct models start from their own policy
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
